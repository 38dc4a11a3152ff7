"""`rlhf runs [run.root=runs]`: the runs under the runs root, one table: each run's stages with their status, key
metrics (first -> last), start and end times, and the command that resumes a stage that stopped.

Status: completed; running (a live process holds the run directory's lock); interrupted (Ctrl-C, a signal or
preemption, or recorded as running by a process that is gone: a kill); failed (with its error). A stage that is not
completed and holds a complete resume checkpoint is `resumable at step N`: running its command again continues it.
A run whose manifest is missing or unreadable is listed as unreadable, with the reason; the others are listed all
the same. Nothing is written.
"""

from __future__ import annotations

import fcntl
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf_cli.commands.args import parse_key_values
from rlhf_cli.errors import UserError
from rlhf_cli.run_dir import COMPLETE_MARKER, TIME_FORMAT

COLUMNS = ("run", "stage", "status", "key metrics", "started", "ended")
ERROR_CHARS = 80  # of a failed stage's error in the table; the manifest keeps all of it
STATUS_STYLE = {"completed": "green", "running": "cyan", "interrupted": "yellow", "failed": "red",
                "unreadable": "red"}  # fmt: skip


@dataclass
class RunsArgs:
    # The folder that holds the runs.
    root: str = "runs"


ARGS = RunsArgs  # for `rlhf runs --help`


@dataclass
class StageRow:
    stage: str
    status: str  # completed, running, interrupted, failed (or the manifest's word for anything else)
    metrics: str
    started: str
    ended: str
    resume_step: int | None = None  # the newest complete resume checkpoint of a stage that is not completed
    command: str = ""  # the command that ran it: run again, it resumes


@dataclass
class RunRow:
    name: str
    stages: list[StageRow] = field(default_factory=list)
    unreadable: str | None = None  # why the manifest could not be read


def in_use(run_dir: Path) -> bool:
    """Does a live process hold the run's lock (run_dir._take_lock)? Probed with a shared lock taken and given back at
    once: a stage that starts in those microseconds is refused as `in use` and can simply be started again."""
    try:
        fh = open(run_dir / ".lock")  # noqa: SIM115 - closed below, whatever the probe says
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def resume_step(stage_dir: Path) -> int | None:
    """The step of the newest complete checkpoint under <stage>/checkpoints/ (rejection sampling keeps them one
    level down, in round-k/; its steps are numbered across rounds)."""
    ckpt = stage_dir / "checkpoints"
    found = [*ckpt.glob(f"step-*/{COMPLETE_MARKER}"), *ckpt.glob(f"*/step-*/{COMPLETE_MARKER}")]
    steps = [int(p.parent.name[5:]) for p in found if p.parent.name[5:].isdigit()]
    return max(steps) if steps else None


def key_metrics(stage: str, record: dict, stage_dir: Path) -> str:
    """`key first -> last, ...`: the end-of-stage summary's headline (summary.py) for a completed stage, the same
    keys read from metrics.jsonl so far for one that is not; the pipeline summary's choice of keys."""
    from rlhf_cli.commands.pipeline import KEY_METRICS
    from rlhf_cli.summary import HEADLINE, first_and_last

    headline = record.get("summary", {}).get("headline")
    if not isinstance(headline, dict):
        headline = first_and_last(stage_dir / "metrics.jsonl", HEADLINE.get(stage, ()))
    keys = [k for k in KEY_METRICS.get(stage, ()) if k in headline] or list(headline)
    return ", ".join(_first_last(k, headline[k]) for k in keys)


def stage_row(run_dir: Path, stage: str, record: dict, locked: bool) -> StageRow:
    status = record.get("status", "unknown")
    if status == "preempted" or (status == "running" and not locked):  # a kill leaves `running` and no lock holder
        status = "interrupted"
    metrics = key_metrics(stage, record, run_dir / stage)
    if status == "failed" and record.get("error"):
        error = " ".join(str(record["error"]).split())
        error = error if len(error) <= ERROR_CHARS else error[: ERROR_CHARS - 3] + "..."
        metrics = f"{metrics}; error: {error}" if metrics else f"error: {error}"
    step = resume_step(run_dir / stage) if status not in ("completed", "running") else None
    return StageRow(stage, status, metrics, _time(record.get("started_at")), _time(record.get("ended_at")),
                    step, str(record.get("command") or ""))  # fmt: skip


