"""Metrics sink of a stage: metrics.jsonl, optional TensorBoard, and a rich progress bar (rank 0 only)."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

from rlhf_cli.errors import UserError
from rlhf_cli.files import atomic_write_text

console = Console(stderr=True, soft_wrap=True)
UNKNOWN_ETA = "-:--:--"  # what rich's TimeRemainingColumn shows before it can estimate


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pairs(values: dict[str, Any], show: Iterable[str]) -> list[str]:
    """`key value` for each shown key present in `values`, in the order of `show`."""
    return [f"{k} {_fmt(values[k])}" for k in show if k in values]


def plain_line(step: int, total: int, eta: str, values: dict[str, Any], show: Iterable[str]) -> str:
    """The log line written instead of the bar when stderr is not a terminal (CI, SLURM logs)."""
    return "  ".join([f"step {step}/{total}", f"eta {eta}", *_pairs(values, show)])


def first_replayed_step(start_step: int) -> int:
    """The first step whose metrics a run starting at `start_step` logs (again). A checkpoint of step N is saved after
    step N's row is written, so rows up to N stay; from step 0 nothing stays, because the step-0 rows (PPO's
    evaluation of the starting policy) are logged again."""
    return start_step + 1 if start_step else 0


def drop_replayed_rows(path: Path, first: int) -> int:
    """Rewrite metrics.jsonl with only the rows of steps before `first` (the first step this run logs again, see
    `first_replayed_step`), atomically (a temporary file renamed over it), and return how many rows went. Without
    this, the steps between the checkpoint and an interruption would have two rows each after a resume. A torn last
    line (killed mid-write) goes too."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < first:
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


class _Stats:
    """The shown metrics under the bar, on as many lines as the width needs; a `key value` pair is never split. (In a
    column of the bar's own line they squeezed step/total and the ETA into `…` at 80 columns.)"""

    def __init__(self, pairs: list[str]):
        self.pairs = pairs

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width, line = options.max_width - 2, ""
        for pair in self.pairs:
            if line and len(line) + 2 + len(pair) > width:
                yield Text(f"  {line}", no_wrap=True, overflow="ellipsis")
                line = ""
            line = f"{line}  {pair}" if line else pair
        if line:
            yield Text(f"  {line}", no_wrap=True, overflow="ellipsis")


class _Bar(Progress):
    """Line 1: description, bar, step/total, elapsed time and ETA; the bar alone takes what the others leave of the
    width, so they keep their full width down to about 40 columns. The metrics follow on their own lines."""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            yield _Stats(task.fields.get("stats", []))


def progress_bar(out: Console, total_steps: int, start_step: int) -> tuple[Progress, Any]:
    """A started bar at `start_step` of `total_steps` on `out`, and its task id."""
    bar = _Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=None, table_column=Column(ratio=1)),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=out,
        transient=False,
        expand=True,
    )
    task = bar.add_task("train", total=total_steps, completed=start_step, stats=[])
    bar.start()
    return bar, task


