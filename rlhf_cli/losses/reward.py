"""Reward-model losses and statistics (docs/algorithms.md section 3): tensors in, tensors out.

Batches follow `collate_preference`: 2B right-padded rows, chosen first. The score of a sequence is the value at
its last real token (the EOS), located through the attention mask rather than by searching for pad ids, because
pad may equal EOS in user models (HF `*ForSequenceClassification` then reads one token too early).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row: attention_mask (B, T) of 0/1 -> (B,) long.

    The largest position whose mask is 1, so it holds for right padding (and would for left padding too);
    never derived from token ids. A row without any real token is an error, not a silent index 0.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("a row of the attention mask has no real token")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).max(dim=1).values


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row value at the last real token: values (B, T) or (B, T, 1), attention_mask (B, T) -> (B,)."""
    if values.dim() == 3 and values.shape[-1] == 1:
        values = values.squeeze(-1)  # a scalar head's (B, T, 1) output
    if values.shape != attention_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    index = last_token_index(attention_mask)
    return values.gather(1, index.unsqueeze(1)).squeeze(1)


def split_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of a stacked batch (2B,) -> (chosen (B,), rejected (B,)): the first half is chosen."""
    if scores.dim() != 1 or scores.shape[0] % 2:
        raise ValueError(f"expected an even number of stacked scores (2B,), got shape {tuple(scores.shape)}")
    chosen, rejected = scores.chunk(2)
    return chosen, rejected


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise loss -mean log sigmoid(r_c - r_r - m) [+ c * mean((r_c + r_r)^2)]; r_c, r_r, m (B,) -> scalar.

    The margin m (Llama 2) asks for a larger gap on clearly preferred pairs; the centering term (TRL
    `center_rewards_coefficient`, Eisenstein et al.) keeps rewards near 0, which the BT loss alone leaves free.
    Computed in fp32 with logsigmoid, which stays finite for large gaps. Stats are detached scalars: accuracy,
    margin (mean r_c - r_r), chosen / rejected (mean rewards).
    """
    if r_chosen.shape != r_rejected.shape or r_chosen.dim() != 1:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} must be (B,)")
    r_chosen, r_rejected = r_chosen.float(), r_rejected.float()
    diff = r_chosen - r_rejected
    logits = diff if margin is None else diff - margin.to(diff)
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss, reward_stats(r_chosen, r_rejected)


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs with r_c > r_r (ties count as wrong: an untrained constant model scores 0): (B,) -> scalar."""
    return (r_chosen > r_rejected).float().mean()


def reward_stats(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached scalar stats of a batch of pairs (B,) each: accuracy, margin, chosen, rejected."""
    r_chosen, r_rejected = r_chosen.detach().float(), r_rejected.detach().float()
    return {
        "accuracy": pairwise_accuracy(r_chosen, r_rejected),
        "margin": (r_chosen - r_rejected).mean(),
        "chosen": r_chosen.mean(),
        "rejected": r_rejected.mean(),
    }


def reward_moments(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std (biased, as OAI whitening) of rewards (N,) -> two detached scalars.

    For eval rewards (chosen and rejected together): their scale, which online stages can divide out with
    stage.reward.normalize=rm_stats (docs/algorithms.md section 3.4). The head itself is not rescaled.
    """
    rewards = rewards.detach().float().reshape(-1)
    if rewards.numel() == 0:
        raise ValueError("reward_moments needs at least one reward")
    return rewards.mean(), rewards.std(unbiased=False)
