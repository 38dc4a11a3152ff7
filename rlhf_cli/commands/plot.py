"""`rlhf plot run.name=<run> [stage=<stage>] [run.root=runs]`: draw the training curves of a run's stages again, each
as <run>/<stage>/metrics.png, from its metrics.jsonl.

Every stage folder of the run that has metrics is drawn (a running or interrupted stage too: its curves so far), or
the one that stage= names. A stage writes the same PNG when it completes; this redraws it. Panels: loss and eval loss
(sft); loss, accuracy, margin, rewards (rm); loss, margin, accuracy, implicit rewards, chosen / rejected log-probs
(dpo); score and gold, KL, KL coefficient, proxy and gold reward against KL, losses (ppo; grpo, rloo and
reinforce_pp without a critic); best-of-N selection, held-out score, fine-tuning loss (rejection_sampling). A metric
the run did not log is left out.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhf_cli.commands.args import parse_key_values
from rlhf_cli.errors import UserError


@dataclass
class PlotArgs:
    # The run whose stages are drawn: the folder <run.root>/<run.name>/.
    run: str | None = None
    # The folder that holds the runs.
    root: str = "runs"
    # One stage of the run; unset: every stage that has metrics.
    stage: str | None = None


ARGS = PlotArgs  # for `rlhf plot --help`


def stage_folders(run_dir: Path) -> list[Path]:
    """The run's stage folders that have a metrics.jsonl and a plot, in the order they ran (the manifest's start
    times), then any the manifest does not name; the folders, not the manifest, decide, so a damaged manifest still
    plots."""
    from rlhf_cli.commands.runs import ran_order
    from rlhf_cli.plots import PANELS

    try:
        order = ran_order(json.loads((run_dir / "manifest.json").read_text())["stages"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # no manifest, or not one: by name
        order = []
    found = [p for p in run_dir.iterdir() if p.name in PANELS and (p / "metrics.jsonl").is_file()]
    return sorted(found, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))


def main(args: list[str]) -> int:
    from rlhf_cli.plots import plot_stage
    from rlhf_cli.run_dir import check_run_name

    a = parse_key_values(args, PlotArgs, "run.name=demo")
    if a.run is None:
        raise UserError("give the run: rlhf plot run.name=<name>, stage=<stage> for one stage (`rlhf runs` lists them)")
    check_run_name(a.run, "argument `run.name`")
    run_dir = Path(a.root) / a.run
    if not run_dir.is_dir():
        raise UserError(f"no run directory {run_dir}; check run.name= and run.root= (`rlhf runs root={a.root}` lists "
                        "the runs)")  # fmt: skip
    folders = stage_folders(run_dir)
    if a.stage is not None:
        check_run_name(a.stage, "argument `stage`")
        if not (run_dir / a.stage).is_dir():
            names = ", ".join(p.name for p in folders) or "none with metrics"
            raise UserError(f"run `{a.run}` has no stage `{a.stage}` (its stages: {names})")
        folders = [run_dir / a.stage]
    if not folders:
        raise UserError(f"run `{a.run}` has no stage with metrics to plot (no <stage>/metrics.jsonl in {run_dir})")
    drawn = 0
    for folder in folders:
        try:
            path, titles = plot_stage(folder)
        except UserError as err:  # one stage's empty metrics (it has just started) must not hide the others
            if a.stage is not None:
                raise
            print(f"{folder.name}: not drawn: {err}", file=sys.stderr)
            continue
        print(f"{folder.name}: {path}  ({', '.join(titles)})")
        drawn += 1
    if not drawn:
        raise UserError(f"nothing to plot in run `{a.run}`")
    return 0
