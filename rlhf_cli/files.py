"""Small file helpers of the run directory that the lower modules need too (checkpoints, metrics, composition): an
atomic text write, the checkpoint folders `step-N/` and their COMPLETE marker, and the rule for a run name.
run_dir.py (the `Run` and its manifest) builds on them."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_cli.errors import UserError

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # of the manifest's started_at / ended_at
COMPLETE_MARKER = "COMPLETE"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoints `step-N/` (with the COMPLETE marker), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step-*") if _step(p.name) is not None and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def resume_step(stage_dir: Path) -> int | None:
    """The step of the newest complete checkpoint under <stage>/checkpoints/ (rejection sampling keeps them one
    level down, in round-k/; its steps are numbered across rounds); None when there is none."""
    ckpt = stage_dir / "checkpoints"
    found = [*ckpt.glob(f"step-*/{COMPLETE_MARKER}"), *ckpt.glob(f"*/step-*/{COMPLETE_MARKER}")]
    # A marker that is not a file does not count, as for the resume itself (`complete_checkpoints`).
    steps = [step for p in found if p.is_file() and (step := _step(p.parent.name)) is not None]
    return max(steps, default=None)


def _step(name: str) -> int | None:
    """N of a `step-N` folder name; None for step-abc, step- and the like, and for digits int() takes but a resume
    does not (`step-²`). A folder name is at most 255 bytes, so int() is never asked for thousands of digits."""
    digits = name[5:]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def incomplete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders a crash left behind: temporary ones and renamed ones without the marker."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.name.startswith(("step-", ".tmp-step-"))]
    return sorted(p for p in found if not (p / COMPLETE_MARKER).is_file())


def check_run_name(name: str, what: str = "config key `run.name`") -> None:
    """A run name is one folder name, so `<root>/<name>` is a folder inside the root: an empty name would make the
    root itself the run directory, `..` or a separator would write (and, with run.overwrite, delete) outside it."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise UserError(
            f"{what} is {name!r}, must be a single folder name (not empty, not `.` or `..`, no `/`, `\\` or NUL)"
        )
