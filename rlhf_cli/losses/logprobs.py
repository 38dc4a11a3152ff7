"""Next-token log-probabilities, shared by every stage (ALGORITHMS.md section 1)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at position t predict token t+1: drop the last logit and the first label.

    logits (B, T, V), labels (B, T) -> (B, T-1, V), (B, T-1)."""
    return logits[:, :-1, :], labels[:, 1:]


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, shift: bool = True
) -> torch.Tensor:
    """log pi(label_{t+1} | prefix) for every position, computed in fp32; 0 where the label is ignored.

    logits (B, T, V) any dtype, labels (B, T) with IGNORE_INDEX on untrained positions -> (B, T-1) fp32.
    With shift=False the caller has aligned them already (logits[:, t] predicts labels[:, t]) -> (B, T).
    Row by row logsumexp keeps peak memory at one fp32 copy of a (T, V) slice rather than of the batch."""
    if shift:
        logits, labels = shift_for_next_token(logits, labels)
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):
        row = logits[i].float()
        if temperature != 1.0:
            row = row / temperature
        out[i] = row.gather(-1, safe[i].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
    return out.masked_fill(~mask, 0.0)
