"""The tables `rlhf pipeline` prints at its end and `rlhf runs` shows: per stage its status, time and key metrics
(first -> last), and the held-out evaluation's table."""

from __future__ import annotations

from pathlib import Path

from rlhf_cli.jsonsafe import load_json
from rlhf_cli.summary import as_table, finite, span

# The summary table's metrics per stage (first -> last); a stage not listed shows every headline metric.
KEY_METRICS = {
    "sft": ("eval_loss",),
    "rm": ("eval_accuracy",),
    "dpo": ("eval_reward_accuracy", "eval_loss"),
    "ppo": ("eval_score", "eval_gold", "kl"),
    "rejection_sampling": ("eval_score", "eval_gold"),
    **dict.fromkeys(("grpo", "rloo", "reinforce_pp"), ("eval_score", "eval_gold", "kl")),
}


def summary_table(run_dir: Path, stages: list[str]) -> list[str]:
    """Plain lines: per stage its status, wall time and headline metrics (first -> last), then the eval table. Read as
    `rlhf runs` reads a run: a field of the wrong type is shown as it is or as `-`, a file that cannot be read is
    named; never a traceback once every stage has run."""
    lines = [f"\npipeline summary: {run_dir}", f"  {'stage':<20} {'status':<10} {'time':>8}  headline"]
    try:
        records = as_table(as_table(load_json(run_dir / "manifest.json")).get("stages"))
    except (OSError, ValueError) as err:
        return [*lines, f"  manifest.json is not readable ({err})"]
    for stage in stages:
        rec = as_table(records.get(stage))
        summary = as_table(rec.get("summary"))
        seconds = summary.get("stage_seconds")
        wall = "-" if not finite(seconds) else f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
        headline = as_table(summary.get("headline"))
        keys = [k for k in KEY_METRICS.get(stage, ()) if k in headline] or list(headline)
        heads = ", ".join(f"{k} {span(headline[k])}" for k in keys)
        lines.append(f"  {stage:<20} {str(rec.get('status') or 'not run'):<10} {wall:>8}  {heads}")
    report = run_dir / "eval" / "eval.json"
    if "eval" in stages and report.is_file():
        lines += ["", *eval_lines(report)]
    return lines


def eval_lines(report: Path) -> list[str]:
    """The held-out evaluation's header line and table from eval.json; one line that names the damage instead when
    it cannot be read or is not the eval stage's report."""
    from rlhf_cli.rollout.comparison import table  # torch-free, but only the eval table needs it

    try:
        ev = load_json(report)
        how = "greedy" if not ev["temperature"] else f"{ev['n_samples']} samples at temperature {ev['temperature']:g}"
        return [
            f"held-out evaluation: {ev['prompts']} prompts, answers {how}, KL from {ev['kl_samples']} samples "
            f"per prompt; reference {ev['reference']}; mean +- standard error",
            *table(ev["results"]),
        ]
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as err:  # a field missing or of another type
        return [f"held-out evaluation: {report} is not readable ({type(err).__name__}: {err})"]
