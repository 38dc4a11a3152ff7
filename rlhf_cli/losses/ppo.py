"""PPO for RLHF (docs/algorithms.md sections 4, 5 and 9): tensors in, tensors out.

Response tensors are (B, T) over the response tokens only (position t = t-th generated token) and `mask` (B, T),
bool or 0/1 float, is 1 on the valid tokens (up to and including the first EOS). Every function reads validity from
the mask, never from lengths, so junk (even nan) at invalid positions never leaks into a result: invalid entries are
dropped with `torch.where`, not multiplied by 0 (nan * 0 is nan). All math is fp32.

Per-token losses are returned unreduced: the stage takes masked sums and divides by the number of valid tokens of the
whole optimizer step, so the mean is exact across gradient accumulation and ranks (section 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: a finite ratio however far pi_theta has drifted (OpenRLHF clamps the same)


def _valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask as bool, after checking it has x's shape (a broadcast mask would count the wrong number of tokens)."""
    if mask.shape != x.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of the values {tuple(x.shape)}")
    return mask.bool()


# ---------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of x over valid entries: x, mask same shape -> fp32 scalar."""
    return torch.where(_valid(x, mask), x.float(), 0.0).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over valid entries (count clamped at 1, so an empty mask gives 0): -> fp32 scalar."""
    return masked_sum(x, mask) / _valid(x, mask).sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of x over valid entries -> fp32 scalar.

    Biased (divide by n) by default, like TF `moments` in OAI / lm-human-preference-details; `unbiased` applies
    Bessel's n/(n-1) as TRL's `masked_var` does. With fewer than 2 valid entries the correction is skipped (it would
    divide by 0) and the biased value, 0, is returned.
    """
    valid = _valid(x, mask)
    centered = torch.where(valid, x.float() - masked_mean(x, mask), 0.0)
    n = valid.sum()
    var = (centered**2).sum() / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = False
) -> torch.Tensor:
    """(x - mean) * rsqrt(var + eps) over valid entries: (B, T) -> (B, T) fp32, 0 at invalid positions.

    shift_mean=False adds the mean back (OAI's reward whitening rescales but keeps the sign of the average reward).
    Advantages use shift_mean=True, once over all valid tokens of the (mini)batch.
    """
    valid = _valid(x, mask)
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=unbiased)
    out = (x.float() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0)


# ---------------------------------------------------------------- KL in the reward


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate with log_ratio = logprobs - ref_logprobs: (B, T) each -> (B, T) fp32.

    k1 = log_ratio (unbiased, can be < 0; the default in the reward everywhere), k2 = log_ratio^2 / 2 (>= 0, biased),
    k3 = exp(-log_ratio) - 1 + log_ratio (>= 0, unbiased; the GRPO sign convention, section 5). For the reward, pass
    pi_old log-probs from the rollout; nothing is detached here, `per_token_rewards` detaches.
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; one of {KL_ESTIMATORS}")


