"""Optimizer steps on rollout rows (docs/algorithms.md sections 4.6-4.7): the actor's clipped-surrogate step and the
critic's clipped-value step, separate so that critic-free methods (GRPO, RLOO, REINFORCE++) use the actor step alone.

Loss normalisation: a step's loss is a token mean over its rows' valid response tokens on all ranks: each
micro-batch's summed loss goes to `engine.backward` with `n_tokens`, the step's global count of valid tokens, so the
split into micro-batches and ranks does not change it. Each function returns this rank's sums (float64, CPU) for
the caller to all-reduce with whatever else it counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.losses.critic_free import k3_kl_loss
from rlhf_cli.losses.policy_losses import clipped_rows, policy_surrogate
from rlhf_cli.losses.ppo import LOG_RATIO_CLAMP, entropy_from_logits, masked_sum, policy_loss, value_loss
from rlhf_cli.metrics import Sums
from rlhf_cli.rollout.experience import Rollout, critic_values
from rlhf_cli.rollout.generation import response_logits, response_logprobs

# This rank's per-token sums of an actor step: losses and statistics, all forwarded tokens, valid response tokens,
# |log ratio|, then the tokens clipped at 1 - eps_low and at 1 + eps_high, the k3 KL to the reference (the loss
# term) and its k1 (log pi_theta - log pi_ref, detached: the critic-free stages' `kl` where the rollout has no
# log-probs of its own); then per row: the rows with a valid token and those with a token clipped low / high (GSPO
# clips whole sequences: its clip fraction counts rows).
ACTOR_SUMS = (
    "policy_loss",
    "clipfrac_policy",
    "approx_kl",
    "entropy",
    "tokens",
    "valid",
    "abs_log_ratio",
    "clipfrac_low",
    "clipfrac_high",
    "kl_loss",
    "ref_k1",
    "seqs",
    "clipped_seqs_low",
    "clipped_seqs_high",
)
CRITIC_SUMS = ("value_loss", "clipfrac_value")


@dataclass(frozen=True)
class Objective:
    """The actor loss of a critic-free method (GRPO / RLOO / REINFORCE++), where PPO's is the default: the surrogate
    `policy_loss` (`losses.policy_losses.POLICY_LOSSES`: the token-level clipped ratio, GSPO's sequence ratio or
    CISPO's clipped weight) with its low / high ranges (DAPO clip-higher), per-token `weights` (B, R) that carry the
    loss aggregation (1 per token for a token mean, 1 / length for a mean per sequence, 1 / max length for Dr.
    GRPO; 0 off the loss), optionally `kl_coef` x k3 to the rollout's reference log-probs as a loss term, and with
    `old_from_rollout=False` the ratio against the detached current log-probs (one update per rollout: ratio 1)."""

    clip_low: float
    clip_high: float
    weights: torch.Tensor
    kl_coef: float = 0.0
    old_from_rollout: bool = True
    policy_loss: str = "clip"


def actor_step(
    actor: Any,
    ro: Rollout,
    advantages: torch.Tensor,
    idx: torch.Tensor,
    st: Any,
    n_tokens: float,
    extra_loss: Callable[[int], torch.Tensor] | None = None,
    objective: Objective | None = None,
) -> tuple[torch.Tensor, float | None]:
    """One optimizer step of `actor` (a DeepSpeed engine) on the rollout rows `idx` (M,), in micro-batches of
    `st.micro_batch_size`: PPO's clipped surrogate (`st.clip_eps`) on `advantages` (B, R) against the rollout's old
    log-probs, both at `st.generation.temperature`, minus `st.entropy_coef` x entropy, summed over valid tokens;
    `objective` replaces it with a critic-free method's (see `Objective`). The step's loss is that sum over all
    micro-batches and ranks divided by `n_tokens` (the step's global normaliser: valid tokens, or sequences).
    `extra_loss(c)`, when given, adds a term to micro-batch c's summed loss (in units of the normaliser, e.g.
    PPO-ptx). Returns (this rank's sums, named ACTOR_SUMS, the gradient norm of the step)."""
    tau = st.generation.temperature if st.generation.temperature > 0 else 1.0
    sums = Sums(*ACTOR_SUMS)
    norm = None
    for c, chunk in enumerate(idx.split(st.micro_batch_size)):
        sub = ro.seq.rows(chunk)
        mask, width = sub.response_mask, sub.response_mask.shape[1]
        logits = response_logits(actor, sub)
        logprobs = response_logprobs(logits, sub, tau)
        entropy = entropy_from_logits(logits / tau if st.entropy_coef else logits.detach() / tau)
        # The sampler's importance weights (1 when the sampler is the trainer) scale the policy-gradient term only.
        is_w = ro.is_weights[chunk, :width] if ro.is_weights is not None else None
        if objective is None:
            old = ro.logprobs[chunk, :width]
            pg, clipped, approx_kl = policy_loss(logprobs, old, advantages[chunk, :width], st.clip_eps)
            low = high = kl = k1 = torch.zeros_like(pg)
            weighted = pg if is_w is None else pg * is_w
            loss = masked_sum(weighted, mask) - st.entropy_coef * masked_sum(entropy, mask)
        else:
            loss, old, (pg, clipped, approx_kl, low, high, kl, k1) = _objective_terms(
                objective, ro, advantages, chunk, logprobs, entropy, mask, st.entropy_coef, is_w
            )
        if extra_loss is not None:
            loss = loss + extra_loss(c)
        eng.backward(actor, loss, n_tokens)
        norm = eng.step(actor)  # DeepSpeed applies it at the last micro-batch (the accumulation boundary)
        terms = (pg, clipped, approx_kl, entropy, low, high, kl, k1)
        _add_sums(sums, sub.attention_mask.sum(), mask, logprobs.detach() - old, terms)
    return sums, norm


def _add_sums(sums: Sums, tokens: torch.Tensor, mask: torch.Tensor, log_ratio: torch.Tensor, terms: tuple) -> None:
    """Add a micro-batch's statistics to `sums` (ACTOR_SUMS): the per-token `terms` (C, W) in the order policy_loss,
    clipfrac_policy, approx_kl, entropy, clipfrac_low, clipfrac_high, kl_loss, ref_k1, summed over the response
    `mask`; the forwarded and valid tokens; |log ratio| to pi_old; the rows, and those with a token clipped low /
    high (GSPO clips whole sequences: its clip fraction counts rows)."""
    names = (
        "policy_loss",
        "clipfrac_policy",
        "approx_kl",
        "entropy",
        "clipfrac_low",
        "clipfrac_high",
        "kl_loss",
        "ref_k1",
    )
    (seqs_low, seqs), (seqs_high, _) = clipped_rows(terms[4], mask), clipped_rows(terms[5], mask)
    sums.add(
        **{k: masked_sum(v.detach(), mask) for k, v in zip(names, terms, strict=True)},
        tokens=tokens,
        valid=mask.sum(),
        abs_log_ratio=masked_sum(log_ratio.abs(), mask),
        seqs=seqs,
        clipped_seqs_low=seqs_low,
        clipped_seqs_high=seqs_high,
    )


def _objective_terms(
    objective: Objective,
    ro: Rollout,
    advantages: torch.Tensor,
    chunk: torch.Tensor,
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    entropy_coef: float,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """A critic-free method's loss on the rollout rows `chunk` (C,) with `logprobs`, `entropy` and the response
    `mask` (C, W): the surrogate `objective.policy_loss` (docs/algorithms.md 8.5, 8.9, 8.10) against pi_old (the
    rollout's, or these log-probs detached for one update per batch: ratio 1, the same value and gradient for all
    three), minus the entropy bonus, plus `objective.kl_coef` x k3 to the reference where the KL sits in the loss,
    weighted by `objective.weights`; the surrogate alone also by the sampler's importance weights `is_weights` (C, W)
    when given. Returns (the summed loss, pi_old's log-probs (C, W), the per-token terms (C, W) in the
    order policy_loss, clipfrac_policy, approx_kl, clipfrac_low, clipfrac_high, kl_loss, ref_k1)."""
    width = logprobs.shape[1]
    old = ro.logprobs[chunk, :width] if objective.old_from_rollout else logprobs.detach()
    pg, low, high = policy_surrogate(
        objective.policy_loss,
        logprobs,
        old,
        advantages[chunk, :width],
        mask,
        objective.clip_low,
        objective.clip_high,
    )
    log_ratio = (logprobs.detach() - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    clipped, approx_kl = low + high, torch.expm1(log_ratio) - log_ratio  # k3 of pi_old vs pi_theta
    per_token = (pg if is_weights is None else pg * is_weights) - entropy_coef * entropy
    kl = k1 = torch.zeros_like(pg)
    if objective.kl_coef:
        kl = k3_kl_loss(logprobs, ro.ref_logprobs[chunk, :width])
        k1 = logprobs.detach() - ro.ref_logprobs[chunk, :width]
        per_token = per_token + objective.kl_coef * kl
    loss = (per_token * objective.weights[chunk, :width]).sum()
    return loss, old, (pg, clipped, approx_kl, low, high, kl, k1)


def critic_step(critic: Any, ro: Rollout, returns: torch.Tensor, idx: torch.Tensor, st: Any, n_tokens: float) -> Sums:
    """One optimizer step of `critic` (a DeepSpeed engine) on the rollout rows `idx` (M,): `st.vf_coef` x the
    clipped value loss (`st.value_clip_eps`, around the rollout's values) against `returns` (B, R).
    Returns this rank's sums, named CRITIC_SUMS."""
    sums = Sums(*CRITIC_SUMS)
    for chunk in idx.split(st.micro_batch_size):
        sub = ro.seq.rows(chunk)
        mask, width = sub.response_mask, sub.response_mask.shape[1]
        values = critic_values(critic, sub)
        vf, clipped = value_loss(values, ro.values[chunk, :width], returns[chunk, :width], st.value_clip_eps)
        eng.backward(critic, st.vf_coef * masked_sum(vf, mask), n_tokens)
        eng.step(critic)
        sums.add(value_loss=masked_sum(vf.detach(), mask), clipfrac_value=masked_sum(clipped.detach(), mask))
    return sums