def _tensorboard(folder: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        console.print("[yellow]tensorboard is not installed; pip install tensorboard to use logging.tensorboard")
        return None
    # purge_step hides the events a crashed attempt logged for the steps that now run again.
    return SummaryWriter(str(folder), purge_step=purge_step)


def _wandb(stage_dir: Path, logging_cfg: Any) -> Any:
    """A W&B run named <run>/<stage> with the stage's resolved config (config.yaml, written when the stage began), its
    files under <stage>/wandb/; its id is kept in <stage>/wandb/run_id so a resumed stage continues the same run."""
    try:
        import wandb
    except ImportError:
        raise UserError("logging.wandb=true needs the wandb package: pip install 'rlhf-cli[wandb]'") from None
    import yaml

    folder = stage_dir / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    config_file = stage_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return wandb.init(
        project=logging_cfg.wandb_project,
        entity=logging_cfg.wandb_entity,
        name=f"{stage_dir.parent.name}/{stage_dir.name}",
        id=run_id,
        resume="allow",
        dir=str(folder),
        mode=logging_cfg.wandb_mode,
        config=config,
        reinit="finish_previous",
    )


class Metrics:
    """`log(step, values)` appends one JSON line and refreshes the bar. A no-op on ranks other than 0.

    Without a terminal (CI, SLURM logs) the bar is replaced by one plain line every `log_every` steps. A run that
    starts at a checkpoint's step first drops the rows of the steps it replays, so every step has one row."""

    def __init__(
        self,
        path: Path,
        total_steps: int,
        logging_cfg: Any,
        enabled: bool,
        start_step: int = 0,
        replay_from: int | None = None,
    ):
        self.enabled = enabled
        self.log_every = max(1, logging_cfg.log_every)
        self.plots = getattr(logging_cfg, "plots", True)  # read by stages/common.finish
        self.total = total_steps
        self._clock = (time.monotonic(), start_step)  # for the ETA of plain lines
        self._file = self._tb = self._bar = self._wandb = None
        self._latest: dict[str, Any] = {}
        if not enabled:
            return
        # The rows of steps >= replay_from are logged again by this run (default: first_replayed_step(start_step)).
        replay_from = first_replayed_step(start_step) if replay_from is None else replay_from
        dropped = drop_replayed_rows(path, replay_from)
        if dropped:
            self.message(f"metrics.jsonl: dropped {dropped} row(s) of the steps that run again from step {start_step}")
        self._file = open(path, "a")
        if logging_cfg.tensorboard:
            self._tb = _tensorboard(path.parent / "tensorboard", replay_from)
        if getattr(logging_cfg, "wandb", False):
            self._wandb = _wandb(path.parent, logging_cfg)
        if logging_cfg.progress and sys.stderr.isatty():
            self._bar, self._task = progress_bar(console, total_steps, start_step)

    def log(self, step: int, values: dict[str, Any], show: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for key, val in numbers.items():
                self._tb.add_scalar(key, val, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._bar is not None:
            # The bar keeps the latest value of each shown key, so an eval-only record does not blank the loss.
            self._latest.update({k: values[k] for k in show if k in values})
            self._bar.update(self._task, completed=step, stats=_pairs(self._latest, show))
        elif step % self.log_every == 0 or step == self.total:
            console.print(plain_line(step, self.total, self.eta(step), values, show), highlight=False)

    def set_total(self, total_steps: int) -> None:
        """A new step total, for a stage that knows its length only as it goes (rejection sampling's rounds)."""
        self.total = total_steps
        if self._bar is not None:
            self._bar.update(self._task, total=total_steps)

    def eta(self, step: int) -> str:
        """Time left at the mean pace of this process's steps so far (eval and checkpoints included), H:MM:SS."""
        started, first = self._clock
        if step <= first:
            return UNKNOWN_ETA
        left = (time.monotonic() - started) / (step - first) * max(self.total - step, 0)
        return str(timedelta(seconds=round(left)))

    def message(self, text: str) -> None:
        if self.enabled:
            console.print(text, highlight=False)

    @contextmanager
    def closed_on_error(self) -> Iterator[None]:
        """Inside: an exception (preemption, Ctrl-C, an error) closes the metrics first, so that a live bar does not
        redraw itself over the message the CLI prints next."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the bar and close the files; nothing is written after (a second call does nothing)."""
        self.enabled = False
        if self._bar is not None:
            self._bar.stop()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._file is not None:
            self._file.close()
        self._file = self._tb = self._bar = self._wandb = None


class Sums:
    """Named float64 sums of one step or evaluation (torchtune's PPOStats is the idea): each micro-batch or eval batch
    `add`s its sums by name, in float64 and in the order they come, then `all_reduced()` sums every name over the
    ranks in one collective. Sums, not means, so micro-batches and ranks add up exactly; divide afterwards."""

    def __init__(self, *names: str):
        import torch  # here: `rlhf --help` imports this module without torch

        self.names = names
        self.vector = torch.zeros(len(names), dtype=torch.float64)

    def add(self, **values: Any) -> None:
        """Add a value (a number or a one-element tensor) to each name; every name must be given."""
        import torch

        self.vector += torch.tensor([float(values[name]) for name in self.names], dtype=torch.float64)

    def add_columns(self, columns: dict[str, Any], keep: Any = None) -> None:
        """Add the sum of each name's column ((B,) tensors, rows of a batch), over the rows `keep` (a (B,) mask) or
        all of them."""
        import torch

        rows = torch.stack([columns[name].double().cpu() for name in self.names])
        self.vector += (rows if keep is None else rows[:, keep]).sum(dim=1)

    def local(self) -> dict[str, float]:
        """Every name's sum on this rank."""
        return dict(zip(self.names, self.vector.tolist(), strict=True))

    def all_reduced(self) -> dict[str, float]:
        """Every name's sum over all ranks (collective)."""
        from rlhf_cli import engine as eng

        return dict(zip(self.names, eng.all_reduce_sum(self.vector).tolist(), strict=True))
