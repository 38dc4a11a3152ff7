"""Pure statistics of `rlhf eval` (stages/eval.py): win values against a reference, and means with their standard
errors from sums that every rank adds up (so the result of several ranks equals one process's).

torch is imported inside the functions that compute: `table` prints a finished evaluation again (`rlhf runs`, the
pipeline's summary) in a process that needs no torch."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The per-response quantities `rlhf eval` averages, in the order of the rows of a `Sums` tensor.
QUANTITIES = ("reward", "win", "kl", "gold", "length", "eos")
# The summary's keys as the table shows them.
COLUMNS = (
    ("reward_mean", "reward"),
    ("win_rate", "win rate"),
    ("kl", "KL"),
    ("gold_mean", "gold"),
    ("response_length", "length"),
    ("eos_rate", "EOS"),
    ("judge_logp_token", "judge logp/tok"),  # `rlhf eval stage.judge=...`: the judge's log-likelihood of the answers
    ("judge_logp_seq", "judge logp/seq"),
)


def win_values(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """1 where the policy's response scored higher than the reference's response to the same prompt (and sample
    index), 0 where lower, 0.5 for a tie; NaN where either has no score. (B,), (B,) -> (B,) float64."""
    import torch

    s, r = scores.double(), reference.double()
    win = torch.where(s > r, 1.0, torch.where(s < r, 0.0, 0.5)).double()
    return torch.where(torch.isfinite(s) & torch.isfinite(r), win, torch.nan)


def moment_sums(values: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """(len(QUANTITIES), 3) float64 of (count, sum, sum of squares) per quantity over the rows with `weight` 1 and a
    finite value (weight 0: a filler row that only keeps the ranks' forwards in step). values: name -> (B,)."""
    import torch

    out = torch.zeros(len(QUANTITIES), 3, dtype=torch.float64)
    for i, name in enumerate(QUANTITIES):
        if name not in values:
            continue
        v = values[name].detach().double().cpu()
        keep = (weight.double().cpu() > 0) & torch.isfinite(v)
        v = torch.where(keep, v, 0.0)
        out[i] = torch.stack([keep.double().sum(), v.sum(), (v * v).sum()])
    return out


def mean_and_se(count: float, total: float, squares: float) -> tuple[float, float]:
    """The mean and its standard error (sample std with Bessel's correction / sqrt(count)); NaN without values, a
    standard error of 0 with one value."""
    if count <= 0:
        return math.nan, math.nan
    mean = total / count
    if count < 2:
        return mean, 0.0
    var = max(squares - count * mean * mean, 0.0) / (count - 1)
    return mean, math.sqrt(var / count)


def summarise(sums: torch.Tensor) -> dict[str, float]:
    """`moment_sums` added over batches and ranks -> {quantity: mean, quantity_se: its standard error} for every
    quantity that has values (reward_mean, win_rate, kl, gold_mean, response_length, eos_rate)."""
    names = {
        "reward": "reward_mean",
        "win": "win_rate",
        "kl": "kl",
        "gold": "gold_mean",
        "length": "response_length",
        "eos": "eos_rate",
    }
    out: dict[str, float] = {}
    for i, quantity in enumerate(QUANTITIES):
        count, total, squares = sums[i].tolist()
        if count > 0:
            mean, se = mean_and_se(count, total, squares)
            out[names[quantity]], out[names[quantity] + "_se"] = mean, se
    if out:
        out["responses"] = float(sums[:, 0].max())
    return out


def table(rows: dict[str, dict[str, float]]) -> list[str]:
    """Plain lines: a header, then one per policy with mean +- standard error of each quantity that was measured."""
    keys = [(k, title) for k, title in COLUMNS if any(k in r for r in rows.values())]
    width = max(len(name) for name in rows)
    lines = [f"  {'policy':<{width}}" + "".join(f"{title:>18}" for _, title in keys)]
    for name, row in rows.items():
        cells = [f"{row[k]:.3f} +- {row[k + '_se']:.3f}" if k in row else "-" for k, _ in keys]
        lines.append(f"  {name:<{width}}" + "".join(f"{cell:>18}" for cell in cells))
    return lines
