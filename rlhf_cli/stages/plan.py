"""Batch algebra without torch, DeepSpeed or a model: the step plan of every stage and PPO's iteration plan.

Pure functions of the config and the number of examples, so `rlhf explain` prints exactly what a stage will do (the
same functions, the same messages) without importing the stage. The batch rules they apply, which composition checks
too, are in config/batches.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rlhf_cli.config.batches import check_ppo_batches, critic_free_rows, mini_batch
from rlhf_cli.data.attention import FLAT_ATTENTION, PACKED_ATTENTION, SHARED_PROMPT_ATTENTION
from rlhf_cli.errors import UserError

# How wide a packed row is, per attention implementation (data/packing.py `plan_cheapest`).
ROW_LINES = {
    "sdpa": "rows: 1, 1.25, 1.5 or 2 x the step's longest {item}, the cheapest width (matmuls + masked attention) "
    "that adds no forward",
    "eager": "rows: as long as the step's longest {item} (eager's attention weights grow with the row)",
    **{attn: "rows: one flattened row per forward (varlen kernels)" for attn in FLAT_ATTENTION},
}


def packing_summary(data_cfg: Any, st: Any, attn_implementation: str, per_item: int) -> list[str]:
    """How SFT / RM / DPO lay out a step (`data.packing`, `data.max_tokens_per_batch`), for `rlhf explain`: lines.
    `per_item`: sequences per example (2 for a preference pair)."""
    if data_cfg.packing is False:
        return ["  packing: off (data.packing=false): padded micro-batches"]
    if attn_implementation not in PACKED_ATTENTION:
        state = "refused" if data_cfg.packing else "off"
        return [f"  packing: {state} (model.attn_implementation={attn_implementation} cannot keep examples apart)"]
    item = "pair" if per_item == 2 else "example"
    budget = data_cfg.max_tokens_per_batch
    size = f"{budget} tokens" if budget else f"micro {st.micro_batch_size} x the step's longest {item}"
    when = "on (data.packing=true)" if data_cfg.packing else "on where supported (data.packing=null: tested decoders)"
    lines = [
        f"  packing: {when}; same loss and gradients as padded",
        f"    forwards of up to {size} (data.max_tokens_per_batch), each {item} whole in one",
        f"    {ROW_LINES.get(attn_implementation, ROW_LINES['eager']).format(item=item)}",
    ]
    if per_item == 2:
        lines.append(f"    {shared_prompt_line(data_cfg.share_prompt, attn_implementation)}")
    return lines


def shared_prompt_line(requested: bool | None, attn_implementation: str) -> str:
    """What `data.share_prompt` does for a packed pair stage with this attention implementation (`rlhf explain`)."""
    if requested is False:
        return "prompt: once per reply (data.share_prompt=false)"
    if attn_implementation not in SHARED_PROMPT_ATTENTION:
        state = "refused" if requested else "once per reply"
        return f"prompt: {state} (data.share_prompt needs sdpa or eager attention for its explicit mask)"
    when = "data.share_prompt=true" if requested else "data.share_prompt=null: where the model takes the mask"
    return f"prompt: computed once for both replies ({when}; same loss and gradients)"


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
        import torch  # here, not at the top: `rlhf explain` reads the plan without loading torch

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


def iteration_plan(n_prompts: int, st: Any, world_size: int) -> StepPlan:
    """Prompts per iteration = rollout_batch_size per rank; the data position is a pure function of the iteration."""
    check_ppo_batches(st)
    per_iteration = st.rollout_batch_size * world_size
    per_epoch = n_prompts // per_iteration
    if per_epoch == 0:
        raise UserError(
            f"only {n_prompts} training prompts for {per_iteration} prompts per iteration; lower "
            "stage.rollout_batch_size or add prompts"
        )
    total = st.max_steps or math.ceil(st.epochs * per_epoch)
    return StepPlan(n_prompts, st.rollout_batch_size, 1, world_size, per_epoch, max(1, total))


def ppo_updates(plan: StepPlan, st: Any) -> int:
    """Optimizer steps of the actor (and as many of the critic) over the whole stage: the schedules' length."""
    return plan.total_steps * st.ppo_epochs * (st.rollout_batch_size // mini_batch(st))


def describe_plan(plan: StepPlan, st: Any) -> str:
    return (
        f"{plan.n_examples} prompts, {plan.global_batch} per iteration ({st.rollout_batch_size} x "
        f"{plan.world_size} rank(s)); {plan.total_steps} iterations of {st.ppo_epochs} PPO epoch(s) x "
        f"{st.rollout_batch_size // mini_batch(st)} mini-batch(es) of {mini_batch(st)} per rank"
    )


def critic_free_plan(n_prompts: int, st: Any, world_size: int) -> StepPlan:
    """The iterations of a critic-free stage: rollout_batch_size prompts per iteration (all ranks together), the
    data position a pure function of the iteration (`StepPlan.rank_indices(step, 0, seed)` gives every rank the
    iteration's prompts)."""
    critic_free_rows(st, world_size)
    per_epoch = n_prompts // st.rollout_batch_size
    if per_epoch == 0:
        raise UserError(
            f"only {n_prompts} training prompts for {st.rollout_batch_size} prompts per iteration; lower "
            "stage.rollout_batch_size or add prompts"
        )
    total = st.max_steps or math.ceil(st.epochs * per_epoch)
    return StepPlan(n_prompts, st.rollout_batch_size, 1, 1, per_epoch, max(1, total))


def critic_free_updates(plan: StepPlan, st: Any, world_size: int) -> int:
    """Optimizer steps over the whole stage (the schedule's length)."""
    return plan.total_steps * st.ppo_epochs * (critic_free_rows(st, world_size) // mini_batch(st))


def describe_critic_free(plan: StepPlan, st: Any, world_size: int) -> str:
    rows = critic_free_rows(st, world_size)
    return (
        f"{plan.n_examples} prompts, {st.rollout_batch_size} per iteration x {st.n_samples} samples = "
        f"{st.rollout_batch_size * st.n_samples} rows ({rows} per rank on {world_size} rank(s)); "
        f"{plan.total_steps} iterations of {st.ppo_epochs} epoch(s) x {rows // mini_batch(st)} mini-batch(es) of "
        f"{mini_batch(st)} rows per rank; advantage {st.advantage}"
    )
