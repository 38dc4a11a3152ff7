"""SFT token loss (ALGORITHMS.md section 2)."""

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


def count_targets(labels: torch.Tensor) -> int:
    """Target tokens a batch contributes to the loss (labels (B, T), counted after the shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
