"""The policy-gradient surrogates of the critic-free stages (docs/algorithms.md sections 8.5, 8.9 and 8.10), chosen by
`stage.policy_loss`: `clip` (token-level clipped ratio, `critic_free.clipped_surrogate`), `gspo` (one ratio per
sequence, Zheng et al. 2025, arXiv 2507.18071) and `cispo` (a clipped, detached importance weight on every token's
log-prob, MiniMax-M1, arXiv 2506.13585).

Conventions of `losses.ppo`: response tensors (B, T) with a (B, T) mask (bool or 0/1), 1 on the valid tokens; fp32;
the per-token loss is returned unreduced, for the stage's loss aggregation (`critic_free.aggregation_weights`) to
weigh. Junk at invalid positions (even inf or nan) is replaced before any arithmetic, so it reaches neither a value
nor a gradient. Advantages and old log-probs are constants: the gradient flows into `logprobs` only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_cli.losses.critic_free import clipped_surrogate
from rlhf_cli.losses.ppo import LOG_RATIO_CLAMP, _valid

POLICY_LOSSES = ("clip", "gspo", "cispo")  # config/online.py POLICY_LOSSES names the same (kept torch-free there)


class PolicyTerms(NamedTuple):
    """A surrogate's per-token terms, each (B, T) fp32: `loss` (with gradient), and two 0/1 flags, detached:
    `clipped_low` / `clipped_high`, where the clip acted at 1 - clip_low / 1 + clip_high (see each function)."""

    loss: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor


def _advantages(advantages: torch.Tensor) -> torch.Tensor:
    """(B, T) or (B,) -> detached fp32, a sequence advantage (B,) broadcast as (B, 1) over its tokens."""
    adv = advantages.detach().float()
    return adv[:, None] if adv.dim() == 1 else adv


def _clean(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(valid (B, T) bool, logprobs and old log-probs with 0 at invalid positions, fp32): a `torch.where` before any
    arithmetic, so an inf at a padded position gives neither a nan value nor a nan gradient (0 * inf is nan)."""
    valid = _valid(logprobs, mask)
    return valid, torch.where(valid, logprobs.float(), 0.0), torch.where(valid, old_logprobs.detach().float(), 0.0)


