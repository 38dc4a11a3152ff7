"""SFT token loss (docs/algorithms.md section 2.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_cli.losses.logprobs import IGNORE_INDEX, shift_for_next_token


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the target tokens and their count.

    logits (B, T, V), labels (B, T) unshifted with IGNORE_INDEX on prompt and pad -> (scalar fp32 sum, N).
    The caller divides by the target-token count of the *whole optimizer step* (all micro-batches, all
    ranks), not by N: a mean of micro-batch means weights short sequences wrongly (the 2024 grad-accum bug).
    Cross-entropy runs in fp32 whatever the model's dtype."""
    logits, labels = shift_for_next_token(logits, labels)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def sft_loss_from_logprobs(token_logps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`sft_loss_sum` from per-token log-probs already computed where the labels are trained.

    token_logps (B, T-1) fp32 with 0 on ignored positions (`token_logprobs`, or `models.lm_head.target_logprobs`,
    which projects only those positions through the LM head), labels (B, T) unshifted -> (scalar fp32 sum, N).
    Same normalisation contract as `sft_loss_sum`: the caller divides by the optimizer step's target count."""
    return -token_logps.sum(), count_targets(labels)


def count_targets(labels: torch.Tensor) -> int:
    """Target tokens a batch contributes to the loss (labels (B, T), counted after the shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
