"""Critic-free online RL (docs/algorithms.md sections 5 and 8): GRPO with its Dr. GRPO and DAPO options, RLOO,
REINFORCE++.

Conventions of `losses.ppo`: response tensors are (B, T) over the response tokens with a (B, T) mask (bool or 0/1)
that is 1 up to and including the first EOS; junk at invalid positions never leaks (`torch.where`, not `* 0`); fp32.
Scores are (B,) with B = prompts x G and a prompt's G samples consecutive (`rollout.experience.expand`).

Group statistics must see a whole group. When a prompt's samples live on several ranks, the caller gathers the scores
in global row order first (`engine.all_gather_cat`, as TRL gathers rewards before grouping), computes here and keeps
its own rows: the result is then that of one process by construction. Token-level statistics (REINFORCE++ whitening,
the "batch" std) take an `all_reduce` callable instead, so nothing here needs torch.distributed.

Unscorable samples: a non-finite score (nan, e.g. a reward function that returned None, or +-inf) is invalid. It is
left out of every group and batch statistic, its advantage (or return) is exactly 0, and the estimators return a (B,)
bool `valid` so the caller can also drop the row from the loss mask and report how many there were.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_cli.losses.ppo import LOG_RATIO_CLAMP, _valid, gae, kl_penalty, per_token_rewards

SCALINGS = ("group", "batch", "none")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
GROUP_STD_EPS = 1e-4  # TRL 1.16 adds 1e-4 to the std (OpenRLHF 1e-9); zero-variance groups are forced to 0 anyway
WHITEN_EPS = 1e-8  # OpenRLHF global whitening: rsqrt(max(var, 1e-8))

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # returns the tensor summed over ranks (engine.all_reduce_sum)


# ---------------------------------------------------------------- group statistics


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """scores (B,) -> (B // G, G) fp32, after checking G >= 2 and that B is a whole number of groups."""
    if group_size < 2:
        # A config problem, not a data one: the stage reports it as a UserError naming stage.n_samples.
        raise ValueError(
            f"group-relative advantages need at least 2 samples per prompt, got {group_size}: with one sample the "
            "baseline is the score itself and every advantage is 0"
        )
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores {tuple(scores.shape)} must be (B,) with B a multiple of the group size {group_size}")
    return scores.detach().float().view(-1, group_size)


def group_stats(
    scores: torch.Tensor, group_size: int, unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group mean, std and number of valid samples over the finite scores: (B,) -> three (B // G,) tensors.

    std is Bessel-corrected by default, as TRL's `nanstd` and OpenRLHF's `torch.std` (section 8): with G = 4..16 the
    biased std is 3-13 % smaller. A group with fewer than 2 valid samples has std 0 (and mean 0 when it has none).
    Two-pass (mean, then squared deviations), so a large common offset does not cancel precision away.
    """
    g = _grouped(scores, group_size)
    valid = torch.isfinite(g)
    n = valid.sum(1)
    mean = torch.where(valid, g, 0.0).sum(1) / n.clamp(min=1)
    squares = torch.where(valid, (g - mean[:, None]) ** 2, 0.0).sum(1)
    var = squares / ((n - 1) if unbiased else n).clamp(min=1)
    return mean, torch.where(n > 1, var.sqrt(), 0.0), n


def zero_variance_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B // G,) bool: groups whose valid scores are all exactly equal (fewer than 2 valid counts too).

    GRPO and RLOO (without KL) give them advantage 0 exactly, so they carry no gradient (DAPO drops them). Not so
    REINFORCE++-baseline: its returns are 0 before the global whitening, which shifts every token of the batch by
    -mean / std, theirs too (OpenRLHF `reinforce_baseline`; `global_whiten`); nor RLOO with kl_coef > 0, whose KL
    enters the reward before the baseline. Exact equality, not a std threshold: 0.1 + 0.2 and 0.3 differ, and a mean
    of equal floats need not equal them to the last bit.
    """
    g = _grouped(scores, group_size)
    valid = torch.isfinite(g)
    high = torch.where(valid, g, -torch.inf).amax(1)
    low = torch.where(valid, g, torch.inf).amin(1)
    return (valid.sum(1) < 2) | (high == low)


def zero_variance_fraction(scores: torch.Tensor, group_size: int) -> float:
    """Fraction of groups with no signal (`zero_variance_groups`): (B,) -> float in [0, 1], for logging."""
    return zero_variance_groups(scores, group_size).float().mean().item()


def dynamic_sampling_mask(grouped_scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """DAPO dynamic sampling: grouped_scores (N, G) -> (keep (N,) bool, number of groups dropped).

    A group is kept when its valid rewards are not all equal; the stage refills the batch with new groups.
    """
    if grouped_scores.dim() != 2:
        raise ValueError(f"grouped scores {tuple(grouped_scores.shape)} must be (groups, G)")
    keep = ~zero_variance_groups(grouped_scores.reshape(-1), grouped_scores.shape[1])
    return keep, int((~keep).sum())


def global_moments(
    x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce | None = None, unbiased: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of x over the valid entries of every rank: x, mask same shape -> (mean, var) fp32 scalars.

    `all_reduce` sums a tensor over ranks (None: this process only). Two all-reduces (sum and count, then squared
    deviations from the global mean) in float64, so the result does not depend on how the batch is split.
    Biased by default (OpenRLHF global whitening); `unbiased` applies n / (n - 1) when n > 1 (TRL's batch std).
    """
    reduce = all_reduce or (lambda t: t)
    valid = _valid(x, mask)
    values = torch.where(valid, x.detach().double(), 0.0)
    total = reduce(torch.stack([values.sum(), valid.sum().double()])).to(x.device, torch.float64)
    n = total[1]
    mean = total[0] / n.clamp(min=1)
    squares = reduce(torch.where(valid, (values - mean) ** 2, 0.0).sum()).to(x.device, torch.float64)
    var = squares / ((n - 1) if unbiased and n > 1 else n).clamp(min=1)
    return mean.float(), var.float()


# ---------------------------------------------------------------- advantages


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = GROUP_STD_EPS,
    unbiased: bool = True,
    batch_std: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages (score - group mean) / scaling: scores (B,) -> (advantages (B,) fp32, valid (B,) bool).

    scale "group": / (group std + eps) (DeepSeekMath, TRL default); "batch": / (std of all valid scores + eps)
    (TRL "batch", Lite-PPO; pass `batch_std` computed over every rank, e.g. `global_moments(..., all_reduce,
    unbiased=True)[1].sqrt()`, or leave None for the std over these scores); "none": no division (Dr. GRPO: the std
    up-weights easy and hard prompts). Zero-variance groups and invalid samples get exactly 0. The same advantage
    goes on every token of the response.
    """
    if scale not in SCALINGS:
        raise ValueError(f"unknown advantage scaling {scale!r}; one of {SCALINGS}")
    mean, std, _ = group_stats(scores, group_size, unbiased)
    g = scores.detach().float().view(-1, group_size)
    valid = torch.isfinite(g)
    centered = g - mean[:, None]
    if scale == "group":
        centered = centered / (std[:, None] + eps)
    elif scale == "batch":
        if batch_std is None:
            batch_std = global_moments(g, valid, unbiased=unbiased)[1].sqrt()
        centered = centered / (torch.as_tensor(batch_std, dtype=torch.float32, device=g.device) + eps)
    signal = valid & ~zero_variance_groups(scores, group_size)[:, None]
    return torch.where(signal, centered, 0.0).reshape(-1), valid.reshape(-1)


def sequence_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level k1 for the RLOO reward: sum over valid tokens of logprobs - ref_logprobs, (B, T) -> (B,) fp32.

    Detached (KL in the reward carries no gradient). Pass the rollout's pi_old log-probs, not recomputed pi_theta
    ones (pitfall 7).
    """
    k1 = kl_penalty(logprobs.detach(), ref_logprobs.detach(), "k1")
    return torch.where(_valid(k1, mask), k1, 0.0).sum(1)


def rloo_advantages(
    scores: torch.Tensor, k: int, seq_kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO leave-one-out advantages: scores (B,), seq_kl (B,) -> (advantages (B,) fp32, valid (B,) bool).

    R_i = score_i - kl_coef * seq_kl_i (the KL enters before the baseline, TRL 1.16), A_i = R_i - mean of the other
    valid R_j of its group = k/(k-1) (R_i - mean R) for a full group. Invalid samples are out of every baseline and
    get 0, as does a sample with no other valid one in its group and every sample of a zero-variance group.
    """
    rewards = scores.detach().float()
    if seq_kl is not None:
        rewards = rewards - kl_coef * seq_kl.detach().float()
    g = _grouped(rewards, k)
    valid = torch.isfinite(g)
    n = valid.sum(1, keepdim=True)
    others = torch.where(valid, g, 0.0).sum(1, keepdim=True) - g
    advantages = g - others / (n - 1).clamp(min=1)
    signal = valid & (n > 1) & ~zero_variance_groups(rewards, k)[:, None]
    return torch.where(signal, advantages, 0.0).reshape(-1), valid.reshape(-1)


@torch.no_grad()
def reinforce_pp_returns(
    kl: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    gamma: float = 1.0,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ returns, before whitening: kl, mask (B, T), scores (B,) -> (returns (B, T), valid (B,) bool), fp32.

    r_t = -kl_coef * kl_t on every valid token (per-token k1 of pi_old vs pi_ref, in the reward, detached) plus the
    score on the last valid token (`ppo.per_token_rewards`); G_t = sum_{t' >= t} gamma^(t' - t) r_t' right to left
    over the valid tokens (`ppo.gae` with V = 0 and lambda = 1 is exactly that recursion). With `group_size` this is
    REINFORCE++-baseline: the group mean of the valid scores is subtracted from each score first (OpenRLHF
    `reinforce_baseline`), so a group whose scores are all equal has returns 0 here (the KL penalty aside), and
    `global_whiten` then gives its tokens (0 - mean) / std like any other token of the batch: not 0 unless they are
    out of the whitening's mask. A row with an invalid score gets returns 0: drop it (`valid`) from the mask that
    whitening and the loss see. Then `global_whiten` over every rank's valid tokens.
    """
    valid = torch.isfinite(scores.float())
    outcome = scores.float()
    if group_size is not None:
        outcome = outcome - group_stats(scores, group_size)[0].repeat_interleave(group_size)
    rewards, _ = per_token_rewards(kl, torch.where(valid, outcome, 0.0), mask, kl_coef)
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return torch.where(valid[:, None], returns, 0.0), valid


def global_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    all_reduce: AllReduce | None = None,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = WHITEN_EPS,
) -> torch.Tensor:
    """(x - mean) * rsqrt(max(var, eps)) with the biased mean/var of every rank's valid entries: (B, T) -> (B, T) fp32.

    REINFORCE++ whitens the returns over all valid tokens of the rollout batch on all ranks (OpenRLHF), not per rank
    or per micro-batch. `moments` = precomputed (mean, var) (`global_moments`); otherwise they are computed here with
    `all_reduce` (every rank must call it). 0 at invalid positions.
    """
    mean, var = moments if moments is not None else global_moments(x, mask, all_reduce)
    out = (x.detach().float() - mean) * torch.rsqrt(torch.as_tensor(var).clamp(min=eps))
    return torch.where(_valid(x, mask), out, 0.0)


# ---------------------------------------------------------------- losses


def clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-level clipped surrogate with DAPO clip-higher: (B, T) log-probs, advantages (B, T) or (B,) -> (loss,
    clipped_low, clipped_high), each (B, T) fp32, not reduced.

    loss = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)), ratio = exp(logprobs - old) with the log-ratio
    clamped to +-20; clip_low == clip_high is `ppo.policy_loss`. A wider upper range lets low-probability tokens with
    A > 0 grow (DAPO: 0.2 / 0.28). clipped_low marks tokens cut at 1 - clip_low (A < 0), clipped_high at
    1 + clip_high (A > 0): where the clipped branch is strictly larger, so the token gets no gradient.
    With one update per rollout pass old_logprobs = logprobs.detach(): ratio 1, gradient A * grad(logprob).
    """
    adv = advantages.detach().float()
    if adv.dim() == 1:
        adv = adv[:, None]  # a sequence-level advantage (GRPO, RLOO) on every token
    log_ratio = (logprobs.float() - old_logprobs.detach().float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped_loss = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped = clipped_loss > unclipped
    loss = torch.where(clipped, clipped_loss, unclipped)
    return loss, (clipped & (ratio < 1)).float(), (clipped & (ratio > 1)).float()


def k3_kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """GRPO's KL loss term per token: exp(ref - logprobs) - (ref - logprobs) - 1, (B, T) -> (B, T) fp32, >= 0.

    Gradient flows into logprobs: d k3 / d logprob = 1 - exp(ref - logprob). On-policy its expectation is the
    gradient of the *forward* KL(pi_ref || pi_theta), although k3's value estimates the reverse KL (section 5); this
    is what DeepSeekMath and TRL do. Do not swap in k1 as a loss: its expected gradient is 0. Add beta * k3 to the
    per-token loss and reduce it with the same `aggregate` as the policy term.
    """
    return kl_penalty(logprobs, ref_logprobs.detach(), "k3")


def aggregate(
    loss_tokens: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    norm_length: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) over the valid tokens to a scalar (fp32, differentiable).

    - "token_mean": sum of all valid terms / num_tokens (TRL "dapo"/"bnpo"). Pass the token count of the whole
      optimizer step over ranks and accumulation steps; then the micro-batch results add up to the step's mean.
      Default: this call's valid tokens.
    - "seq_mean_token_mean": each row's mean over its tokens, summed over rows / num_seqs (the paper's GRPO, TRL
      "grpo"; short answers weigh more per token).
    - "seq_mean_token_sum_norm": each row's token sum / norm_length, a constant such as the max response length,
      summed over rows / num_seqs (Dr. GRPO, TRL "dr_grpo"; no length bias).
    num_seqs default: this call's rows, all of them (as TRL), even those whose mask is empty.
    """
    valid = _valid(loss_tokens, mask)
    terms = torch.where(valid, loss_tokens.float(), 0.0)

    def per(denominator: float | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(denominator, dtype=torch.float32, device=terms.device).clamp(min=1)

    if mode == "token_mean":
        return terms.sum() / per(valid.sum() if num_tokens is None else num_tokens)
    rows = terms.sum(1)
    if mode == "seq_mean_token_mean":
        rows = rows / valid.sum(1).clamp(min=1)
    elif mode == "seq_mean_token_sum_norm":
        if norm_length is None or norm_length <= 0:
            raise ValueError(f"seq_mean_token_sum_norm needs norm_length > 0 (max response length), got {norm_length}")
        rows = rows / norm_length
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; one of {AGGREGATIONS}")
    return rows.sum() / per(loss_tokens.shape[0] if num_seqs is None else num_seqs)


def mask_truncated(mask: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
    """Exclude truncated responses from the loss (DAPO; TRL `mask_truncated_completions`): mask (B, T), has_eos (B,)
    bool -> the mask, same dtype, with the rows without EOS all 0."""
    if has_eos.shape != (mask.shape[0],):
        raise ValueError(f"has_eos {tuple(has_eos.shape)} must be (B,) with B = {mask.shape[0]}")
    return torch.where(has_eos.bool()[:, None], mask, torch.zeros_like(mask))


def aggregation_weights(mask: torch.Tensor, mode: str, norm_length: int | None = None) -> torch.Tensor:
    """`aggregate` as per-token weights, for a loss summed over micro-batches and ranks then divided by one global
    count (`aggregation_count`): mask (B, T) -> weights (B, T) fp32 (0 off the mask). token_mean: 1 per token (count:
    the tokens); seq_mean_token_mean: 1 / the row's tokens; seq_mean_token_sum_norm: 1 / norm_length (count: rows).
    sum(weights * loss) / count == aggregate(loss, mask, mode, num_tokens=count or num_seqs=count)."""
    m = mask.float()
    if mode == "token_mean":
        return m
    if mode == "seq_mean_token_mean":
        return m / m.sum(1, keepdim=True).clamp(min=1)
    if mode == "seq_mean_token_sum_norm":
        if norm_length is None or norm_length <= 0:
            raise ValueError(f"seq_mean_token_sum_norm needs norm_length > 0 (max response length), got {norm_length}")
        return m / norm_length
    raise ValueError(f"unknown loss aggregation {mode!r}; one of {AGGREGATIONS}")


def aggregation_count(mask: torch.Tensor, mode: str) -> float:
    """This batch's share of the aggregation's denominator: its valid tokens (token_mean) or its rows (the others,
    empty rows included, as `aggregate`); sum it over ranks for the step's normaliser."""
    return float(mask.float().sum()) if mode == "token_mean" else float(mask.shape[0])
