"""Evaluation examples split over the ranks (`eval_batches`), shared by every stage's evaluation (sft, rm, dpo, the
online stages' held-out evaluation in rollout/evaluation.py, and `rlhf eval`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EvalBatch:
    """One evaluation forward of one rank. `idx` (B,): example indices; `weight` (B,) float64: 1 for a real example,
    0 for a filler row, which repeats a real example only so that every rank runs the same forward."""

    idx: list[int]
    weight: torch.Tensor

    @property
    def real(self) -> torch.Tensor:
        """(B,) bool: the rows that count."""
        return self.weight > 0


def eval_batches(n_examples: int, batch_size: int, rank: int, world_size: int) -> list[EvalBatch]:
    """This rank's share of `n_examples` evaluation examples, as forwards of at most `batch_size` rows.

    Under ZeRO-3 every forward is a collective (each layer's parameters are all-gathered), so every rank must run
    the same number of forwards: rank r takes examples r, r + W, r + 2W, ... (W = `world_size`), filled up with
    weight-0 repeats to ceil(n / W) rows, so all ranks get the same batch sizes and every example counts exactly
    once over the ranks. A rank with no example of its own (n < W) repeats example 0. n = 0: no forwards."""
    per_rank = -(-n_examples // world_size)
    mine = list(range(rank, n_examples, world_size))
    fillers = per_rank - len(mine)
    idx = mine + [mine[0] if mine else 0] * fillers
    weight = torch.tensor([1.0] * len(mine) + [0.0] * fillers, dtype=torch.float64)
    return [EvalBatch(idx[j : j + batch_size], weight[j : j + batch_size]) for j in range(0, per_rank, batch_size)]
