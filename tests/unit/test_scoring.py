"""One scoring function for every online stage (rlhf_cli/rollout/scoring.py): raw scores from the reward source,
shaped by normalisation, clipping and the missing-EOS rule; unscorable responses are an error for PPO and NaN for
the stages that allow them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli.errors import UserError
from rlhf_cli.rollout.generation import join
from rlhf_cli.rollout.rewards import FunctionReward
from rlhf_cli.rollout.scoring import Scores, score_responses

NAN = float("nan")
HERE = "test_scoring"
# Every fixture function below returns one value per response, keyed by the response's text.
VALUES = {"good": 2.0, "bad": -1.0, "none": None, "nan": NAN, "inf": math.inf}


def by_text(prompts, responses):
    return [VALUES[r] for r in responses]


def _seq(has_eos):
    n = len(has_eos)
    return join(
        torch.zeros(n, 1, dtype=torch.long),
        torch.ones(n, 1),
        torch.ones(n, 1, dtype=torch.long),
        torch.ones(n, 1),
        torch.tensor(has_eos),
    )


def _prompts(n):
    return [SimpleNamespace(text=f"prompt {i}") for i in range(n)]


def _cfg(clip=None, penalty=1.0, score=None):
    return SimpleNamespace(clip=clip, missing_eos_penalty=penalty, missing_eos_score=score)


def test_raw_and_shaped_scores_with_fixed_statistics():
    texts = ["good", "bad", "good"]
    out = score_responses(
        FunctionReward(f"{HERE}:by_text"),
        _prompts(3),
        _seq([True, True, False]),
        texts,
        _cfg(clip=1.0),
        stats=(1.0, 2.0),
    )
    assert isinstance(out, Scores)
    assert out.raw.tolist() == [2.0, -1.0, 2.0] and out.valid.all()
    # (raw - 1) / 2, clipped to +-1, then the missing-EOS penalty of 1 on the truncated third response
    assert out.shaped.tolist() == pytest.approx([0.5, -1.0, 0.5 - 1.0])


def test_statistics_from_a_function_see_the_raw_scores_once():
    seen = []

    def running(raw):
        seen.append(raw.tolist())
        return float(raw.mean()), 1.0

    out = score_responses(
        FunctionReward(f"{HERE}:by_text"), _prompts(2), _seq([True, True]), ["good", "bad"], _cfg(), stats=running
    )
    assert seen == [[2.0, -1.0]] and out.shaped.tolist() == pytest.approx([1.5, -1.5])


def test_no_reward_config_leaves_the_scores_unshaped():
    out = score_responses(FunctionReward(f"{HERE}:by_text"), _prompts(2), _seq([True, False]), ["good", "bad"], None)
    assert out.shaped.tolist() == out.raw.tolist() == [2.0, -1.0]


@pytest.mark.parametrize("text", ["none", "nan", "inf"])
def test_an_unscorable_response_is_an_error_unless_allowed(text):
    reward, seq, texts = FunctionReward(f"{HERE}:by_text"), _seq([True, True, False]), ["good", text, text]
    with pytest.raises(UserError, match=f"stage.reward.function {HERE}:by_text"):
        score_responses(reward, _prompts(3), seq, texts, _cfg())
    # Allowed: NaN raw and shaped, also where the missing-EOS rule would replace the score of a truncated response.
    out = score_responses(reward, _prompts(3), seq, texts, _cfg(score=-5.0), allow_invalid=True)
    assert out.valid.tolist() == [True, False, False]
    assert out.raw[0] == 2.0 and out.shaped[0] == 2.0
    assert out.raw[1:].isnan().all() and out.shaped[1:].isnan().all()


def test_a_reward_without_allow_invalid_in_its_signature_still_scores():
    """Rewards written against the plain interface `score(prompts, seq, texts)` (test doubles, user code)."""

    class Plain:
        def score(self, prompts, seq, texts):
            return torch.tensor([float(len(t)) for t in texts])

    out = score_responses(Plain(), _prompts(2), _seq([True, True]), ["ab", "abcd"], _cfg())
    assert out.raw.tolist() == [2.0, 4.0]


def test_function_reward_length_and_type_are_checked_even_when_invalid_is_allowed():
    with pytest.raises(UserError, match="one finite number per response"):
        FunctionReward(f"{HERE}:one_value").score(_prompts(2), _seq([True, True]), ["a", "b"], allow_invalid=True)
    with pytest.raises(UserError, match="must return a list of numbers"):
        FunctionReward(f"{HERE}:words").score(_prompts(2), _seq([True, True]), ["a", "b"], allow_invalid=True)


def one_value(prompts, responses):
    return [1.0]


def words(prompts, responses):
    return ["good"] * len(responses)


def test_score_command_and_model_reward_share_the_classifier_helpers():
    """`rlhf score` and the online stages' ModelReward take loading, labels and encoding from models/, and nothing
    under rollout/ or models/ imports commands/."""
    from pathlib import Path

    import rlhf_cli
    from rlhf_cli.commands import score
    from rlhf_cli.models import classifier

    assert score.load is classifier.load_classifier and score.label_index is classifier.label_index
    root = Path(rlhf_cli.__file__).parent
    for folder in ("rollout", "models"):
        for path in (root / folder).glob("*.py"):
            assert "rlhf_cli.commands" not in path.read_text(), path