def _unit_with_gradient(logprobs: torch.Tensor) -> torch.Tensor:
    """exp(l - sg(l)): the value 1 everywhere, the gradient of l. Multiplying a detached weight w by it gives a term
    worth w whose gradient is w * grad(l) (GSPO-token's ratio; CISPO's sg(w) * log pi with the same gradient)."""
    return torch.exp(logprobs - logprobs.detach())


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's length-normalised sequence log-ratio: (B, T) -> (B,) fp32, with gradient.

    log s_i = (1 / |o_i|) sum_t m_t (l_t - l_old_t), |o_i| = the row's valid tokens: s_i is the geometric mean of
    the token ratios. A row with no valid token gets 0 (ratio 1), not 0 / 0. Not clamped: `gspo_surrogate` clamps
    its value to +-20 as the token ratio is.
    """
    valid, lp, old = _clean(logprobs, old_logprobs, mask)
    return (lp - old).sum(1) / valid.sum(1).clamp(min=1)


def gspo_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> PolicyTerms:
    """GSPO in its per-token form (GSPO-token, the paper's eq. 13-14): (B, T) log-probs, advantages (B, T) or (B,),
    mask (B, T) -> PolicyTerms (B, T).

    s_{i,t} = sg(s_i) * pi_theta(y_t) / sg(pi_theta(y_t)): the value s_i = exp(`sequence_log_ratio`, clamped to
    +-20) on every token of row i, the gradient s_i * grad l_t. loss_t = max(-A_t s_{i,t}, -A_t clip(s_{i,t},
    1 - clip_low, 1 + clip_high)). With one advantage per sequence and the row mean over its tokens (aggregation
    `seq_mean_token_mean`), the row's loss is GSPO's -min(s_i A_i, clip(s_i) A_i) and its gradient
    -A_i s_i (1 / |o_i|) sum_t grad l_t = -A_i grad s_i: the sequence-level objective exactly. Flags: clipped_low /
    clipped_high = 1 on the row's tokens where the clipped branch is strictly larger (A < 0 and s_i < 1 - clip_low,
    A > 0 and s_i > 1 + clip_high): the whole sequence then gets no gradient. 0 at invalid positions.
    """
    valid, lp, old = _clean(logprobs, old_logprobs, mask)
    adv = _advantages(advantages)
    seq = sequence_log_ratio(lp.detach(), old, valid).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # sg(log s_i)
    ratio = torch.exp(seq)[:, None] * _unit_with_gradient(lp)  # (B, T): s_i on each token, gradient s_i grad l_t
    unclipped = -adv * ratio
    clipped_loss = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped = (clipped_loss > unclipped) & valid
    loss = torch.where(valid, torch.where(clipped, clipped_loss, unclipped), 0.0)
    seq_ratio = ratio.detach()
    return PolicyTerms(loss, (clipped & (seq_ratio < 1)).float(), (clipped & (seq_ratio > 1)).float())


def cispo_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> PolicyTerms:
    """CISPO (MiniMax-M1 eq. 4): (B, T) log-probs, advantages (B, T) or (B,), mask (B, T) -> PolicyTerms (B, T).

    w_t = sg(clamp(r_t, 1 - clip_low, 1 + clip_high)), r_t = exp(l_t - l_old_t) (log-ratio clamped to +-20);
    loss_t = -A_t w_t exp(l_t - sg(l_t)): the value -A_t w_t, the gradient -A_t w_t grad l_t, the paper's
    sg(w) A log pi, whose value (-A w l) would not compare with the other surrogates'. No token loses its gradient:
    the clip bounds the weight, it does not drop the token. clip_low >= 1 puts the lower bound at or under 0, where
    no ratio reaches it (the paper sets no lower bound and tunes only the upper one). Flags: clipped_low /
    clipped_high = 1 where the weight was truncated (r_t < 1 - clip_low, r_t > 1 + clip_high), whatever A's sign.
    """
    valid, lp, old = _clean(logprobs, old_logprobs, mask)
    adv = _advantages(advantages)
    ratio = torch.exp((lp.detach() - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    weight = ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.where(valid, -adv * weight * _unit_with_gradient(lp), 0.0)
    low = valid & (ratio < 1 - clip_low)
    high = valid & (ratio > 1 + clip_high)
    return PolicyTerms(loss, low.float(), high.float())


def policy_surrogate(
    kind: str,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> PolicyTerms:
    """`stage.policy_loss` -> its per-token terms (B, T). `clip` is `critic_free.clipped_surrogate` itself (the
    same operations, so the same bits as before the choice existed; it reads no mask: invalid positions are the
    caller's weights' business, as before)."""
    if kind == "clip":
        return PolicyTerms(*clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_high))
    if kind == "gspo":
        return gspo_surrogate(logprobs, old_logprobs, advantages, mask, clip_low, clip_high)
    if kind == "cispo":
        return cispo_surrogate(logprobs, old_logprobs, advantages, mask, clip_low, clip_high)
    raise ValueError(f"unknown policy loss {kind!r}; one of {POLICY_LOSSES}")


def clipped_rows(clipped: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO's clip fraction counts sequences: flags (B, T), mask (B, T) -> (rows with a flagged valid token, rows
    with a valid token), two fp32 scalars. With one advantage per sequence a row's tokens are all flagged or none;
    with per-token advantages (REINFORCE++) a row counts as clipped when any of its tokens is."""
    valid = _valid(clipped, mask)
    flagged = torch.where(valid, clipped.detach().float(), 0.0).amax(1) > 0
    return flagged.float().sum(), valid.any(1).float().sum()
