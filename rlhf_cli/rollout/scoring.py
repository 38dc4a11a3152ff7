"""The score of sampled responses, as every online stage uses it (docs/algorithms.md section 4.2): the reward
source's raw score (a reward model, a classifier, or a Python function; rollout/rewards.py), then the shaping that
puts it into the reward: optional normalisation with (mean, std), optional clipping, and the missing-EOS rule.

A response the reward function could not judge (None / NaN / inf) is an error unless the stage allows it
(`allow_invalid`: rejection sampling drops such a candidate, GRPO gives it advantage 0); its raw and shaped scores
are then NaN, whatever the shaping (a truncated response's `missing_eos_score` does not make it valid).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_cli.losses.ppo import apply_missing_eos, clip_scores, normalize_scores
from rlhf_cli.rollout.generation import Sequences

# (mean, std) to normalise with, or a function of this batch's raw scores (B,) that returns them (running
# statistics that must count this batch first), or None for no normalisation.
Stats = tuple[float, float] | Callable[[torch.Tensor], tuple[float, float] | None] | None


@dataclass
class Scores:
    """raw (B,): the reward source's scores as it gave them (fp32 for the built-in sources), NaN where it could not
    judge; shaped (B,) fp32: after normalisation, clipping and the missing-EOS rule, NaN where raw is."""

    raw: torch.Tensor
    shaped: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """(B,) bool: the responses that have a score."""
        return torch.isfinite(self.raw)


def score_responses(
    reward: Any,
    prompts: list[Any],
    seq: Sequences,
    texts: list[str],
    reward_cfg: Any | None,
    stats: Stats = None,
    allow_invalid: bool = False,
) -> Scores:
    """Score the responses of `seq` (B rows; `prompts` (B,) their PromptExamples, `texts` (B,) the decoded responses)
    with `reward` (FunctionReward / ModelReward, or anything with `score(prompts, seq, texts)`), then shape them with
    `reward_cfg` (a stage's `reward` group: clip, missing_eos_penalty, missing_eos_score; None: no shaping, shaped ==
    raw) and `stats` (see `Stats`; a function is called once, with the raw scores). `allow_invalid`: a reward
    function's None / NaN / inf becomes a NaN score instead of a UserError."""
    if allow_invalid:
        raw = reward.score(prompts, seq, texts, allow_invalid=True)
    else:
        raw = reward.score(prompts, seq, texts)  # rewards written against the plain interface keep working
    if callable(stats):
        stats = stats(raw)
    shaped = raw.float().clone() if reward_cfg is None else shape_scores(raw, seq.has_eos, reward_cfg, stats)
    return Scores(raw, torch.where(torch.isfinite(raw), shaped, torch.nan))


def shape_scores(
    scores: torch.Tensor, has_eos: torch.Tensor, reward_cfg: Any, stats: tuple[float, float] | None
) -> torch.Tensor:
    """The score that enters the reward: optional normalisation with (mean, std), optional clipping, then the
    missing-EOS rule (stage.reward.missing_eos_penalty, or missing_eos_score in its place) in the units of the
    normalised score, as InstructGPT-style setups do: a penalty of 1 is then one standard deviation whatever the
    reward model's scale, and the statistics describe the reward model's own scores. (B,), (B,) bool -> (B,)."""
    shaped = normalize_scores(scores, *stats, reward_cfg.clip) if stats else clip_scores(scores, reward_cfg.clip)
    return apply_missing_eos(shaped, has_eos, reward_cfg.missing_eos_penalty, reward_cfg.missing_eos_score)
