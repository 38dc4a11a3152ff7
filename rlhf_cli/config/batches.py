"""The batch rules of PPO and the critic-free stages and the number of ranks a stage plans for, without torch or a
model: checked when the config is composed (the registry's cross-key checks, rlhf_cli/registry.py) and again when the
stage or `rlhf explain` plans its iterations (stages/plan.py), with the same messages."""

from __future__ import annotations

import os
from typing import Any

from rlhf_cli.errors import UserError


def planned_world_size(cfg: Any) -> int:
    """Ranks a stage runs on: an outside launcher's WORLD_SIZE, else what `rlhf` starts itself (launcher.*)."""
    return int(os.environ.get("WORLD_SIZE") or cfg.launcher.nproc_per_node * cfg.launcher.nnodes)


def mini_batch(st: Any) -> int:
    """PPO's mini-batch per rank: one actor and one critic optimizer step each."""
    return st.micro_batch_size * st.gradient_accumulation_steps


def check_ppo_batches(st: Any) -> None:
    """PPO's rollout batch (per rank) splits into whole mini-batches (also checked when the config is composed)."""
    if st.rollout_batch_size % mini_batch(st):
        raise UserError(
            f"stage.rollout_batch_size={st.rollout_batch_size} is not a multiple of the mini-batch "
            f"stage.micro_batch_size x stage.gradient_accumulation_steps = {mini_batch(st)}; change one of them"
        )


def check_groups(st: Any) -> None:
    """The group estimators need two samples of a prompt or more."""
    from rlhf_cli.config.online import compares_group

    if compares_group(st) and st.n_samples < 2:
        raise UserError(
            f"stage.advantage={st.advantage} compares the samples of a prompt: stage.n_samples must be "
            f">= 2 (got {st.n_samples}); with one sample every advantage is 0"
        )


def critic_free_rows(st: Any, world_size: int) -> int:
    """Rollout rows per rank of a critic-free iteration: rollout_batch_size prompts x n_samples responses, dealt
    evenly over the ranks, a whole number of mini-batches each (a prompt's group may straddle two ranks)."""
    rows = st.rollout_batch_size * st.n_samples
    if rows % world_size:
        raise UserError(
            f"stage.rollout_batch_size x stage.n_samples = {rows} rollout rows cannot be dealt evenly to "
            f"{world_size} ranks; make it a multiple of the number of processes"
        )
    per_rank = rows // world_size
    if per_rank % mini_batch(st):
        raise UserError(
            f"{per_rank} rollout rows per rank (stage.rollout_batch_size x stage.n_samples / {world_size} "
            f"rank(s)) is not a multiple of the mini-batch stage.micro_batch_size x "
            f"stage.gradient_accumulation_steps = {mini_batch(st)}; change one of them"
        )
    if getattr(st, "dynamic_sampling", False) and st.rollout_batch_size % world_size:  # distill has none
        raise UserError(
            f"stage.dynamic_sampling replaces whole groups on each rank: stage.rollout_batch_size="
            f"{st.rollout_batch_size} must be a multiple of the {world_size} ranks"
        )
    return per_rank
