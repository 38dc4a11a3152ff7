"""The end of a stage, for the person who ran it: what changed (headline metrics from their first to their last
value), how long it took, how fast, how much disk it holds, and the next command. Recorded in the manifest when the
stage completes (`complete_stage`) and printed from there (`print_summary`), so `rlhf runs` and a pipeline can reuse
the same record. The readers take a record as a hand edit or a crash may have left it: a field of the wrong type is
shown as it is or left out (`as_table`, `span`), never an exception.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rlhf_cli.errors import UserError
from rlhf_cli.jsonsafe import load_json
from rlhf_cli.run_dir import TIME_FORMAT, Run, now

HEADLINE_RS = ("candidate_score_mean", "selected_score_mean", "best_of_n_gain", "loss", "eval_score", "eval_gold")
# Stage -> the metrics that say whether it worked, in the order shown. The first and last logged values are kept.
HEADLINE: dict[str, tuple[str, ...]] = {
    "sft": ("loss", "eval_loss", "eval_perplexity"),
    "rm": ("loss", "accuracy", "eval_accuracy", "eval_margin"),
    "dpo": ("loss", "reward_accuracy", "eval_loss", "eval_reward_accuracy", "eval_reward_margin"),
    "ppo": ("score_mean", "kl", "eval_score", "eval_gold", "eval_response_length", "eval_eos_fraction"),
    # First -> last: round 1 -> the last round for the selection, the starting policy -> the last one for eval.
    "rejection_sampling": HEADLINE_RS,
    **dict.fromkeys(
        ("grpo", "rloo", "reinforce_pp"),
        ("score_mean", "zero_variance_groups", "kl", "eval_score", "eval_gold", "eval_response_length"),
    ),
}
# Stage -> what usually comes next in the chain ({run}: the run-name arguments).
NEXT: dict[str, str] = {
    "sft": "rlhf rm {run}   (or: rlhf dpo {run})",
    "rm": "rlhf ppo {run}",
    "dpo": 'rlhf generate {run} stage=dpo prompt="What is the capital of France?"',
    "ppo": 'rlhf generate {run} stage=ppo prompt="What is the capital of France?"   (or: rlhf eval {run})',
    "rejection_sampling": "rlhf ppo {run} model.name_or_path=stage:rejection_sampling   (Llama 2: PPO on top), or "
    'rlhf generate {run} stage=rejection_sampling prompt="Hi"',
    **{
        verb: f'rlhf generate {{run}} stage={verb} prompt="Is 7 even or odd?"'
        for verb in ("grpo", "rloo", "reinforce_pp")
    },
}


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def first_and_last(metrics_path: Path, keys: tuple[str, ...]) -> dict[str, list[float]]:
    """key -> [first, last] logged value in metrics.jsonl, for the keys that were logged (a NaN as NaN: a loss that
    diverged is what the headline must show). {} when there is no metrics.jsonl; OSError when there is one that
    cannot be read; its lines that are not rows (plots.load_rows) are skipped."""
    from rlhf_cli.plots import load_rows

    if not os.path.lexists(metrics_path):
        return {}
    out: dict[str, list[float]] = {}
    for row in load_rows(metrics_path)[0]:
        for key in keys:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, [value, value])[1] = value
    return {key: out[key] for key in keys if key in out}  # in the order of `keys`


def complete_stage(run: Run, keep_checkpoints: bool, plots: bool = True) -> None:
    """Mark the stage completed (rank 0) with its summary, after final/ is written: the resume checkpoints are removed
    unless `keep_checkpoints` (a completed stage is never resumed, and they are most of a run's disk: optimizer
    states are 2-3x the model), then the headline history, speed and disk use go into the manifest; `plots`
    (logging.plots) draws the curves."""
    if not run.is_main:
        return
    checkpoint_bytes = folder_bytes(run.checkpoints_dir)
    if not keep_checkpoints:
        drop_resume_checkpoints(run.checkpoints_dir)
    record = run.stage_record()
    metrics = record.get("metrics", {})
    seconds = metrics.get("train_seconds") or 0.0
    disk = {"stage": folder_bytes(run.stage_dir), "checkpoints": checkpoint_bytes, "run": folder_bytes(run.root)}
    summary: dict[str, Any] = {
        "headline": first_and_last(run.metrics_path, HEADLINE.get(run.stage, ())),
        "disk_bytes": disk,
        "checkpoints_kept": keep_checkpoints,
    }
    if metrics.get("tokens") and seconds:
        summary["tokens_per_second"] = metrics["tokens"] / seconds
    ended = now()
    if record.get("started_at"):  # this invocation, from the start of training to the end of the export
        start = datetime.strptime(record["started_at"], TIME_FORMAT)
        summary["stage_seconds"] = (datetime.strptime(ended, TIME_FORMAT) - start).total_seconds()
    run.update_stage(status="completed", ended_at=ended, summary=summary)
    plot = draw_curves(run) if plots else None
    if plot is not None:
        run.update_stage(summary={**summary, "plot": str(plot)})


def draw_curves(run: Run) -> Path | None:
    """The stage's training curves as `<stage>/metrics.png` (plots.py), drawn once the stage is recorded complete: a
    picture that fails (a missing font, a full disk) costs one warning line, never the completed stage."""
    from rlhf_cli import plots

    if run.stage not in plots.PANELS:  # eval: a table of numbers, no curves
        return None
    try:
        return plots.plot_stage(run.stage_dir, run.stage)[0]
    except Exception as exc:  # noqa: BLE001 - any failure of the plot is reported, none fails the stage
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        print(
            f"warning: no plot of the {run.stage} curves ({reason}); `rlhf plot run.name={run.root.name} "
            f"run.root={run.root.parent} stage={run.stage}` draws it again",
            file=sys.stderr,
        )
        return None


def drop_resume_checkpoints(ckpt_dir: Path) -> None:
    """Remove the resume checkpoints (complete and incomplete); `damaged-step-N/` folders, set aside by a resume for
    inspection, stay (with the folder) until the user removes them."""
    if not ckpt_dir.is_dir():
        return
    for path in ckpt_dir.iterdir():
        if not path.name.startswith("damaged-"):
            shutil.rmtree(path, ignore_errors=True)
    if not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()


def summary_lines(record: dict, stage: str, run_args: str, wall_seconds: float | None = None) -> list[tuple[str, str]]:
    """(label, text) rows of a completed stage's manifest record: headline start -> end, time (`wall_seconds`: of the
    whole command, loading included, when the caller knows it), speed, disk, next. A field of the wrong type is left
    out, or shown as it is."""
    record = as_table(record)
    summary = as_table(record.get("summary"))
    rows = [(str(key), span(values)) for key, values in as_table(summary.get("headline")).items()]
    wall = wall_seconds if wall_seconds is not None else summary.get("stage_seconds")
    seconds = as_table(record.get("metrics")).get("train_seconds")
    if finite(wall):
        train = f" (training steps {_duration(seconds)})" if finite(seconds) and seconds else ""
        rows.append(("wall time", _duration(wall) + train))
    if finite(summary.get("tokens_per_second")) and summary["tokens_per_second"]:
        rows.append(("tokens/s", f"{summary['tokens_per_second']:,.0f}"))
    disk = as_table(summary.get("disk_bytes"))
    if disk:
        size = {k: human_bytes(disk[k]) if finite(disk.get(k)) else "?" for k in ("stage", "run", "checkpoints")}
        kept = (
            f"{size['checkpoints']} kept"
            if summary.get("checkpoints_kept")
            else f"{size['checkpoints']} removed (stage.keep_checkpoints=true keeps them)"
        )
        rows.append(("disk", f"stage {size['stage']}, run {size['run']}; resume checkpoints {kept}"))
    if summary.get("plot"):
        rows.append(("curves", str(summary["plot"])))
    if stage in NEXT:
        rows.append(("next", NEXT[stage].format(run=run_args)))
    return rows


def as_table(value: Any) -> dict:
    """`value` when it is a dict (a JSON object), else {}: a manifest field of the wrong type reads as absent."""
    return value if isinstance(value, dict) else {}


def span(values: Any) -> str:
    """A headline entry [first, last] as `first -> last` (`last` alone when they are equal); anything else as it
    is."""
    if isinstance(values, (list, tuple)) and len(values) == 2:
        first, last = values
        return _num(last) if first == last else f"{_num(first)} -> {_num(last)}"
    return _num(values)


def manifest_record(run: Run) -> tuple[dict, str | None]:
    """(the stage's manifest record, {} when it has none; why the manifest could not be read, or None), read as
    `rlhf runs` reads it: damage is a reason, never an exception."""
    try:
        manifest = load_json(run.manifest_path)
    except (OSError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return {}, f"{run.manifest_path}: {why}"
    return as_table(as_table(as_table(manifest).get("stages")).get(run.stage)), None


def print_summary(console: Any, run: Run, run_args: str, terminal: bool, wall_seconds: float | None = None) -> None:
    """The summary of `run.stage` from the manifest: a rich table on a terminal, plain `label: text` lines otherwise."""
    record, unread = manifest_record(run)
    rows = summary_lines(record, run.stage, run_args, wall_seconds)
    if unread:
        rows.insert(0, ("summary", f"not readable ({unread})"))
    outputs = as_table(record.get("outputs"))
    first = next(iter(outputs.values()), None)
    # What the stage produced: final/ for a training stage, else its first output (eval: eval.json).
    product = run.root / first if "final" not in outputs and isinstance(first, str) else run.final_dir
    title = f"{run.stage} completed: {product}"
    if not terminal:
        console.print(title, highlight=False, markup=False)
        for label, text in rows:
            console.print(f"  {label}: {text}", highlight=False, markup=False)
        return
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    for label, text in rows:
        table.add_row(label, text)
    console.print(table)


def _num(value: Any) -> str:
    if value is None:  # a non-finite value, as json_safe records it
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def finite(value: Any) -> bool:
    """A finite number (not a bool): what arithmetic and formats of a manifest field may take."""
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
