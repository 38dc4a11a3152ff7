"""Which candidates rejection sampling trains on (docs/algorithms.md section 7): pure functions on a (P, N) grid of
scores, one row per prompt, one column per candidate.

A candidate is *valid* when its score is finite (a reward function may answer None / NaN for what it cannot judge) and
it is not a copy of an earlier candidate of the same prompt: identical responses are one sample, so a prompt whose N
draws collapsed onto one answer does not get that answer N times in the training set. Ties are broken by candidate
index (the first drawn wins), so a selection is reproducible.
"""

from __future__ import annotations

import torch

from rlhf_cli.config.online import SELECTIONS


def duplicates(responses: list[list[tuple[int, ...]]]) -> torch.Tensor:
    """responses[p][n]: the token ids of prompt p's candidate n -> (P, N) bool, True for a candidate whose ids equal
    those of an earlier candidate of the same prompt (the first one stays)."""
    if not responses:
        return torch.zeros((0, 0), dtype=torch.bool)
    rows = []
    for cands in responses:
        seen: set[tuple[int, ...]] = set()
        row = []
        for ids in cands:
            row.append(ids in seen)
            seen.add(ids)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(len(responses), -1)


def valid_mask(scores: torch.Tensor, duplicate: torch.Tensor | None = None) -> torch.Tensor:
    """(P, N) scores (NaN / inf = could not be scored), optional (P, N) duplicate flags -> (P, N) bool."""
    valid = torch.isfinite(scores)
    return valid & ~duplicate if duplicate is not None else valid


def select(
    scores: torch.Tensor, valid: torch.Tensor, mode: str, top_k: int = 1, threshold: float | None = None
) -> torch.Tensor:
    """The candidates to train on, (P, N) bool.

    best: the highest-scoring valid candidate of each prompt; top_k: the `top_k` highest (fewer when fewer are
    valid); threshold: every valid candidate scoring >= `threshold`. A prompt without a valid candidate gets none."""
    if mode not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {mode!r}")
    if mode == "threshold":
        if threshold is None:
            raise ValueError("selection=threshold needs a threshold")
        return valid & (scores.nan_to_num(nan=-torch.inf) >= threshold)
    k = 1 if mode == "best" else top_k
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    ranked = torch.where(valid, scores, torch.full_like(scores, -torch.inf))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # equal scores keep their draw order
    chosen = torch.zeros_like(valid)
    chosen.scatter_(1, order[:, :k], True)
    return chosen & valid


def selection_stats(scores: torch.Tensor, valid: torch.Tensor, chosen: torch.Tensor) -> dict[str, float]:
    """Round metrics from (P, N) scores, validity and selection:

    candidate_score_mean: mean over all valid candidates; selected_score_mean / _std: over the selected ones
    (population std); best_of_n_gain: per prompt, mean selected score minus mean valid score, averaged over the
    prompts with a selection (what selection adds over sampling once); valid_prompt_fraction: prompts with at least
    one valid candidate; selected / candidates: counts; duplicate_fraction is computed by the caller."""
    s = scores.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    n_valid, n_chosen = valid.sum(1), chosen.sum(1)
    picked = s[chosen]
    has = n_chosen > 0
    prompt_gain = (s * chosen).sum(1)[has] / n_chosen[has] - (s * valid).sum(1)[has] / n_valid[has]
    return {
        "candidates": float(scores.numel()),
        "candidate_score_mean": float(s[valid].mean()) if valid.any() else float("nan"),
        "selected": float(n_chosen.sum()),
        "selected_score_mean": float(picked.mean()) if picked.numel() else float("nan"),
        "selected_score_std": float(picked.std(unbiased=False)) if picked.numel() else float("nan"),
        "best_of_n_gain": float(prompt_gain.mean()) if has.any() else float("nan"),
        "valid_prompt_fraction": float((n_valid > 0).double().mean()) if scores.shape[0] else float("nan"),
    }
