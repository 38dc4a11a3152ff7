"""Training curves of a stage as one PNG next to its metrics: `<run>/<stage>/metrics.png`.

Drawn when a stage completes (summary.complete_stage) and again by `rlhf plot`. What a stage shows is its entry in
PANELS: panels, each a title and the metrics.jsonl keys drawn on it. A key the run did not log is left out and a panel
left with no key is not drawn, so a new stage needs only an entry here, and a run without evaluation (eval_every=0)
still gets its training curves. Every series is drawn against its own steps: evaluations are logged on fewer steps
than training metrics, often in rows of their own. A metrics.jsonl a crash or a hand edit damaged is drawn from the
rows that are left: lines that are not rows are skipped and counted, a value that is not a finite number is a gap.

matplotlib is imported here only, and only when a figure is drawn (its object API on the Agg canvas: no display, no
pyplot state), so the CLI starts without it.
"""

from __future__ import annotations

import bisect
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from rlhf_cli.errors import UserError
from rlhf_cli.jsonsafe import json_lines

PLOT_FILE = "metrics.png"
MARKERS_UP_TO = 40  # a series with this many points or fewer is drawn with markers, so a single evaluation shows


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]  # metrics.jsonl keys, one line each
    # The x axis: "step", or a metric (see `against`): the evaluation rewards against the rollouts' KL to the
    # reference, the reward over-optimisation curve of Gao et al. 2022.
    x: str = "step"
    # Keys drawn against a y axis of their own on the right: a gold accuracy (0-1) next to a reward model's score
    # (0-10) on one axis looks flat, and so does the gap between them that over-optimisation opens.
    right: tuple[str, ...] = ()
    ylabels: tuple[str, str] = ("", "")  # of the left and the right axis

    @property
    def all_keys(self) -> tuple[str, ...]:
        return self.keys + self.right


_LOSS = Panel("loss", ("loss", "eval_loss"))
_LR = Panel("learning rate", ("lr",))
_GOLD, _GOLD_LABELS = ("eval_gold",), ("reward score", "gold")
# The online stages: the proxy reward (reward model or function) next to the gold metric when the task has one.
_REWARD = Panel("reward (score) and gold", ("score_mean", "eval_score"), right=_GOLD, ylabels=_GOLD_LABELS)
_KL = Panel("KL to the reference", ("kl",))
_GOLD_VS_KL = Panel("proxy and gold reward vs KL", ("eval_score",), x="kl", right=_GOLD, ylabels=_GOLD_LABELS)
_LENGTH = Panel("response length", ("response_length", "eval_response_length"))
_CRITIC_FREE = (
    _REWARD,
    _KL,
    _GOLD_VS_KL,
    Panel("groups with zero reward variance", ("zero_variance_groups",)),
    Panel("policy loss", ("policy_loss",)),
    Panel("entropy", ("entropy",)),
    _LENGTH,
)

PANELS: dict[str, tuple[Panel, ...]] = {
    "sft": (_LOSS, Panel("eval perplexity", ("eval_perplexity",)), _LR),
    "rm": (
        _LOSS,
        Panel("accuracy", ("accuracy", "eval_accuracy")),
        Panel("margin", ("margin", "eval_margin")),
        Panel("rewards", ("reward_chosen", "reward_rejected", "reward_mean")),
    ),
    "dpo": (
        _LOSS,
        Panel("reward margin", ("reward_margin", "eval_reward_margin")),
        Panel("reward accuracy", ("reward_accuracy", "eval_reward_accuracy")),
        Panel("implicit rewards", ("reward_chosen", "reward_rejected", "eval_reward_chosen", "eval_reward_rejected")),
        Panel("log-probs", ("logps_chosen", "logps_rejected", "eval_logps_chosen", "eval_logps_rejected")),
    ),
    "ppo": (
        _REWARD,
        _KL,
        Panel("KL coefficient", ("kl_coef",)),
        _GOLD_VS_KL,
        Panel("losses", ("policy_loss", "value_loss")),
        Panel("explained variance", ("explained_variance",)),
        _LENGTH,
    ),
    # Selection rows sit at the step where their round's fine-tuning starts, evaluations where it ends.
    "rejection_sampling": (
        Panel("best-of-N selection", ("candidate_score_mean", "selected_score_mean")),
        Panel("held-out score and gold", ("eval_score",), right=_GOLD, ylabels=_GOLD_LABELS),
        Panel("fine-tuning loss", ("loss",)),
        Panel("held-out response length", ("eval_response_length",)),
    ),
    **dict.fromkeys(("grpo", "rloo", "reinforce_pp"), _CRITIC_FREE),
}


