"""Next-token log-probabilities, shared by every stage (docs/algorithms.md section 1.2)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

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


def chunked_target_logprobs(
    project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """log softmax(project(hidden))[target] in fp32, `chunk_size` positions at a time.

    hidden (N, d) at the positions a loss reads, targets (N,) the token each predicts; `project` maps (n, d) ->
    (n, V) logits (the LM head). -> (N,) fp32. With gradients on and more than one chunk each chunk is
    checkpointed: only its (n, d) input is kept and its (n, V) logits are recomputed in backward, so at most one
    chunk of logits is ever held, in forward or backward. One chunk (the usual case for small vocabularies) costs
    no recomputation. Equals `token_logprobs` on the full logits at those positions (same fp32 logsumexp)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = hidden.shape[0]
    starts = range(0, n, chunk_size) if n else [0]  # an empty batch still yields a (0,) result in the graph
    recompute = torch.is_grad_enabled() and n > chunk_size
    parts = []
    for s in starts:
        h, t = hidden[s : s + chunk_size], targets[s : s + chunk_size]
        if recompute:
            parts.append(checkpoint(_target_logprobs, project, h, t, use_reentrant=False))
        else:
            parts.append(_target_logprobs(project, h, t))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _target_logprobs(project: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One chunk: hidden (n, d), targets (n,) -> (n,) fp32 log-probs."""
    logits = project(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
