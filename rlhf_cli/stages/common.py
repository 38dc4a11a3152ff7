"""Functions the training stages share (no base class): the step plan, model inputs, export of final/."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_cli.errors import UserError


@dataclass(frozen=True)
class StepPlan:
    """Batch algebra of an offline stage. The data position is a pure function of the step number, so a
    resumed run sees exactly the examples an uninterrupted run would, none twice and none skipped."""

    n_examples: int
    micro_batch: int
    grad_accum: int
    world_size: int
    steps_per_epoch: int
    total_steps: int

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.grad_accum

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world_size

    def rank_indices(self, step: int, rank: int, seed: int) -> list[int]:
        """Example indices of `rank` for optimizer step `step` (0-based): a seeded permutation per epoch,
        cut into global batches; each rank takes a contiguous slice of the global batch."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(self.n_examples, generator=gen)
        start = pos * self.global_batch + rank * self.per_rank
        return perm[start : start + self.per_rank].tolist()

    def describe(self) -> str:
        return (
            f"{self.n_examples} examples, global batch {self.global_batch} = micro {self.micro_batch} x "
            f"accumulation {self.grad_accum} x {self.world_size} rank(s); {self.steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps"
        )


def step_plan(n_examples: int, stage_cfg: Any, world_size: int) -> StepPlan:
    micro, accum = stage_cfg.micro_batch_size, stage_cfg.gradient_accumulation_steps
    global_batch = micro * accum * world_size
    steps_per_epoch = n_examples // global_batch  # the last partial batch of an epoch is dropped
    if steps_per_epoch == 0:
        raise UserError(
            f"only {n_examples} training examples for a global batch of {global_batch}; lower "
            f"stage.micro_batch_size or stage.gradient_accumulation_steps, or add data"
        )
    total = stage_cfg.max_steps or math.ceil(stage_cfg.epochs * steps_per_epoch)
    return StepPlan(n_examples, micro, accum, world_size, steps_per_epoch, max(1, total))


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the model's forward takes (labels stay out: our losses are computed outside)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
