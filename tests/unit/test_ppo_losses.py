"""PPO building blocks against hand-computed numbers (python math, not the functions under test)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from helpers import close, t

from rlhf_cli.losses.ppo import (
    KL_ESTIMATORS,
    apply_missing_eos,
    clip_scores,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    normalize_scores,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from rlhf_cli.rollout.controllers import AdaptiveKLController, FixedKLController, RunningMoments, kl_controller

NAN = float("nan")


def reference_gae(r: list[float], v: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Plain python GAE over one unpadded sequence, V after the end = 0."""
    adv, last = [0.0] * len(r), 0.0
    for i in reversed(range(len(r))):
        next_v = v[i + 1] if i + 1 < len(r) else 0.0
        last = r[i] + gamma * next_v - v[i] + gamma * lam * last
        adv[i] = last
    return adv, [a + b for a, b in zip(adv, v, strict=True)]


# ---------------------------------------------------------------- masked statistics and whitening

X = t([[1.0, 2.0, 3.0, NAN], [4.0, 1e6, -1e6, NAN]])  # junk, even nan, at invalid positions
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
# Valid values 1, 2, 3, 4: mean 2.5, biased var (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, unbiased 5 / 3.


def test_masked_sum_mean_var_ignore_junk():
    assert masked_sum(X, MASK).item() == 10.0
    assert masked_mean(X, MASK.float()).item() == 2.5
    assert masked_var(X, MASK).item() == pytest.approx(1.25)
    assert masked_var(X, MASK, unbiased=True).item() == pytest.approx(5 / 3)


def test_masked_stats_edge_cases():
    empty = torch.zeros(2, 4, dtype=torch.bool)
    assert masked_mean(X, empty).item() == 0.0  # count clamped at 1
    one = torch.zeros(2, 4, dtype=torch.bool)
    one[1, 0] = True
    assert masked_var(X, one, unbiased=True).item() == 0.0  # no Bessel division by zero
    with pytest.raises(ValueError, match="shape"):
        masked_sum(X, MASK[:, :2])


@pytest.mark.parametrize("unbiased,var", [(False, 1.25), (True, 5 / 3)])
def test_masked_whiten_hand_computed(unbiased, var):
    out = masked_whiten(X, MASK, unbiased=unbiased)
    scale = 1 / math.sqrt(var + 1e-8)
    close(out, [[-1.5 * scale, -0.5 * scale, 0.5 * scale, 0.0], [1.5 * scale, 0.0, 0.0, 0.0]])


def test_masked_whiten_mean0_std1_and_shift_mean():
    out = masked_whiten(X, MASK)
    assert masked_mean(out, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out, MASK).item() == pytest.approx(1.0, abs=1e-6)
    kept = masked_whiten(X, MASK, shift_mean=False)
    assert masked_mean(kept, MASK).item() == pytest.approx(2.5, abs=1e-6)
    assert kept[0, 3].item() == 0.0 and kept[1, 1].item() == 0.0
    close(kept[0, :3], [2.5 - 1.5 / math.sqrt(1.25 + 1e-8), 2.5 - 0.5 / math.sqrt(1.25 + 1e-8), 2.5 + 0.5 / 1.25**0.5])


# ---------------------------------------------------------------- KL estimators and KL-in-reward


def test_kl_estimators_against_formulas():
    lp, ref = t([-1.0, -2.0, -0.5]), t([-1.5, -1.0, -0.5])  # log_ratio = 0.5, -1.0, 0
    close(kl_penalty(lp, ref, "k1"), [0.5, -1.0, 0.0])
    close(kl_penalty(lp, ref, "k2"), [0.125, 0.5, 0.0])
    close(kl_penalty(lp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0])
    for est in ("k2", "k3"):
        assert (kl_penalty(lp, ref, est) >= 0).all()
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(t([0.0]), t([0.0]), "kl")