def read_run(run_dir: Path) -> RunRow:
    """One run's rows; a manifest that is missing, not JSON or not a manifest makes the run `unreadable`."""
    path = run_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return RunRow(run_dir.name, unreadable="no manifest.json")
    except (OSError, ValueError) as err:
        return RunRow(run_dir.name, unreadable=f"manifest.json: {err}")
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    if not isinstance(stages, dict) or not all(isinstance(r, dict) for r in stages.values()):
        return RunRow(run_dir.name, unreadable="manifest.json has no `stages` table of stage records")
    locked = in_use(run_dir)
    return RunRow(run_dir.name, [stage_row(run_dir, s, stages[s], locked) for s in ran_order(stages)])


def ran_order(stages: dict[str, Any]) -> list[str]:
    """The manifest's stages in the order they started (the manifest keeps them sorted by name); stages without a
    start time last, by name."""

    def started(name: str) -> tuple[int, datetime, str]:
        record = stages[name] if isinstance(stages[name], dict) else {}
        try:
            return 0, datetime.strptime(record.get("started_at") or "", TIME_FORMAT), name
        except ValueError:
            return 1, datetime.min.replace(tzinfo=timezone.utc), name

    return sorted(stages, key=started)


def list_runs(root: Path) -> list[RunRow]:
    return [read_run(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def table_rows(runs: list[RunRow]) -> list[tuple[str, ...]]:
    """One row per stage (the run named on its first), one for an unreadable run or one with no stage yet."""
    out = []
    for run in runs:
        if run.unreadable is not None:
            out.append((run.name, "", "unreadable", run.unreadable, "", ""))
        elif not run.stages:
            out.append((run.name, "", "no stage yet", "", "", ""))
        for i, st in enumerate(run.stages):
            status = st.status if st.resume_step is None else f"{st.status} (resumable at step {st.resume_step})"
            out.append((run.name if i == 0 else "", st.stage, status, st.metrics, st.started, st.ended))
    return out


def resume_lines(runs: list[RunRow]) -> list[str]:
    """`resume <run>/<stage>: <its command>` for each resumable stage that no process is running."""
    return [f"resume {run.name}/{st.stage} at step {st.resume_step}: {st.command or f'rlhf {st.stage} ...'}"
            for run in runs for st in run.stages if st.resume_step is not None and st.status != "running"]  # fmt: skip


def main(args: list[str]) -> int:
    from rich.console import Console

    a = parse_key_values(args, RunsArgs, "run.root=runs")
    root = Path(a.root)
    console = Console(highlight=False, soft_wrap=True)
    if root.exists() and not root.is_dir():
        raise UserError(f"run.root={a.root} is a file, not a folder of runs")
    runs = list_runs(root) if root.is_dir() else []
    if not runs:
        why = "it does not exist" if not root.exists() else "it is empty"
        console.print(f"no runs under {root}/ ({why}); a stage run with run.name=<name> creates {root}/<name>/",
                      markup=False)  # fmt: skip
        return 0
    rows = table_rows(runs)
    if console.is_terminal:
        _print_table(console, rows, f"runs under {root}/")
    else:
        for line in plain_lines(rows, f"runs under {root}/"):
            console.print(line, markup=False)
    for line in resume_lines(runs):
        console.print(line, markup=False)
    return 0


def plain_lines(rows: list[tuple[str, ...]], title: str) -> list[str]:
    """The table as aligned text (two spaces between columns), for logs and pipes."""
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    return [title, *("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [COLUMNS, *rows])]


def _print_table(console: Any, rows: list[tuple[str, ...]], title: str) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), title_justify="left", box=None, padding=(0, 1), header_style="bold")
    for name in COLUMNS:
        table.add_column(name, overflow="fold")
    for row in rows:
        status = STATUS_STYLE.get(row[2].split(" ")[0], "")
        # Text, not markup: an error message or a metric name may hold square brackets.
        table.add_row(*(Text(cell, style=status if i == 2 else "") for i, cell in enumerate(row)))
    console.print(table)


def _time(stamp: Any) -> str:
    """A manifest time as `2026-11-30 10:02` (in the zone it was written in); anything else as it is."""
    try:
        return datetime.strptime(stamp, TIME_FORMAT).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return "" if stamp is None else str(stamp)


def _first_last(key: str, values: Any) -> str:
    try:
        first, last = values
    except (TypeError, ValueError):
        return f"{key} {values}"
    return f"{key} {_num(first)}" if first == last else f"{key} {_num(first)} -> {_num(last)}"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
