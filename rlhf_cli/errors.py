"""User-facing errors: one clear message, a non-zero exit, no traceback (see cli.main)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: the message says what, where (key or file:line) and what to do."""

    exit_code = 2


class DataError(UserError):
    """Malformed input data (a bad row under `data.bad_rows=fail`, an unreadable file, no usable rows)."""