class Plotted(NamedTuple):
    path: Path  # the PNG
    titles: list[str]  # of the panels drawn
    skipped: int  # lines of metrics.jsonl that are not rows
    lines: int  # of metrics.jsonl, blank ones left out


def load_rows(path: Path) -> tuple[list[dict], int]:
    """(the rows of a metrics.jsonl, how many of its lines are not rows). A row is a JSON object with an integer
    `step` (one a float holds exactly); anything else, a crash's torn last line above all, is skipped. OSError when
    the file cannot be read (jsonsafe.read_regular)."""
    values, bad = json_lines(path)
    rows = [v for v in values if isinstance(v, dict) and _is_step(v.get("step"))]
    return rows, bad + len(values) - len(rows)


def read_rows(path: Path) -> list[dict]:
    return load_rows(path)[0]


def _is_step(step: Any) -> bool:
    return type(step) is int and abs(step) < 2**53  # not a bool; a larger one would be drawn at a rounded x


DRAWABLE = 1e300  # a larger magnitude is a gap: matplotlib's axis range (max - min, plus margins) would overflow


def _value(value: Any) -> float:
    """A logged number as a float to draw; NaN (a gap in the line) for one no axis can be scaled to: infinite, too
    large for a float, or near the float limit."""
    try:
        number = float(value)
    except OverflowError:  # an int of hundreds of digits
        return math.nan
    return number if abs(number) <= DRAWABLE else math.nan  # NaN stays NaN: the comparison is false


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, by step. A step logged twice keeps its later value: a file written before resumes
    dropped the replayed rows holds the replay after the original, and the replay is what the run continued from."""
    by_step: dict[int, float] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            by_step[row["step"]] = _value(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def against(rows: list[dict], key: str, x: str) -> tuple[list[float], list[float]]:
    """(x, values) of `key`, in step order, each value at the `x` of the first step after its own (the last `x`
    logged when none follows). Why after: the online stages log an iteration's KL from its rollout, sampled before
    its update, and evaluate after the update, so the evaluation at step N judges the policy that step N + 1's
    rollout samples (the starting evaluation, step 0, gets step 1's KL: 0 when the reference is the start)."""
    x_steps, x_values = series(rows, x)
    if not x_steps:
        return [], []
    xs, ys = [], []
    for step, value in zip(*series(rows, key), strict=True):
        xs.append(x_values[min(bisect.bisect_right(x_steps, step), len(x_steps) - 1)])
        ys.append(value)
    return xs, ys


Line = tuple[str, list[float], list[float]]  # (label, x, y)


def _lines(panel: Panel, rows: list[dict], keys: tuple[str, ...] | None = None) -> list[Line]:
    """(label, x, y) of each key of `panel` (or of `keys`) that has points in `rows`."""
    out = []
    for key in panel.keys if keys is None else keys:
        xs, ys = series(rows, key) if panel.x == "step" else against(rows, key, panel.x)
        if any(math.isfinite(y) for y in ys):
            out.append((key, xs, ys))
    return out


def _varies(line: Line) -> bool:
    return len({y for y in line[2] if math.isfinite(y)}) > 1


def panels_to_draw(stage: str, rows: list[dict]) -> tuple[list[tuple[Panel, list[Line], list[Line]]], list[str]]:
    """([(panel, its left-axis lines, its right-axis lines)], `key value` of each line left out). A panel none of whose
    lines changes (a fixed KL coefficient, the one round of a one-round rejection sampling) shows nothing a number
    would not: it is left out and its value goes under the figure's title. When no panel changes (a one-step run),
    every panel with data is drawn."""
    found = []
    for p in PANELS[stage]:
        left, right = _lines(p, rows), _lines(p, rows, p.right)
        if left or right:
            found.append((p, left, right) if left else (p, right, []))  # gold alone: on the first axis
    drawn = [f for f in found if any(_varies(line) for line in f[1] + f[2])] or found
    left_out = [f"{label} {_last(ys):.4g}" for f in found if f not in drawn for label, _, ys in f[1] + f[2]]
    return drawn, left_out


def _last(ys: list[float]) -> float:
    return [y for y in ys if math.isfinite(y)][-1]


def draw(stage: str, rows: list[dict], title: str) -> Any:
    """A matplotlib Figure with one axes per panel of `stage` that has data and changes (`panels_to_draw`; the axes'
    titles are the panels'), and a second y axis on the right of a panel for the keys it puts there."""
    from matplotlib.figure import Figure

    panels, left_out = panels_to_draw(stage, rows)
    if not panels:
        keys = sorted({k for p in PANELS[stage] for k in p.all_keys})
        raise UserError(f"nothing to plot for {stage}: its metrics.jsonl has none of {', '.join(keys)}")
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    note = textwrap.wrap("one value throughout, not drawn: " + ", ".join(left_out), 70 * cols) if left_out else []
    top = 0.65 + 0.16 * len(note)  # inches above the first row: the title, then the note's lines
    width, height = 4.6 * cols, 3.3 * nrows + top - 0.25
    fig = Figure(figsize=(width, height))
    # Fixed margins in inches rather than a layout engine: constrained or tight layout measures every label in an
    # extra drawing pass, which doubles the time of the save, paid by every completed stage. The right margin holds
    # a second y axis's numbers.
    fig.subplots_adjust(
        left=0.75 / width, right=1 - 0.6 / width, bottom=0.5 / height, top=1 - top / height, wspace=0.42, hspace=0.42
    )
    fig.suptitle(title, y=1 - 0.1 / height, va="top")
    if note:
        fig.text(0.5, 1 - 0.4 / height, "\n".join(note), ha="center", va="top", fontsize=8, color="0.35")
    axes = list(fig.subplots(nrows, cols, squeeze=False).flat)
    for ax, (panel, left, right) in zip(axes, panels, strict=False):
        _draw_panel(ax, panel, left, right)
    for ax in axes[len(panels) :]:  # the empty cells of the last row
        fig.delaxes(ax)
    return fig


def _draw_panel(ax: Any, panel: Panel, left: list[Line], right: list[Line]) -> None:
    """The lines of one panel; `right` on a twin y axis. Colours run on over both axes (a twin axis would start its
    own cycle and draw the gold in the score's colour), and one legend names the lines of both."""
    twin = ax.twinx() if right else None
    handles = []
    for i, (label, xs, ys) in enumerate(left + right):
        target = ax if i < len(left) else twin
        few = len(xs) <= MARKERS_UP_TO
        # Against a metric the points are a path in step order that may turn back: markers on a thin line.
        style = {"linewidth": 1.2} if panel.x == "step" else {"linewidth": 0.6, "linestyle": ":"}
        label = label if target is ax else f"{label} (right axis)"
        handles += target.plot(
            xs, ys, label=label, color=f"C{i}", marker="o" if few or panel.x != "step" else None, markersize=3, **style
        )
    if twin is not None:
        ax.set_ylabel(panel.ylabels[0], fontsize=9)
        twin.set_ylabel(panel.ylabels[1], fontsize=9, color=f"C{len(left)}")
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.x if panel.x == "step" else f"{panel.x} of the rollout after each evaluation")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8)


