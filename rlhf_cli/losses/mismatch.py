"""The sampler-trainer mismatch (docs/algorithms.md section 12): when the engine that samples a rollout is not the
model that trains on it (vLLM, another precision), the sampled tokens come from pi_sampler while the loss assumes
pi_old, the trainer's own rollout policy. A truncated importance weight pi_old / pi_sampler per token (or per
sequence) puts the expectation back on pi_old, and the per-token KL between the two says how far apart they are."""

from __future__ import annotations

import torch

SEQUENCE_MODES = ("sequence_truncate", "sequence_mask")


def sampler_weights(
    trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, mode: str, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights of the sampled tokens: trainer / sampler log-probs and mask (B, R) ->
    (weights (B, R), detached, 0 after the end; truncated (B, R) float, 1 where the cap acted).

    token_*: w_t = exp(l_old_t - l_sampler_t); sequence_*: one weight per row, exp(sum_t (l_old_t - l_sampler_t)),
    on each of its tokens. *_truncate: min(w, cap); *_mask: w where w <= cap, else 0. `none`: 1 everywhere."""
    mask = mask.float()
    if mode == "none":
        return mask.clone(), torch.zeros_like(mask)
    diff = (trainer_logprobs.detach().float() - sampler_logprobs.float()) * mask
    if mode in SEQUENCE_MODES:
        diff = diff.sum(dim=1, keepdim=True).expand_as(mask)
    # exp of a large sum overflows to inf: the comparison with the cap still holds, and min / mask handle it.
    ratio = torch.exp(diff)
    over = ratio > cap
    if mode.endswith("_truncate"):
        weights = ratio.clamp(max=cap)
    elif mode.endswith("_mask"):
        weights = ratio.masked_fill(over, 0.0)
    else:
        raise ValueError(f"unknown sampler correction {mode!r}")
    return weights * mask, over.float() * mask
