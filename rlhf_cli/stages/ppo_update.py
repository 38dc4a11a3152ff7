"""The PPO update of one rollout batch (used by stages/ppo.py): epochs of shuffled mini-batches, each one actor
step and one critic step (rollout/update.py), plus InstructGPT's pretraining-data term.

Loss normalisation: both losses are token means over the mini-batch's valid response tokens on all ranks (summed
per micro-batch, divided by the global token count through `engine.backward`), so the split into micro-batches and
ranks does not change them; the ptx term is a token mean over the step's ptx targets, rescaled to that normaliser.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.data import build_sft_datasets, collate_sft
from rlhf_cli.errors import UserError
from rlhf_cli.losses import count_targets, sft_loss_sum
from rlhf_cli.metrics import Sums
from rlhf_cli.rollout.experience import Advantages, Rollout
from rlhf_cli.rollout.update import actor_step, critic_step
from rlhf_cli.stages.common import StepPlan, model_inputs

# Per-token sums accumulated over the update (then divided by the token count).
UPDATE_KEYS = ("policy_loss", "value_loss", "clipfrac_policy", "clipfrac_value", "approx_kl", "entropy")
# All the sums of a mini-batch: UPDATE_KEYS, all tokens forwarded, valid response tokens, sum of |log ratio|, ptx NLL
# sum and ptx target tokens. The actor and critic steps' sums with these names go in (the clip-higher and KL-loss
# sums are the critic-free methods').
PPO_SUMS = (*UPDATE_KEYS, "tokens", "valid", "abs_log_ratio", "ptx_sum", "ptx_tokens")


class PtxData:
    """InstructGPT's pretraining-data term: SFT-style batches, one set of micro-batches per optimizer step."""

    def __init__(self, st: Any, tokenizer: Any, seed: int, dist: Any):
        self.examples = build_sft_datasets(st.ptx.data, tokenizer, seed).train
        self.pad_id, self.seed, self.rank = tokenizer.pad_token_id, seed, dist.rank
        micro, accum = st.ptx.micro_batch_size, st.gradient_accumulation_steps
        per_epoch = len(self.examples) // (micro * accum * dist.world_size)
        if per_epoch == 0:
            raise UserError(
                f"stage.ptx.data holds {len(self.examples)} examples, fewer than one ptx batch of "
                f"{micro * accum * dist.world_size}; lower stage.ptx.micro_batch_size"
            )
        self.plan = StepPlan(len(self.examples), micro, accum, dist.world_size, per_epoch, 10**12)

    def micro_batches(self, update_index: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        idx = self.plan.rank_indices(update_index, self.rank, self.seed)
        micro = self.plan.micro_batch
        return [
            {
                k: v.to(device)
                for k, v in collate_sft([self.examples[i] for i in idx[j : j + micro]], self.pad_id).items()
            }
            for j in range(0, len(idx), micro)
        ]


def ppo_update(
    actor: Any, critic: Any, ro: Rollout, adv: Advantages, st: Any, iteration: int, seed: int, ptx: PtxData | None
) -> dict[str, float]:
    """`st.ppo_epochs` passes over the rollout in shuffled mini-batches; returns token-mean losses and statistics.
    With `st.target_kl`, the remaining mini-batches are skipped once a mini-batch's approximate KL (all ranks)
    exceeds it."""
    n = len(ro.prompts)
    mini = st.micro_batch_size * st.gradient_accumulation_steps
    n_mini = n // mini
    gen = torch.Generator().manual_seed(seed * 7919 + iteration)  # same shuffles after a resume
    sums = dict.fromkeys(PPO_SUMS, 0.0)  # over the update's mini-batches and all ranks
    first: dict[str, float] = {}
    steps, norm = 0, None
    # One flat loop over (epoch, mini-batch), so an early stop leaves it with a single break; the update index
    # (iteration x epochs x mini-batches + position) also picks the ptx batch.
    for update in range(st.ppo_epochs * n_mini):
        m = update % n_mini
        if m == 0:
            perm = torch.randperm(n, generator=gen)  # a new shuffle every PPO epoch
        ptx_batches = ptx.micro_batches(iteration * st.ppo_epochs * n_mini + update, ro.mask.device) if ptx else None
        mb, norm = minibatch_step(actor, critic, ro, adv, st, perm[m * mini : (m + 1) * mini], ptx_batches)
        for key, value in mb.items():
            sums[key] += value
        steps += 1
        approx_kl = mb["approx_kl"] / mb["valid"]
        if not first:  # before any optimizer step: the ratio must be 1 and the approximate KL 0
            first = {"log_ratio_first": mb["abs_log_ratio"] / mb["valid"], "approx_kl_first": approx_kl}
        if st.target_kl is not None and approx_kl > st.target_kl:
            break
    out = {k: sums[k] / sums["valid"] for k in UPDATE_KEYS}
    out["loss"] = out["policy_loss"] + st.vf_coef * out["value_loss"]
    if ptx:
        out["ptx_loss"] = sums["ptx_sum"] / max(sums["ptx_tokens"], 1.0)
    return {
        **out,
        **first,
        "tokens": sums["tokens"],
        "optimizer_steps": steps,
        "grad_norm": norm,
        "early_stopped": float(steps < st.ppo_epochs * n_mini),
    }


def minibatch_step(
    actor: Any, critic: Any, ro: Rollout, adv: Advantages, st: Any, idx: torch.Tensor, ptx_batches: list | None
) -> tuple[dict[str, float], float | None]:
    """One actor and one critic optimizer step on the rollout rows `idx`. Returns the sums over all ranks (named
    PPO_SUMS) and the actor's gradient norm."""
    n_tokens = float(eng.all_reduce_sum(ro.mask[idx].sum()))
    local_ptx = sum(count_targets(b["labels"]) for b in ptx_batches) if ptx_batches else 0
    ptx_tokens = float(eng.all_reduce_sum(local_ptx))
    ptx_nll = Sums("ptx_sum")  # this rank's

    def ptx_loss(c: int) -> torch.Tensor:
        """coef x (mean NLL over the step's ptx tokens), expressed in units of the PPO normaliser."""
        b = ptx_batches[c]
        nll, _ = sft_loss_sum(actor(**model_inputs(b)).logits, b["labels"])
        ptx_nll.add(ptx_sum=nll.detach())
        return st.ptx.coef * nll * (n_tokens / max(ptx_tokens, 1.0))

    actor_sums, norm = actor_step(actor, ro, adv.advantages, idx, st, n_tokens, ptx_loss if ptx_batches else None)
    critic_sums = critic_step(critic, ro, adv.returns, idx, st, n_tokens)
    mine = {**actor_sums.local(), **critic_sums.local(), **ptx_nll.local(), "ptx_tokens": local_ptx}
    local = Sums(*PPO_SUMS)
    local.add(**{key: mine[key] for key in PPO_SUMS})
    return local.all_reduced(), norm