def per_token_rewards(
    kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -kl_coef * kl_t on every valid token, plus the score on the last valid token of each row.

    kl (B, T), scores (B,), mask (B, T) -> (rewards (B, T), non_score (B, T)), fp32, detached, 0 at invalid positions.
    The score goes on the last index where the mask is 1 (old TRL, OpenRLHF, DS-Chat), not on EOS+1 as in TRL PPOv2;
    a row without any valid token gets no score at all rather than one at index 0.
    """
    valid = _valid(kl, mask)
    if scores.shape != (kl.shape[0],):
        raise ValueError(f"scores {tuple(scores.shape)} must be (B,) with B = {kl.shape[0]}")
    non_score = torch.where(valid, -kl_coef * kl.detach().float(), 0.0)
    positions = torch.arange(kl.shape[1], device=kl.device).expand_as(valid)
    last = torch.where(valid, positions, -1).max(dim=1).values
    has_token = last >= 0
    score = torch.where(has_token, scores.detach().float(), 0.0)
    rewards = non_score.scatter_add(1, last.clamp(min=0).unsqueeze(1), score.unsqueeze(1))
    return rewards, non_score


def apply_missing_eos(
    scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None = None, replace_with: float | None = None
) -> torch.Tensor:
    """Scores of truncated completions (no EOS): scores (B,), has_eos (B,) bool -> new (B,) fp32 tensor.

    `replace_with`, when given, overwrites the score (lm-human-preferences uses -1) and `penalty` is then not applied;
    otherwise `penalty` subtracts a constant (TRL `missing_eos_penalty`). A truncated reply must not be scored as if
    it were complete (pitfall 6).
    """
    scores = scores.float()
    if scores.shape != has_eos.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and has_eos {tuple(has_eos.shape)} differ")
    has_eos = has_eos.bool()
    if replace_with is not None:
        return torch.where(has_eos, scores, torch.full_like(scores, replace_with))
    if penalty is not None:
        return torch.where(has_eos, scores, scores - penalty)
    return scores.clone()


# ---------------------------------------------------------------- advantages


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens: (B, T) each -> (advantages, returns) (B, T) fp32.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns = A + V (before any whitening of
    A). Rewards and values at invalid positions are ignored and V after the last valid token is 0. The recursion runs
    over valid tokens only: at an invalid position the carried V_{t+1} and A_{t+1} pass through unchanged, so a mask
    with holes behaves as the valid tokens laid end to end (for a prefix mask this is the usual zero-padded GAE).
    Outputs are 0 at invalid positions.
    """
    valid = _valid(rewards, mask)
    if values.shape != rewards.shape:
        raise ValueError(f"values {tuple(values.shape)} and rewards {tuple(rewards.shape)} differ")
    r = torch.where(valid, rewards.float(), 0.0)
    v = torch.where(valid, values.float(), 0.0)
    advantages = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv
        next_adv = torch.where(valid[:, t], adv, next_adv)
        next_value = torch.where(valid[:, t], v[:, t], next_value)
    advantages = torch.where(valid, advantages, 0.0)
    return advantages, torch.where(valid, advantages + v, 0.0)


# ---------------------------------------------------------------- losses


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token: (B, T) each -> (loss, clipped, approx_kl) (B, T) fp32, not reduced.

    ratio = exp(logprobs - old_logprobs) with the log-ratio clamped to +-20; loss = max(-A ratio, -A clip(ratio,
    1-eps, 1+eps)). clipped is 1 where the clipped branch is strictly larger (TRL's pg_clipfrac): there the loss is
    constant in logprobs and the token gets no gradient. approx_kl = (ratio - 1) - log_ratio, Schulman's k3 of pi_old
    vs pi_theta, detached. Gradient flows into logprobs only (old log-probs and advantages are constants).
    """
    log_ratio = (logprobs.float() - old_logprobs.detach().float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped_loss = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    clipped = clipped_loss > unclipped
    loss = torch.where(clipped, clipped_loss, unclipped)
    approx_kl = ((ratio - 1) - log_ratio).detach()
    return loss, clipped.float(), approx_kl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss per token: (B, T) each -> (loss, clipped) (B, T) fp32, not reduced.

    loss = 1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2); the clip is around V_old, never around
    R (pitfall 9). clipped is 1 where the clipped term is strictly larger.
    """
    v = values.float()
    old, ret = old_values.detach().float(), returns.detach().float()
    v_clipped = old + (v - old).clamp(-clip_eps, clip_eps)
    unclipped_sq = (v - ret) ** 2
    clipped_sq = (v_clipped - ret) ** 2
    clipped = clipped_sq > unclipped_sq
    return 0.5 * torch.where(clipped, clipped_sq, unclipped_sq), clipped.float()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits): (B, T, V) any dtype -> (B, T) fp32.

    One row at a time in fp32 (as `token_logprobs`), so peak memory is one fp32 (T, V) slice, not the whole batch.
    Log-probs of -inf logits (a masked vocabulary) are clamped to the most negative finite float, so 0 * log 0
    contributes 0 instead of nan.
    """
    rows = []
    for i in range(logits.shape[0]):
        logp = F.log_softmax(logits[i].float(), dim=-1)
        rows.append(-(logp.exp() * logp.clamp(min=torch.finfo(torch.float32).min)).sum(-1))
    return torch.stack(rows)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over valid entries (biased variances): 1 for a perfect critic, 0 for a constant one
    at the mean, < 0 when worse than that. nan when Var[R] = 0 (undefined)."""
    values, returns = values.detach().float(), returns.detach().float()
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return math.nan
    return (1 - masked_var(returns - values, mask) / var_returns).item()


# ---------------------------------------------------------------- score shaping


def clip_scores(scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Clamp scores (B,) to [-clip, clip] (OpenRLHF +-10, DS-Chat +-5); None leaves them as they are. -> fp32."""
    scores = scores.float()
    if clip is None:
        return scores
    if clip <= 0:
        raise ValueError(f"score clip must be > 0, got {clip}")
    return scores.clamp(-clip, clip)


def normalize_scores(scores: torch.Tensor, mean: float, std: float, clip: float | None) -> torch.Tensor:
    """(scores - mean) / max(std, 1e-8), then clamped to [-clip, clip] when clip is given: (B,) -> (B,) fp32."""
    return clip_scores((scores.float() - mean) / max(std, 1e-8), clip)
