"""`rlhf runs [run.name=<run>] [run.root=runs]`: the runs under the runs root, one table: each run's stages with their
status, key metrics (first -> last; an evaluation's: each policy's gold, else win rate, else reward), start and end
times, and the command that resumes a stage that stopped. With run.name= that run alone, then its held-out evaluation
table again (eval/eval.json, as `rlhf eval` printed it; nothing is computed).

Status: completed; running (a live process holds the run directory's lock); interrupted (Ctrl-C, a signal or
preemption, or recorded as running by a process that is gone: a kill); failed (with its error). A stage that is not
completed and holds a complete resume checkpoint is `resumable at step N`: running its command again continues it.
A run whose manifest is missing or unreadable is listed as unreadable, with the reason, and so is a stage whose
record is not a table; the others are listed all the same. Whatever a hand edit or a crash left in a run directory
(fields of the wrong type, bytes that are not text, folders where files belong) is shown as it is or named, never a
traceback. Nothing is written.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf_cli import slurm
from rlhf_cli.commands.args import parse_key_values
from rlhf_cli.errors import UserError
from rlhf_cli.files import check_run_name, resume_step
from rlhf_cli.jsonsafe import load_json
from rlhf_cli.run_dir import TIME_FORMAT

COLUMNS = ("run", "stage", "status", "key metrics", "started", "ended")
ERROR_CHARS = 80  # of a failed stage's error in the table; the manifest keeps all of it
EVAL = "eval"  # the stage whose result is a table of numbers per policy (stages/eval.py)
# The evaluation's number `rlhf runs` shows per policy: the first it measured of the gold metric (the judge no stage
# optimised against), the win rate against the reference, the reward.
EVAL_HEADLINE = (("gold_mean", "gold"), ("win_rate", "win rate"), ("reward_mean", "reward"))
STATUS_STYLE = {
    "completed": "green",
    "running": "cyan",
    "interrupted": "yellow",
    "failed": "red",
    "incomplete": "red",
    "unreadable": "red",
}


@dataclass
class RunsArgs:
    # One run: its stages, then its held-out evaluation table again (eval/eval.json); unset: every run.
    run: str | None = None
    # The folder that holds the runs.
    root: str = "runs"


ARGS = RunsArgs  # for `rlhf runs --help`


@dataclass
class StageRow:
    stage: str
    status: str  # completed, running, interrupted, failed, unreadable (or the manifest's word for anything else)
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
    once: a stage that starts in those microseconds is refused as `in use` and can simply be started again. Opened
    without blocking: a FIFO in place of the lock file would hold a plain open for ever."""
    try:
        fd = os.open(run_dir / ".lock", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:  # not a file that takes a lock: nobody holds it
        return False
    finally:
        os.close(fd)
    return False


def key_metrics(stage: str, record: dict, stage_dir: Path, order: list[str] | None = None) -> str:
    """`key first -> last, ...`: the end-of-stage summary's headline (summary.py) for a completed stage, the same
    keys read from metrics.jsonl so far for one that is not; the pipeline summary's choice of keys. The evaluation's
    numbers per policy (`eval_headline`), its policies in `order` (the stages in the order they ran)."""
    from rlhf_cli.commands.run_tables import KEY_METRICS
    from rlhf_cli.summary import HEADLINE, as_table, first_and_last, span

    if stage == EVAL:  # one number per policy, not a curve: its summary has no headline
        return eval_headline(record, order or [])
    headline = as_table(record.get("summary")).get("headline")
    if not isinstance(headline, dict):
        try:
            headline = first_and_last(stage_dir / "metrics.jsonl", HEADLINE.get(stage, ()))
        except OSError as err:
            return f"metrics.jsonl unreadable ({reason(err)})"
    keys = [k for k in KEY_METRICS.get(stage, ()) if k in headline] or list(headline)
    return ", ".join(f"{k} {span(headline[k])}" for k in keys)


def eval_headline(record: dict, order: list[str]) -> str:
    """`gold sft 0.533, ppo 0.667, ...`: one `EVAL_HEADLINE` number per evaluated policy, from the manifest's
    `<policy>/<quantity>` metrics, the policies in `order` (the reference left out: sft's row says the same)."""
    from rlhf_cli.summary import as_table, finite

    metrics = as_table(record.get("metrics"))
    for key, title in EVAL_HEADLINE:
        values = {name.rpartition("/")[0]: v for name, v in metrics.items() if name.endswith("/" + key) and finite(v)}
        values = {name: v for name, v in values.items() if name != "reference"} or values
        if values:
            names = sorted(values, key=lambda n: (order.index(n) if n in order else len(order), n))
            return f"{title} " + ", ".join(f"{name} {values[name]:.3g}" for name in names)
    return ""


def stage_row(run_dir: Path, stage: str, record: dict, locked: bool, manifest: dict | None = None) -> StageRow:
    problem = record_problem(stage, record)
    if problem is not None:
        return StageRow(stage, "unreadable", problem, "", "")
    status = str(record.get("status") or "unknown")
    if status == "preempted" or (status == "running" and not locked):  # a kill leaves `running` and no lock holder
        status = "interrupted"
    if status == "completed" and manifest is not None:
        status = completed_status(run_dir, stage, record, manifest)
    stage_dir = run_dir / stage
    order = ran_order(manifest["stages"]) if manifest is not None else []
    notes = [
        key_metrics(stage, record, stage_dir, order),
        "" if stage_dir.is_dir() else f"no folder {stage}/",
        slurm.describe(record.get("slurm")),
    ]
    if status == "failed" and record.get("error"):
        error = " ".join(str(record["error"]).split())
        notes.append("error: " + (error if len(error) <= ERROR_CHARS else error[: ERROR_CHARS - 3] + "..."))
    step = resume_step(stage_dir) if status not in ("completed", "running") else None
    return StageRow(
        stage,
        status,
        "; ".join(n for n in notes if n),
        _time(record.get("started_at")),
        _time(record.get("ended_at")),
        step,
        str(record.get("command") or ""),
    )


def completed_status(run_dir: Path, stage: str, record: dict, manifest: dict) -> str:
    """`completed`, `completed (stale: sft re-ran after it)`, or `incomplete (<what is missing>)` when the outputs it
    recorded are gone or changed on disk (provenance.py). A record too damaged to judge stays `completed`."""
    from rlhf_cli.provenance import damage, stale_reasons

    try:
        broken = damage(run_dir, record)
        reasons = [] if broken else stale_reasons(manifest, stage, run_dir)
    except (OSError, ValueError, TypeError, AttributeError):  # hand-edited provenance fields: listed as recorded
        return "completed"
    if broken:
        return f"incomplete ({broken})"
    return f"completed (stale: {'; '.join(reasons)})" if reasons else "completed"


def record_problem(stage: str, record: Any) -> str | None:
    """Why a stage's manifest record cannot be listed (None when it can): not a table, or a name that is not a
    folder name, which must not be joined to a path (`../x`, a NUL)."""
    if not isinstance(record, dict):
        kind = {type(None): "null", str: "a string", list: "a list", bool: "true or false"}.get(type(record))
        return f"its manifest record is {kind or 'a number'}, not a table"
    try:
        check_run_name(stage, "stage")
        stage.encode("utf-8", "surrogateescape")  # a lone surrogate that stands for no byte of a file name
    except (UserError, UnicodeEncodeError):
        return "not a stage folder name"
    return None


def read_run(run_dir: Path) -> RunRow:
    """One run's rows; a manifest that is missing, unreadable, not JSON or not a manifest makes the run
    `unreadable`, a stage record that is not a table that stage."""
    path = run_dir / "manifest.json"
    if not os.path.lexists(path):
        return RunRow(run_dir.name, unreadable="no manifest.json")
    try:
        manifest = load_json(path)
    except (OSError, ValueError) as err:
        return RunRow(run_dir.name, unreadable=f"manifest.json: {reason(err)}")
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    if not isinstance(stages, dict):
        return RunRow(run_dir.name, unreadable="manifest.json has no `stages` table of stage records")
    locked = in_use(run_dir)
    return RunRow(run_dir.name, [stage_row(run_dir, s, stages[s], locked, manifest) for s in ran_order(stages)])


def reason(err: Exception) -> str:
    """An error as the user reads it: an OSError's own words (`Permission denied`), without its errno and path."""
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err)


