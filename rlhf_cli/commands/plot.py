"""`rlhf plot [run.name=demo] [stage=<stage>] [run.root=runs]`: draw the training curves of a run's stages again, each
as <run>/<stage>/metrics.png, from its metrics.jsonl.

Every stage folder of the run that has metrics is drawn (a running or interrupted stage too: its curves so far), or
the one that stage= names. A stage writes the same PNG when it completes; this redraws it. Panels: loss and eval loss
(sft); loss, accuracy, margin, rewards (rm); loss, margin, accuracy, implicit rewards, chosen / rejected log-probs
(dpo); score and gold, KL, KL coefficient, proxy and gold reward against KL, losses (ppo; grpo, rloo and
reinforce_pp without a critic); best-of-N selection, held-out score, fine-tuning loss (rejection_sampling). A metric
the run did not log is left out; the gold metric has a y axis of its own, next to the reward's; a panel whose every
line holds one value (a fixed KL coefficient, one rejection-sampling round) is left out and the value named under the
title.

A damaged run is drawn as far as it can be: a stage that cannot be drawn (its metrics.jsonl unreadable or without a
row, its PNG not writable) is named on stderr with the reason and the others are drawn, and so are the lines of a
metrics.jsonl that are not rows and a manifest that cannot be read. Exit 0 when something was drawn, else one
`error:` line. Nothing but the <stage>/metrics.png files is written.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_cli.commands.args import DEFAULT_RUN, parse_key_values
from rlhf_cli.errors import UserError

if TYPE_CHECKING:
    from rlhf_cli.plots import Plotted


@dataclass
class PlotArgs:
    # The run whose stages are drawn: the folder <run.root>/<run.name>/ (the stages' default run).
    run: str = DEFAULT_RUN
    # The folder that holds the runs.
    root: str = "runs"
    # One stage of the run; unset: every stage that has metrics.
    stage: str | None = None


ARGS = PlotArgs  # for `rlhf plot --help`


def manifest_order(run_dir: Path) -> tuple[list[str], str | None]:
    """(the manifest's stages in the order they ran, why the manifest could not be read: None when it could or when
    there is none). Without one the stages are drawn in the order of their names."""
    from rlhf_cli.commands.runs import ran_order, reason
    from rlhf_cli.jsonsafe import load_json

    path = run_dir / "manifest.json"
    if not os.path.lexists(path):
        return [], None
    try:
        manifest = load_json(path)
    except (OSError, ValueError) as err:
        return [], f"manifest.json: {reason(err)}"
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    if not isinstance(stages, dict):
        return [], "manifest.json has no `stages` table"
    return ran_order(stages), None


def stage_folders(run_dir: Path, order: list[str] | None = None) -> list[Path]:
    """The run's stage folders that have a metrics.jsonl (whatever it is: one that cannot be read is named when it is
    drawn) and a plot, in `order` (default: the order they ran, `manifest_order`), then any it does not name; the
    folders, not the manifest, decide, so a damaged manifest still plots."""
    from rlhf_cli.commands.runs import reason
    from rlhf_cli.plots import PANELS

    order = manifest_order(run_dir)[0] if order is None else order
    try:
        found = [p for p in run_dir.iterdir() if p.name in PANELS and os.path.lexists(p / "metrics.jsonl")]
    except OSError as err:
        raise UserError(f"cannot read run directory {run_dir}: {reason(err)}") from None
    return sorted(found, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))


def main(args: list[str]) -> int:
    from rlhf_cli.commands.runs import printable
    from rlhf_cli.files import check_run_name

    a = parse_key_values(args, PlotArgs, "run.name=demo")
    check_run_name(a.run, "argument `run.name`")
    run_dir = Path(a.root) / a.run
    if not run_dir.is_dir():
        raise UserError(
            f"no run directory {run_dir}; check run.name= and run.root= (`rlhf runs root={a.root}` lists the runs)"
        )
    order, unread = manifest_order(run_dir)
    folders = stage_folders(run_dir, order)
    if a.stage is not None:
        check_run_name(a.stage, "argument `stage`")
        if not (run_dir / a.stage).is_dir():
            names = ", ".join(p.name for p in folders) or "none with metrics"
            raise UserError(f"run `{a.run}` has no stage `{a.stage}` (its stages: {names})")
        folders, unread = [run_dir / a.stage], None  # one stage: the manifest's order does not matter
    if not folders:
        raise UserError(f"run `{a.run}` has no stage with metrics to plot (no <stage>/metrics.jsonl in {run_dir})")
    notes = [f"{unread}; the stages are drawn in the order of their names"] if unread else []
    failed: dict[str, str] = {}  # stage -> why it was not drawn
    for folder in folders:
        plotted = _draw(folder)
        if isinstance(plotted, str):
            failed[folder.name] = plotted
            continue
        _say(f"{folder.name}: {plotted.path}  ({', '.join(plotted.titles)})")
        if plotted.skipped:
            notes.append(
                f"{folder.name}: skipped {plotted.skipped} of {plotted.lines} lines of metrics.jsonl (not "
                "JSON objects with a step)"
            )
    if len(failed) == len(folders):  # nothing drawn: one `error:` line, with the reason of each stage
        whys = list(failed.values()) if a.stage else [f"{name}: {why}" for name, why in failed.items()]
        raise UserError(printable(whys[0] if a.stage else f"nothing drawn for run `{a.run}`: " + "; ".join(whys)))
    for line in [*(f"{name}: not drawn: {why}" for name, why in failed.items()), *notes]:
        _say(line, sys.stderr)
    return 0


def _draw(folder: Path) -> Plotted | str:
    """plot_stage's result, or why the stage could not be drawn. Any exception is a reason: one stage's damaged
    metrics (or a matplotlib error on values it cannot scale) must not hide the others."""
    from rlhf_cli.plots import plot_stage

    try:
        return plot_stage(folder)
    except UserError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - reported with its type, as the end-of-stage plot does
        return f"{type(err).__name__}: {err}"


def _say(text: str, file: Any = None) -> None:
    """A line on stdout (or `file`), `printable`: a run name that is not UTF-8 must not make print() raise."""
    from rlhf_cli.commands.runs import printable

    print(printable(text), file=file or sys.stdout)
