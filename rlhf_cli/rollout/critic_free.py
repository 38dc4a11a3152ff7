"""The advantages of the critic-free methods for one rollout batch (docs/algorithms.md section 8), on top of the pure
functions in losses/critic_free.py: GRPO (group-normalised), RLOO (leave-one-out, sequence KL in the reward),
REINFORCE++ (per-token KL in the reward, discounted returns, whitened over all ranks) and its group-baseline variant.

Layout: an iteration's rows are its prompts x n_samples, a prompt's samples consecutive, dealt to the ranks in order
(rank r holds global rows [r M, (r + 1) M)), so a prompt's group may straddle two ranks. Everything a group statistic
needs (scores, sequence KLs) is gathered over the ranks in row order first and each rank keeps its own rows: the
advantages are those of one process holding the whole batch. Batch-wide statistics (REINFORCE++'s whitening) are
all-reduced. Every function here is collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.config.online import baseline, compares_group
from rlhf_cli.losses.critic_free import (
    aggregation_weights,
    global_whiten,
    group_advantages,
    group_stats,
    mask_truncated,
    reinforce_pp_returns,
    rloo_advantages,
    sequence_k1,
    zero_variance_fraction,
)
from rlhf_cli.losses.ppo import kl_penalty
from rlhf_cli.rollout.experience import Advantages, Rollout


@dataclass
class Estimate:
    """`advantages` (B, R): what the surrogate reads (a sequence advantage repeated on its tokens, or per-token
    returns), 0 off the loss; `weights` (B, R): the loss aggregation's per-token weights (0 for tokens out of the
    loss: padding, unscorable rows, truncated rows with mask_truncated); `loss_mask` (B, R) the tokens in the loss;
    `stats` the batch-level statistics (identical on every rank)."""

    advantages: Advantages
    weights: torch.Tensor
    loss_mask: torch.Tensor
    stats: dict[str, float]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (B,) in global row order (rank order), float64 on the CPU: (N,)."""
    return eng.all_gather_cat(x.detach().double().cpu())


@torch.no_grad()
def estimate(ro: Rollout, st: Any, offset: int, filler: torch.Tensor | None = None) -> Estimate:
    """The advantages of `st.advantage` for this rank's rows (global rows [offset, offset + B)), with the loss
    weights of `st.loss_aggregation`. Needs the rollout's log-probs and reference log-probs when a KL enters the
    reward (rloo / reinforce_pp with kl_coef > 0). `filler` (B,) bool: the rows of groups that dynamic sampling only
    added to fill the batch (`critic_free_update.dynamic_rollout`); under the group estimators they are out of the
    loss and of every statistic, as if DAPO had dropped them."""
    mask, n = ro.mask, ro.mask.shape[0]
    mine = slice(offset, offset + n)
    scores = gather_rows(ro.scores.shaped)
    # The tokens in the loss: a response the reward could not score (NaN) is out of it and of every statistic, and
    # with mask_truncated so is one without EOS. REINFORCE++ whitens over exactly these tokens.
    loss_mask = mask * torch.isfinite(scores[mine]).to(mask)[:, None]
    if st.mask_truncated:
        loss_mask = mask_truncated(loss_mask, ro.seq.has_eos)
    if filler is not None and compares_group(st):
        # A filler group's scores are all equal: no signal against its own group. Yet REINFORCE++-baseline's global
        # whitening would give it -mean/std of the batch (OpenRLHF's rule, kept for real groups) and RLOO's KL a
        # non-zero advantage, a gradient from a group DAPO drops. Plain REINFORCE++ compares with the batch, not
        # the group: there an all-equal group has a signal and stays.
        loss_mask = loss_mask * (~filler.to(mask.device)).to(mask)[:, None]
    stats: dict[str, float] = {}
    if compares_group(st):
        stats["zero_variance_groups"] = zero_variance_fraction(scores, st.n_samples)
    if baseline(st) == "group":
        per_token = group_advantages(scores, st.n_samples, st.scale_rewards)[0][mine].to(mask)[:, None] * mask
    elif baseline(st) == "leave_one_out":
        seq_kl = sequence_k1(ro.logprobs, ro.ref_logprobs, mask) if st.kl_coef else torch.zeros(n)
        adv = rloo_advantages(scores, st.n_samples, gather_rows(seq_kl), st.kl_coef)[0]
        per_token = adv[mine].to(mask)[:, None] * mask
    else:
        per_token = reinforce_pp(ro, st, scores, mine, loss_mask)
    weights = aggregation_weights(loss_mask, st.loss_aggregation, st.generation.max_new_tokens)
    total, count = eng.all_reduce_sum(torch.stack([(per_token * loss_mask).sum(), loss_mask.sum()]).double()).tolist()
    stats["advantage_mean"] = total / max(count, 1.0)
    return Estimate(Advantages(per_token * loss_mask), weights, loss_mask, stats)


def reinforce_pp(ro: Rollout, st: Any, scores: torch.Tensor, mine: slice, loss_mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE++ (and -baseline): per-token k1 to the reference in the reward (rollout log-probs, detached), the
    score (minus its group's mean for the baseline variant, over the whole gathered group) on the last token,
    discounted returns (`st.gamma`), whitened over every rank's tokens of `loss_mask`. -> (B, R) advantages."""
    mask = ro.mask
    kl = kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") * mask if st.kl_coef else torch.zeros_like(mask)
    outcome = scores
    if baseline(st) == "group_mean":
        outcome = scores - group_stats(scores.float(), st.n_samples)[0].double().repeat_interleave(st.n_samples)
    local = outcome[mine].to(device=mask.device, dtype=torch.float32)
    returns, _ = reinforce_pp_returns(kl, local, mask, st.kl_coef, st.gamma)
    return global_whiten(returns, loss_mask, all_reduce=eng.all_reduce_sum)