def ran_order(stages: dict[str, Any]) -> list[str]:
    """The manifest's stages in the order they started (the manifest keeps them sorted by name); stages without a
    start time last, by name."""

    def started(name: str) -> tuple[int, datetime, str]:
        stamp = stages[name].get("started_at") if isinstance(stages[name], dict) else None
        try:
            return 0, datetime.strptime(stamp, TIME_FORMAT), name
        except (TypeError, ValueError):  # none, not a string, not a time
            return 1, datetime.min.replace(tzinfo=timezone.utc), name

    return sorted(stages, key=started)


def list_runs(root: Path) -> list[RunRow]:
    """The runs under `root`: its folders (not hidden ones), and its links that lead nowhere (a run folder moved
    away, a link loop), which are named as unreadable; plain files are not runs."""
    try:
        entries = sorted(root.iterdir())
    except OSError as err:
        raise UserError(f"cannot read run.root={root}: {reason(err)}") from None
    runs = []
    for path in entries:
        if path.name.startswith("."):
            continue
        if path.is_dir():
            runs.append(read_run(path))
        elif path.is_symlink() and not path.exists():
            runs.append(RunRow(path.name, unreadable="a symbolic link to nothing (its target is gone, or a loop)"))
    return runs


def table_rows(runs: list[RunRow]) -> list[tuple[str, ...]]:
    """One row per stage (the run named on its first), one for an unreadable run or one with no stage yet; every
    cell `printable`."""
    out = []
    for run in runs:
        if run.unreadable is not None:
            out.append((run.name, "", "unreadable", run.unreadable, "", ""))
        elif not run.stages:
            out.append((run.name, "", "no stage yet", "", "", ""))
        for i, st in enumerate(run.stages):
            status = st.status if st.resume_step is None else f"{st.status} (resumable at step {st.resume_step})"
            out.append((run.name if i == 0 else "", st.stage, status, st.metrics, st.started, st.ended))
    return [tuple(printable(cell) for cell in row) for row in out]


