"""The end of a stage, for the person who ran it: what changed (headline metrics from their first to their last
value), how long it took, how fast, how much disk it holds, and the next command. Recorded in the manifest when the
stage completes (`complete_stage`) and printed from there (`print_summary`), so `rlhf runs` and a pipeline can reuse
the same record.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rlhf_cli.errors import UserError
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
    **dict.fromkeys(("grpo", "rloo", "reinforce_pp"), ("score_mean", "zero_variance_groups", "kl", "eval_score",
                                                         "eval_gold", "eval_response_length")),  # fmt: skip
}
# Stage -> what usually comes next in the chain ({run}: the run-name arguments).
NEXT: dict[str, str] = {
    "sft": "rlhf rm {run}   (or: rlhf dpo {run})",
    "rm": "rlhf ppo {run}",
    "dpo": 'rlhf generate {run} stage=dpo prompt="What is the capital of France?"',
    "ppo": 'rlhf generate {run} stage=ppo prompt="What is the capital of France?"   (or: rlhf eval {run})',
    "rejection_sampling": "rlhf ppo {run} model.name_or_path=stage:rejection_sampling   (Llama 2: PPO on top), or "
    'rlhf generate {run} stage=rejection_sampling prompt="Hi"',
    **{verb: f'rlhf generate {{run}} stage={verb} prompt="Is 7 even or odd?"' for verb in ("grpo", "rloo",
                                                                                          "reinforce_pp")},
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
    """key -> [first, last] logged value in metrics.jsonl, for the keys that were logged."""
    out: dict[str, list[float]] = {}
    if not metrics_path.is_file():
        return out
    for line in metrics_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        for key in keys:
            value = row.get(key) if isinstance(row, dict) else None
            if isinstance(value, (int, float)):
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
        print(f"warning: no plot of the {run.stage} curves ({reason}); `rlhf plot run.name={run.root.name} "
              f"run.root={run.root.parent} stage={run.stage}` draws it again", file=sys.stderr)  # fmt: skip
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
    whole command, loading included, when the caller knows it), speed, disk, next."""
    summary = record.get("summary", {})
    headline = summary.get("headline", {})
    rows = [(key, f"{_num(a)} -> {_num(b)}" if a != b else _num(b)) for key, (a, b) in headline.items()]
    wall = wall_seconds if wall_seconds is not None else summary.get("stage_seconds")
    seconds = record.get("metrics", {}).get("train_seconds")
    if wall is not None:
        rows.append(("wall time", _duration(wall) + (f" (training steps {_duration(seconds)})" if seconds else "")))
    if summary.get("tokens_per_second"):
        rows.append(("tokens/s", f"{summary['tokens_per_second']:,.0f}"))
    disk = summary.get("disk_bytes", {})
    if disk:
        ckpt = human_bytes(disk["checkpoints"])
        kept = (f"{ckpt} kept" if summary.get("checkpoints_kept")
                else f"{ckpt} removed (stage.keep_checkpoints=true keeps them)")  # fmt: skip
        rows.append(("disk", f"stage {human_bytes(disk['stage'])}, run {human_bytes(disk['run'])}; resume "
                             f"checkpoints {kept}"))  # fmt: skip
    if summary.get("plot"):
        rows.append(("curves", summary["plot"]))
    if stage in NEXT:
        rows.append(("next", NEXT[stage].format(run=run_args)))
    return rows


def print_summary(console: Any, run: Run, run_args: str, terminal: bool, wall_seconds: float | None = None) -> None:
    """The summary of `run.stage` from the manifest: a rich table on a terminal, plain `label: text` lines otherwise."""
    record = run.stage_record()
    rows = summary_lines(record, run.stage, run_args, wall_seconds)
    outputs = record.get("outputs") or {}
    # What the stage produced: final/ for a training stage, else its first output (eval: eval.json).
    product = run.final_dir if "final" in outputs or not outputs else run.root / next(iter(outputs.values()))
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


def _num(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