def test_per_token_rewards_construction():
    kl = t([[0.1, 0.2, 0.3, 5.0], [0.4, 7.0, 7.0, NAN], [1.0, 1.0, 1.0, 1.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # a 1-token row and an empty row
    kl.requires_grad_(True)
    rewards, non_score = per_token_rewards(kl, t([1.0, 2.0, 3.0]), mask, kl_coef=0.5)
    close(non_score, [[-0.05, -0.1, -0.15, 0.0], [-0.2, 0.0, 0.0, 0.0], [0.0] * 4])
    close(rewards, [[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.2 + 2.0, 0.0, 0.0, 0.0], [0.0] * 4])
    assert not rewards.requires_grad and not non_score.requires_grad


def test_per_token_rewards_score_on_last_valid_of_any_mask():
    mask = torch.tensor([[0, 1, 0, 1, 0]], dtype=torch.bool)  # not a prefix: the score goes on index 3
    rewards, _ = per_token_rewards(torch.zeros(1, 5), t([4.0]), mask, kl_coef=0.1)
    close(rewards, [[0.0, 0.0, 0.0, 4.0, 0.0]])


def test_apply_missing_eos():
    scores, has_eos = t([1.0, 2.0, -0.5]), torch.tensor([True, False, False])
    close(apply_missing_eos(scores, has_eos, penalty=1.0), [1.0, 1.0, -1.5])
    close(apply_missing_eos(scores, has_eos, replace_with=-1.0), [1.0, -1.0, -1.0])
    same = apply_missing_eos(scores, has_eos)
    close(same, [1.0, 2.0, -0.5])
    same[0] = 9.0
    assert scores[0].item() == 1.0  # a new tensor
    # The replacement wins over the penalty (so missing_eos_score can be set without unsetting the default penalty).
    close(apply_missing_eos(scores, has_eos, penalty=1.0, replace_with=-1.0), [1.0, -1.0, -1.0])


# ---------------------------------------------------------------- GAE


def test_gae_worked_example():
    r, v = [-0.005, 0.01, 0.985], [0.2, 0.4, 0.6]
    adv, ret = gae(t([r]), t([v]), torch.ones(1, 3), gamma=1.0, lam=0.95)
    close(adv, [[0.7419625, 0.57575, 0.385]])
    close(ret, [[0.9419625, 0.97575, 0.985]])
    ref_adv, ref_ret = reference_gae(r, v, 1.0, 0.95)
    close(adv, [ref_adv])
    close(ret, [ref_ret])


def test_gae_masked_batch_no_junk_leak():
    rewards = t([[-0.005, 0.01, 0.985, 0.0], [0.1, 0.5, 99.0, NAN]])
    values = t([[0.2, 0.4, 0.6, 0.0], [0.3, 0.2, 50.0, -7.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 1: the next value after the last valid token counts as 0 (not 50).
    a1 = 0.5 + 0.0 - 0.2
    a0 = 0.1 + 1.0 * 0.2 - 0.3 + 0.95 * a1
    close(adv, [[0.7419625, 0.57575, 0.385, 0.0], [a0, a1, 0.0, 0.0]])
    close(ret, [[0.9419625, 0.97575, 0.985, 0.0], [a0 + 0.3, a1 + 0.2, 0.0, 0.0]])


def test_gae_discount_and_holes():
    r, v = [0.3, -0.2, 1.0], [0.5, 0.1, 0.4]
    ref_adv, ref_ret = reference_gae(r, v, 0.9, 0.8)
    # The same 3 valid tokens with holes and junk between them: laid end to end.
    mask = t([[0, 1, 0, 1, 1, 0]])
    adv, ret = gae(t([[9.0, 0.3, 9.0, -0.2, 1.0, 9.0]]), t([[9.0, 0.5, 9.0, 0.1, 0.4, 9.0]]), mask, 0.9, 0.8)
    close(adv, [[0.0, ref_adv[0], 0.0, ref_adv[1], ref_adv[2], 0.0]])
    close(ret, [[0.0, ref_ret[0], 0.0, ref_ret[1], ref_ret[2], 0.0]])


# ---------------------------------------------------------------- policy and value losses

OLD = t([-1.0, -2.0, -0.3, -1.1, -0.7])
RATIO = [1.5, 1.5, 0.5, 0.5, 1.0]
ADV = t([1.0, -1.0, 1.0, -1.0, 0.7])


def test_policy_loss_clip_cases():
    logprobs = OLD + torch.log(t(RATIO))
    loss, clipped, approx_kl = policy_loss(logprobs, OLD, ADV, clip_eps=0.2)
    close(loss, [-1.2, 1.5, -0.5, 0.8, -0.7])
    close(clipped, [1.0, 0.0, 0.0, 1.0, 0.0])
    k3 = [(r - 1) - math.log(r) for r in RATIO]
    close(approx_kl, k3)
    assert approx_kl[4].item() == pytest.approx(0.0, abs=1e-7) and loss[4].item() == pytest.approx(-0.7)
    assert not approx_kl.requires_grad


def test_policy_loss_gradient_only_where_not_clipped():
    logprobs = (OLD + torch.log(t(RATIO))).requires_grad_(True)
    loss, _, _ = policy_loss(logprobs, OLD, ADV, clip_eps=0.2)
    loss.sum().backward()
    # d(-A ratio)/d logprob = -A ratio where the unclipped branch is taken; 0 where clipped.
    close(logprobs.grad, [0.0, 1.5, -0.5, 0.0, -0.7])


def test_policy_loss_log_ratio_clamped():
    loss, _, approx_kl = policy_loss(t([50.0]), t([0.0]), t([-1.0]), clip_eps=0.2)
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)
    assert approx_kl.item() == pytest.approx(math.exp(20.0) - 1 - 20.0, rel=1e-5)


def test_value_loss_clips_around_old_values():
    values, old, returns = t([1.0, 1.1, 0.5, -1.0]), t([0.0, 1.0, 0.0, 0.0]), t([2.0, 1.0, 0.4, 2.0])
    loss, clipped = value_loss(values, old, returns, clip_eps=0.2)
    expected = [
        max(0.5 * (1.0 - 2.0) ** 2, 0.5 * (0.2 - 2.0) ** 2),  # 1.62, clipped
        0.5 * 0.1**2,  # inside the clip range: both terms equal
        max(0.5 * 0.1**2, 0.5 * (0.2 - 0.4) ** 2),  # 0.02, clipped
        max(0.5 * 3.0**2, 0.5 * (-0.2 - 2.0) ** 2),  # 4.5, unclipped is larger
    ]
    assert expected[0] == pytest.approx(1.62)
    close(loss, expected)
    close(clipped, [1.0, 0.0, 1.0, 0.0])


def test_value_loss_gradient():
    values = t([1.0, 1.1, -1.0]).requires_grad_(True)
    loss, _ = value_loss(values, t([0.0, 1.0, 0.0]), t([2.0, 1.0, 2.0]), clip_eps=0.2)
    loss.sum().backward()
    close(values.grad, [0.0, 0.1, -3.0])  # d 1/2 (V - R)^2 = V - R where not clipped


# ---------------------------------------------------------------- entropy, explained variance


def test_entropy_uniform_and_hand_computed():
    uniform = entropy_from_logits(torch.zeros(2, 3, 7, dtype=torch.bfloat16))
    assert uniform.dtype == torch.float32 and uniform.shape == (2, 3)
    close(uniform, [[math.log(7)] * 3] * 2)
    skewed = entropy_from_logits(t([[[0.0, math.log(3.0)], [0.0, 0.0]]]))
    close(skewed, [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2)]])
    masked_vocab = entropy_from_logits(t([[[0.0, 0.0, -math.inf]]]))
    close(masked_vocab, [[math.log(2)]])


def test_explained_variance():
    returns, mask = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 4), returns, mask) == pytest.approx(0.0, abs=1e-6)
    # R - V = [-0.5, 0, 0.5]: var 1/6; var R = 2/3 -> 1 - 0.25.
    assert explained_variance(t([[1.5, 2.0, 2.5, -50.0]]), returns, mask) == pytest.approx(0.75)
    assert math.isnan(explained_variance(returns, t([[2.0, 2.0, 2.0, 9.0]]), mask))


# ---------------------------------------------------------------- KL controllers


@pytest.mark.parametrize(
    "kl,expected",
    [
        (12.0, 0.2 * (1 + 0.2 * 64 / 10000)),  # e = 1 clipped to 0.2
        (3.0, 0.2 * (1 - 0.2 * 64 / 10000)),  # e = -0.5 clipped to -0.2
        (6.6, 0.2 * (1 + 0.1 * 64 / 10000)),  # e = 0.1 inside the clip
    ],
)
def test_adaptive_kl_update(kl, expected):
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(kl, n_steps=64)
    assert ctl.value == pytest.approx(expected, rel=1e-12)


def test_fixed_kl_and_factory():
    fixed = kl_controller("fixed", 0.05, target=6.0, horizon=10000)
    assert isinstance(fixed, FixedKLController)
    fixed.update(100.0, n_steps=64)
    assert fixed.value == 0.05
    assert isinstance(kl_controller("adaptive", 0.2, 6.0, 10000), AdaptiveKLController)
    with pytest.raises(ValueError, match="adaptive"):
        kl_controller("linear", 0.2, 6.0, 10000)
    with pytest.raises(ValueError, match="non-finite"):
        AdaptiveKLController(0.2, 6.0, 10000).update(math.nan, 64)


def test_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=64)
    ctl.update(12.0, n_steps=64)
    restored = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == pytest.approx(0.2 * (1 + 0.2 * 64 / 10000) ** 2, rel=1e-12)
    fixed = FixedKLController(0.3)
    fixed.load_state_dict({"value": 0.07})
    assert fixed.state_dict() == {"value": 0.07}