def resume_lines(runs: list[RunRow]) -> list[str]:
    """`resume <run>/<stage>: <its command>` for each resumable stage that no process is running."""
    return [
        printable(f"resume {run.name}/{st.stage} at step {st.resume_step}: {st.command or f'rlhf {st.stage} ...'}")
        for run in runs
        for st in run.stages
        if st.resume_step is not None and st.status != "running"
    ]


def printable(text: str) -> str:
    """`text` on one line that any terminal or pipe takes: line breaks and tabs made spaces, other characters that are
    not printable written as escapes (control characters; the lone surrogates by which Python holds a file name that
    is not UTF-8, which a UTF-8 stdout refuses with an exception)."""
    return "".join(c if c.isprintable() else " " if c.isspace() else ascii(c)[1:-1] for c in text)


def main(args: list[str]) -> int:
    from rich.console import Console

    a = parse_key_values(args, RunsArgs, "run.root=runs")
    root = Path(a.root)
    console = Console(highlight=False, soft_wrap=True)
    if root.exists() and not root.is_dir():
        raise UserError(f"run.root={a.root} is a file, not a folder of runs")
    runs = selected_runs(root, a.run)
    if not runs:
        why = "it is empty" if root.is_dir() else "a link to nothing" if root.is_symlink() else "it does not exist"
        console.print(
            printable(f"no runs under {root}/ ({why}); a stage run with run.name=<name> creates {root}/<name>/"),
            markup=False,
        )
        return 0
    rows, title = table_rows(runs), printable(f"runs under {root}/" if a.run is None else f"run {root / a.run}")
    if console.is_terminal:
        _print_table(console, rows, title)
    else:
        for line in plain_lines(rows, title):
            console.print(line, markup=False)
    for line in [*resume_lines(runs), *evaluation_lines(runs, root, one=a.run is not None)]:
        console.print(line, markup=False)
    return 0


def selected_runs(root: Path, name: str | None) -> list[RunRow]:
    """Every run under `root` (none when it is not a folder), or the run `name` alone."""
    if name is None:
        return list_runs(root) if root.is_dir() else []
    check_run_name(name, "argument `run.name`")
    if not (root / name).is_dir():
        raise UserError(
            f"no run directory {root / name}; check run.name= and run.root= (`rlhf runs run.root={root}` "
            "lists the runs)"
        )
    return [read_run(root / name)]


def evaluation_lines(runs: list[RunRow], root: Path, one: bool) -> list[str]:
    """One run: its held-out evaluation table, read again from eval/eval.json (nothing is computed). Every run: the
    command that prints the table of the runs that have one (the key metrics column holds one number per policy)."""
    done = [r.name for r in runs if any(st.stage == EVAL and st.status.startswith("completed") for st in r.stages)]
    if not done:
        return []
    if one:
        from rlhf_cli.commands.run_tables import eval_lines
        from rlhf_cli.registry import STAGES

        return ["", *(printable(line) for line in eval_lines(root / done[0] / EVAL / STAGES[EVAL].output))]
    where = f" run.root={root}" if root != Path("runs") else ""
    if len(done) == 1:
        return [printable(f"evaluation table of {done[0]}: rlhf runs run.name={done[0]}{where}")]
    return [printable(f"evaluation tables of {', '.join(done)}: rlhf runs run.name=<run>{where}")]


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
        status = "yellow" if "(stale:" in row[2] else STATUS_STYLE.get(row[2].split(" ")[0], "")
        # Text, not markup: an error message or a metric name may hold square brackets.
        table.add_row(*(Text(cell, style=status if i == 2 else "") for i, cell in enumerate(row)))
    console.print(table)


def _time(stamp: Any) -> str:
    """A manifest time as `2026-11-30 10:02` (in the zone it was written in); anything else as it is."""
    try:
        return datetime.strptime(stamp, TIME_FORMAT).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return "" if stamp is None else str(stamp)
