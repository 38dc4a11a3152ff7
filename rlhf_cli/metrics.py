"""Metrics sink of a stage: metrics.jsonl, optional TensorBoard, and a rich progress bar (rank 0 only)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Metrics:
    """`log(step, values)` appends one JSON line and refreshes the bar. A no-op on ranks other than 0.

    Without a terminal (CI, SLURM logs) the bar is replaced by one plain line every `log_every` steps."""

    def __init__(self, path: Path, total_steps: int, logging_cfg: Any, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.log_every = max(1, logging_cfg.log_every)
        self.total = total_steps
        self._file = open(path, "a") if enabled else None
        self._tb = None
        if enabled and logging_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                console.print(
                    "[yellow]tensorboard is not installed; pip install tensorboard to use logging.tensorboard"
                )
            else:
                self._tb = SummaryWriter(str(path.parent / "tensorboard"))
        self._bar = None
        self._latest: dict[str, Any] = {}
        if enabled and logging_cfg.progress and sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, stats="")
            self._bar.start()

    def log(self, step: int, values: dict[str, Any], show: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, val in values.items():
                if isinstance(val, (int, float)):
                    self._tb.add_scalar(key, val, step)
        if self._bar is not None:
            # The bar keeps the latest value of each shown key, so an eval-only record does not blank the loss.
            self._latest.update({k: values[k] for k in show if k in values})
            stats = "  ".join(f"{k} {_fmt(v)}" for k, v in self._latest.items())
            self._bar.update(self._task, completed=step, stats=stats)
        elif step % self.log_every == 0 or step == self.total:
            stats = "  ".join(f"{k} {_fmt(values[k])}" for k in show if k in values)
            console.print(f"step {step}/{self.total}  {stats}", highlight=False)

    def message(self, text: str) -> None:
        if self.enabled:
            console.print(text, highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