# ---------------------------------------------------------------- running moments, score normalisation


def test_running_moments_chunks_equal_concatenation():
    chunks = [[1.0, 4.0, -2.0], [10.0], [0.5, 0.25, 3.0, -7.0, 2.0], [6.0, 6.0]]
    rm = RunningMoments()
    assert rm.std == 1.0
    rm.update(t(chunks[0][:1]))
    assert rm.std == 1.0 and rm.mean == 1.0  # one value: no spread yet
    rm = RunningMoments()
    for chunk in chunks[:2]:
        rm.update(t(chunk))
    restored = RunningMoments()
    restored.load_state_dict(rm.state_dict())
    for chunk in chunks[2:]:
        restored.update(t(chunk))
    restored.update(torch.zeros(0))  # an empty batch changes nothing
    flat = [x for chunk in chunks for x in chunk]
    assert restored.count == len(flat)
    assert restored.mean == pytest.approx(statistics.fmean(flat), rel=1e-12)
    assert restored.std == pytest.approx(statistics.pstdev(flat), rel=1e-12)


def test_normalize_and_clip_scores():
    scores = t([3.0, -5.0, 1.0])
    close(normalize_scores(scores, mean=1.0, std=2.0, clip=None), [1.0, -3.0, 0.0])
    close(normalize_scores(scores, mean=1.0, std=2.0, clip=2.0), [1.0, -2.0, 0.0])
    close(normalize_scores(scores, mean=1.0, std=0.0, clip=None), [2e8, -6e8, 0.0])  # std floored at 1e-8
    close(clip_scores(scores, None), [3.0, -5.0, 1.0])
    close(clip_scores(scores, 2.5), [2.5, -2.5, 1.0])
    with pytest.raises(ValueError):
        clip_scores(scores, 0.0)