def plot_stage(stage_dir: Path, stage: str | None = None) -> Plotted:
    """Draw `<stage_dir>/metrics.png` from `<stage_dir>/metrics.jsonl` (the stage: the folder's name unless given).
    A metrics.jsonl that cannot be read, has no row to draw or a PNG that cannot be written is a UserError that
    says which."""
    stage = stage or stage_dir.name
    if stage not in PANELS:
        raise UserError(f"no plot is defined for stage `{stage}` (plots exist for {', '.join(PANELS)})")
    metrics = stage_dir / "metrics.jsonl"
    if not os.path.lexists(metrics):
        raise UserError(f"{stage} has no metrics to plot: {metrics} does not exist")
    try:
        rows, skipped = load_rows(metrics)
    except OSError as err:
        raise UserError(f"cannot read {metrics}: {err.strerror or err}") from None
    lines = len(rows) + skipped
    try:
        fig = draw(stage, rows, _drawable(f"{stage_dir.parent.name} / {stage}"))
    except UserError as err:
        why = f" ({skipped} of its {lines} lines are not rows)" if skipped else ""
        raise UserError(f"{err}{why}") from None
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]  # a panel's twin y axis has none
    return Plotted(save_png(fig, stage_dir / PLOT_FILE), titles, skipped, lines)


def _drawable(text: str) -> str:
    """`text` with each lone surrogate (how Python holds the bytes of a file name that is not UTF-8) made U+FFFD,
    the replacement character: matplotlib's font code refuses the surrogates."""
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


def save_png(fig: Any, out: Path) -> Path:
    """Write `fig` to `out` under a temporary name, then rename it: a reader never sees a half-written PNG, and a
    failure leaves the previous one. The temporary file is created new (O_EXCL), so that nothing already there (a
    link to some other file, say) is written through. A failure to write is a UserError."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides, as for any new file
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    try:
        with open(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=90)
        os.replace(tmp, out)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)  # ours: created above
    return out
