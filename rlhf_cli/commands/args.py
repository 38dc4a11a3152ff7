"""Shared pieces of the tool commands (`rlhf generate`, `rlhf score`): key=value arguments into a dataclass, with
the same clear errors as the stage configs, and the checkpoint named by `model=` or by `run=` + `stage=`."""

from __future__ import annotations

import difflib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TypeVar

from rlhf_cli.errors import UserError

T = TypeVar("T")


def parse_key_values(args: list[str], schema: type[T], example: str) -> T:
    """`key=value` strings into an instance of the dataclass `schema`.

    A value's type is that of the field's default (int or float, else str; a None default means str).
    Unknown keys get the closest known one; `example` (e.g. `prompt="Hello"`) shows the expected form.
    """
    known = {f.name: f for f in fields(schema)}
    values: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"expected key=value, got `{arg}` (e.g. {example})")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise UserError(f"unknown argument `{key}`{hint} (arguments: {', '.join(known)})")
        values[key] = _convert(key, value, known[key].default)
    return schema(**values)


def _convert(key: str, value: str, default: Any) -> Any:
    kind = type(default) if default is not MISSING and default is not None else str
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise UserError(f"argument `{key}` must be {kind.__name__}, got `{value}`") from None
    return value


def resolve_checkpoint(model: str | None, run: str | None, root: str, stage: str) -> str:
    """`model` as given (a folder or hub id), or the final/ of `stage` in the run directory `<root>/<run>`."""
    if (run is None) == (model is None):
        raise UserError(f"give exactly one of run=<name> (with stage=, default {stage}) or model=<path or hub id>")
    if model is not None:
        return model
    from rlhf_cli.run_dir import Run, check_run_name

    check_run_name(run, "argument `run`")
    check_run_name(stage, "argument `stage`")
    handle = Run(root=Path(root) / run, stage=stage)
    if not handle.root.is_dir():
        raise UserError(f"no run directory {handle.root}; check run= and root= (runs are listed under {root}/)")
    return str(handle.stage_output(stage))
