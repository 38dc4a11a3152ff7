"""Critic-free building blocks (GRPO, RLOO, REINFORCE++) against numbers worked out by hand in the comments."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from helpers import close, t

from rlhf_cli.losses import critic_free as cf
from rlhf_cli.losses.critic_free import (
    AGGREGATIONS,
    aggregate,
    clipped_surrogate,
    dynamic_sampling_mask,
    global_moments,
    global_whiten,
    group_advantages,
    group_stats,
    k3_kl_loss,
    mask_truncated,
    reinforce_pp_returns,
    rloo_advantages,
    sequence_k1,
    zero_variance_fraction,
    zero_variance_groups,
)
from rlhf_cli.losses.ppo import policy_loss

NAN = float("nan")


class FakeRanks:
    """n threads standing for n ranks; `reducer(rank)` is that rank's all-reduce (sum, the same on every rank)."""

    def __init__(self, n: int):
        self.n, self.slots = n, [None] * n
        self.barrier = threading.Barrier(n, timeout=30)

    def reducer(self, rank: int):
        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = x.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())  # rank order: bitwise the same on every rank
            self.barrier.wait()  # nobody overwrites a slot before every rank has summed
            return total

        return all_reduce

    def run(self, fn):
        """fn(rank, all_reduce) on every rank at once -> the results in rank order."""
        results, errors = [None] * self.n, []

        def body(rank):
            try:
                results[rank] = fn(rank, self.reducer(rank))
            except Exception as e:  # surfaced below, not lost in the thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return results


# ---------------------------------------------------------------- GRPO group advantages

# G = 4, three groups.
# A = [1, 2, 3, 6]: mean 3, deviations -2 -1 0 3, squares sum 14: unbiased std sqrt(14/3), biased sqrt(3.5).
# B = [0.5] * 4: zero variance -> advantages exactly 0.
# C = [1, nan, 0, 2]: valid 1 0 2, mean 1, deviations 0 -1 1, squares sum 2: unbiased std 1, biased sqrt(2/3).
SCORES = t([1, 2, 3, 6, 0.5, 0.5, 0.5, 0.5, 1, NAN, 0, 2])
DEV = [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 1.0]
VALID = [True] * 9 + [False, True, True]


def test_group_stats_hand_computed():
    mean, std, n = group_stats(SCORES, 4)
    close(mean, [3.0, 0.5, 1.0])
    close(std, [math.sqrt(14 / 3), 0.0, 1.0])
    assert n.tolist() == [4, 4, 3]
    _, biased, _ = group_stats(SCORES, 4, unbiased=False)
    close(biased, [math.sqrt(3.5), 0.0, math.sqrt(2 / 3)])
    # No valid sample: mean 0, std 0. One valid sample: its own mean, std 0 (no Bessel division by 0).
    mean, std, n = group_stats(t([NAN, NAN, 7.0, NAN]), 2)
    close(mean, [0.0, 7.0])
    close(std, [0.0, 0.0])
    assert n.tolist() == [0, 1]


def test_group_advantages_group_scaling():
    adv, valid = group_advantages(SCORES, 4)
    std = [math.sqrt(14 / 3)] * 4 + [1.0] * 4 + [1.0] * 4  # group B's deviations are 0 whatever it is divided by
    close(adv, [d / (s + 1e-4) for d, s in zip(DEV, std, strict=True)])
    assert valid.tolist() == VALID
    assert adv[4:10].eq(0).all()  # the zero-variance group and the nan sample: exactly 0, not 0 / eps noise
    biased, _ = group_advantages(SCORES, 4, unbiased=False, eps=0.0)
    close(biased[:4], [-2 / math.sqrt(3.5), -1 / math.sqrt(3.5), 0.0, 3 / math.sqrt(3.5)])


def test_group_advantages_none_scaling_is_dr_grpo():
    adv, valid = group_advantages(SCORES, 4, scale="none")
    close(adv, DEV)
    assert valid.tolist() == VALID


def test_group_advantages_batch_scaling():
    # The 11 valid scores: sum 17, sum of squares 1+4+9+36 + 4*0.25 + 1+0+4 = 56, so the squared deviations from the
    # mean 17/11 sum to 56 - 17^2/11 = 327/11; unbiased variance 327/110.
    adv, _ = group_advantages(SCORES, 4, scale="batch")
    close(adv, [d / (math.sqrt(327 / 110) + 1e-4) for d in DEV])
    # A std computed elsewhere (all ranks) is used as given.
    adv, _ = group_advantages(SCORES, 4, scale="batch", batch_std=torch.tensor(2.0), eps=0.0)
    close(adv, [d / 2 for d in DEV])
    mean, var = global_moments(SCORES, torch.isfinite(SCORES), unbiased=True)
    close(mean, 17 / 11)
    close(var, 327 / 110)


def test_zero_variance_groups_are_exactly_zero_even_for_inexact_floats():
    scores = t([0.1, 0.1, 0.1, 0.3, 0.3, 0.3])  # mean of three 0.1f need not be 0.1f to the last bit
    for scale in ("group", "batch", "none"):
        adv, _ = group_advantages(scores, 3, scale=scale)
        assert adv.eq(0).all(), scale
    adv, _ = rloo_advantages(scores, 3)
    assert adv.eq(0).all()


def test_group_size_one_rejected_clearly():
    for fn in (lambda: group_advantages(t([1.0, 2.0]), 1), lambda: rloo_advantages(t([1.0, 2.0]), 1)):
        with pytest.raises(ValueError, match="at least 2 samples per prompt, got 1"):
            fn()
    with pytest.raises(ValueError, match="multiple of the group size"):
        group_advantages(t([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="scaling"):
        group_advantages(SCORES, 4, scale="std")


def test_zero_variance_fraction_and_dynamic_sampling():
    grouped = t([[1, 1, 1], [0, 1, 0], [0.5, 0.5, 0.5], [NAN, 1, 1], [NAN, NAN, 2]])
    # Kept: only [0, 1, 0]. [nan, 1, 1] has two equal valid scores, [nan, nan, 2] one valid: no signal either.
    assert zero_variance_groups(grouped.reshape(-1), 3).tolist() == [True, False, True, True, True]
    assert zero_variance_fraction(grouped.reshape(-1), 3) == pytest.approx(4 / 5)
    keep, dropped = dynamic_sampling_mask(grouped)
    assert keep.tolist() == [False, True, False, False, False] and dropped == 4
    with pytest.raises(ValueError, match="groups, G"):
        dynamic_sampling_mask(grouped.reshape(-1))


def test_groups_split_across_ranks_equal_one_process():
    # 3 groups of 4 over 2 ranks of 6 rows: group 1 (rows 4-7) has two samples on each rank. Each rank gathers the
    # scores in global row order (all_gather_cat, simulated by cat), computes, keeps its own rows.
    whole, _ = group_advantages(SCORES, 4)
    parts = [SCORES[:6], SCORES[6:]]
    gathered = torch.cat(parts)
    mine = [group_advantages(gathered, 4)[0][r * 6 : (r + 1) * 6] for r in range(2)]
    torch.testing.assert_close(torch.cat(mine), whole, rtol=0, atol=0)
    # The same per-group stats on every rank, whichever rows it holds.
    mean, std, _ = group_stats(gathered, 4)
    torch.testing.assert_close(mean, group_stats(SCORES, 4)[0], rtol=0, atol=0)
    torch.testing.assert_close(std, group_stats(SCORES, 4)[1], rtol=0, atol=0)


# ---------------------------------------------------------------- RLOO


def test_rloo_leave_one_out_baselines():
    # [1, 2, 3, 6]: baselines (2+3+6)/3 = 11/3, (1+3+6)/3 = 10/3, (1+2+6)/3 = 3, (1+2+3)/3 = 2
    # -> advantages -8/3, -4/3, 0, 4, which is k/(k-1) (R - mean) = 4/3 * (-2, -1, 0, 3).
    adv, valid = rloo_advantages(t([1, 2, 3, 6]), 4)
    close(adv, [-8 / 3, -4 / 3, 0.0, 4.0])
    assert valid.all()
    # k = 2: A = R_i - R_other.
    close(rloo_advantages(t([1, 4, 2, 2]), 2)[0], [-3.0, 3.0, 0.0, 0.0])


def test_rloo_nan_reward_left_out_of_baselines():
    # k = 2, pairs (1, nan) (3, 5) (nan, 2) (7, 8): a valid sample whose partner is nan has no baseline -> 0, the
    # nan samples -> 0, the others R_i - R_other.
    adv, valid = rloo_advantages(t([1, NAN, 3, 5, NAN, 2, 7, 8]), 2)
    close(adv, [0.0, 0.0, -2.0, 2.0, 0.0, 0.0, -1.0, 1.0])
    assert valid.tolist() == [True, False, True, True, False, True, True, True]
    # k = 4, [1, nan, 3, 5]: valid 1 3 5; baselines (3+5)/2 = 4, (1+5)/2 = 3, (1+3)/2 = 2 -> -3, 0, 3; nan -> 0.
    adv, valid = rloo_advantages(t([1, NAN, 3, 5]), 4)
    close(adv, [-3.0, 0.0, 0.0, 3.0])
    assert valid.tolist() == [True, False, True, True]


def test_rloo_sequence_kl_enters_the_reward_before_the_baseline():
    # log-ratios 0.5, -1, 0 on valid tokens (junk, even nan, after the end): sequence k1 = -0.5; row 2: 2.0.
    lp = t([[-1.0, -2.0, -0.5, NAN], [-0.5, 9.0, 9.0, 9.0]]).requires_grad_(True)
    ref = t([[-1.5, -1.0, -0.5, 0.0], [-2.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    kl = sequence_k1(lp, ref, mask)
    close(kl, [-0.5, 2.0])
    assert not kl.requires_grad
    # scores 1, 1 with beta 0.5: R = 1 + 0.25 = 1.25 and 1 - 1 = 0 -> A = 1.25, -1.25.
    adv, _ = rloo_advantages(t([1.0, 1.0]), 2, seq_kl=kl, kl_coef=0.5)
    close(adv, [1.25, -1.25])


# ---------------------------------------------------------------- REINFORCE++

KL = t([[0.1, 0.2, 0.3, 7.0], [0.4, 0.5, NAN, 7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)  # right padding


def test_reinforce_pp_returns_discounted_with_padding():
    # beta 0.5: row 0 rewards -0.05, -0.1, -0.15 + 1 = 0.85; row 1 rewards -0.2, -0.25 + 2 = 1.75.
    # gamma 0.9, right to left: row 0: 0.85; -0.1 + 0.9 * 0.85 = 0.665; -0.05 + 0.9 * 0.665 = 0.5485.
    #                           row 1: 1.75; -0.2 + 0.9 * 1.75 = 1.375.
    returns, valid = reinforce_pp_returns(KL, t([1.0, 2.0]), MASK, kl_coef=0.5, gamma=0.9)
    close(returns, [[0.5485, 0.665, 0.85, 0.0], [1.375, 1.75, 0.0, 0.0]])
    assert valid.all()
    # gamma 1 (the default): plain suffix sums.
    returns, _ = reinforce_pp_returns(KL, t([1.0, 2.0]), MASK, kl_coef=0.5)
    close(returns, [[0.7, 0.75, 0.85, 0.0], [1.55, 1.75, 0.0, 0.0]])


def test_reinforce_pp_baseline_subtracts_group_mean_of_scores():
    # One group of 2: mean 1.5 -> outcome -0.5, +0.5. Row 0 rewards -0.05, -0.1, -0.65 -> returns -0.8, -0.75, -0.65;
    # row 1 rewards -0.2, 0.25 -> returns 0.05, 0.25.
    returns, _ = reinforce_pp_returns(KL, t([1.0, 2.0]), MASK, kl_coef=0.5, group_size=2)
    close(returns, [[-0.8, -0.75, -0.65, 0.0], [0.05, 0.25, 0.0, 0.0]])


def test_reinforce_pp_baseline_gives_an_all_equal_group_the_whitening_shift_unless_it_is_out_of_the_mask():
    # G = 2, no KL: group (1, 0) and the all-equal group (2, 2); response lengths 2, 1, 1, 1.
    # Before whitening each token carries its score minus the group mean: row 0 [0.5, 0.5], row 1 [-0.5], rows 2-3
    # [0]: the all-equal group's returns are 0.
    # Global whitening over all 5 tokens (OpenRLHF reinforce_baseline): mean 0.1, biased variance
    # (2 x 0.4^2 + 0.6^2 + 2 x 0.1^2) / 5 = 0.14, so the all-equal group gets (0 - 0.1) / sqrt(0.14) = -0.26726 on
    # each token, not 0 (the shift is the batch's token-weighted baseline, the same for every row).
    # With its rows out of the mask (what the stage does with dynamic sampling's filler groups): over the 3 tokens
    # left, mean 1/6 and variance 2/9: row 0 (0.5 - 1/6) / sqrt(2/9) = 0.70711, row 1 -1.41421, the filler 0.
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 0]], dtype=torch.bool)
    returns, _ = reinforce_pp_returns(torch.zeros(4, 2), t([1.0, 0.0, 2.0, 2.0]), mask, kl_coef=0.0, group_size=2)
    close(returns, [[0.5, 0.5], [-0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
    shift = -0.1 / math.sqrt(0.14)
    close(
        global_whiten(returns, mask),
        [[0.4 / math.sqrt(0.14)] * 2, [-0.6 / math.sqrt(0.14), 0.0], [shift, 0.0], [shift, 0.0]],
    )
    kept = mask & torch.tensor([True, True, False, False])[:, None]
    close(global_whiten(returns, kept), [[1 / math.sqrt(2)] * 2, [-math.sqrt(2), 0.0], [0.0, 0.0], [0.0, 0.0]])


def test_reinforce_pp_nan_score_row_is_zero_and_invalid():
    returns, valid = reinforce_pp_returns(KL, t([NAN, 2.0]), MASK, kl_coef=0.5, gamma=0.9)
    close(returns, [[0.0] * 4, [1.375, 1.75, 0.0, 0.0]])
    assert valid.tolist() == [False, True]


def test_global_whiten_hand_computed():
    # Valid 1, 2, 3, 4 (junk elsewhere): mean 2.5, biased var 1.25.
    x = t([[1.0, 2.0, NAN], [3.0, 4.0, 1e9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    s = 1 / math.sqrt(1.25)
    close(global_whiten(x, mask), [[-1.5 * s, -0.5 * s, 0.0], [0.5 * s, 1.5 * s, 0.0]])
    # Precomputed moments are used as given; a zero variance is clamped at eps, not divided by.
    close(global_whiten(x, mask, moments=(torch.tensor(2.0), torch.tensor(4.0))), [[-0.5, 0.0, 0.0], [0.5, 1.0, 0.0]])
    flat = global_whiten(torch.ones(2, 3), mask)
    assert flat.eq(0).all()


def test_global_whiten_over_two_fake_ranks_equals_the_whole_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 1
    mask = torch.rand(6, 5) > 0.3
    mask[4] = False  # a rank may even hold a row without any valid token
    whole = global_whiten(x, mask)
    halves = FakeRanks(2).run(lambda r, reduce: global_whiten(x[3 * r : 3 * r + 3], mask[3 * r : 3 * r + 3], reduce))
    torch.testing.assert_close(torch.cat(halves), whole)
    per_rank_only = torch.cat([global_whiten(x[:3], mask[:3]), global_whiten(x[3:], mask[3:])])
    assert not torch.allclose(per_rank_only, whole)  # so the all-reduce is what makes them equal
    moments = FakeRanks(2).run(lambda r, reduce: global_moments(x[3 * r : 3 * r + 3], mask[3 * r : 3 * r + 3], reduce))
    for mean, var in moments:
        torch.testing.assert_close(mean, x[mask].mean())
        torch.testing.assert_close(var, x[mask].var(unbiased=False))


# ---------------------------------------------------------------- clipped surrogate (clip-higher)


def test_clip_higher_asymmetry():
    # eps_low 0.2, eps_high 0.28: range [0.8, 1.28].
    ratio = t([[1.25, 1.3, 0.75, 0.75, 1.25]])
    adv = t([[1.0, 1.0, -1.0, 1.0, -1.0]])
    lp = torch.log(ratio).requires_grad_(True)
    loss, low, high = clipped_surrogate(lp, torch.zeros_like(lp), adv, clip_low=0.2, clip_high=0.28)
    # 1.25, A>0: inside [0.8, 1.28] -> not clipped, -1.25 (symmetric eps 0.2 would clip it to -1.2).
    # 1.30, A>0: above 1.28 -> -1.28, clipped high.  0.75, A<0: below 0.8 -> max(0.75, 0.8) = 0.8, clipped low.
    # 0.75, A>0: max(-0.75, -0.8) = -0.75, not clipped.  1.25, A<0: 1.25, not clipped.
    close(loss, [[-1.25, -1.28, 0.8, -0.75, 1.25]])
    assert low.tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0]]
    assert high.tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]
    loss.sum().backward()
    # d(-A ratio)/d logprob = -A ratio where not clipped, 0 where clipped.
    close(lp.grad, [[-1.25, 0.0, 0.0, -0.75, 1.25]])
    sym, _, _ = policy_loss(lp.detach(), torch.zeros_like(lp), adv, clip_eps=0.2)
    assert sym[0, 0].item() == pytest.approx(-1.2)


def test_clipped_surrogate_symmetric_matches_ppo_and_broadcasts_sequence_advantages():
    torch.manual_seed(1)
    lp, old = torch.randn(3, 4) * 0.3, torch.randn(3, 4) * 0.3
    seq_adv = t([1.0, -2.0, 0.5])
    loss, low, high = clipped_surrogate(lp, old, seq_adv, 0.2, 0.2)
    ppo_loss, clipped, _ = policy_loss(lp, old, seq_adv[:, None].expand(3, 4), 0.2)
    torch.testing.assert_close(loss, ppo_loss)
    torch.testing.assert_close(low + high, clipped)
    # One update per rollout: old = logprobs.detach(), ratio 1, loss -A, gradient -A.
    lp.requires_grad_(True)
    loss, _, _ = clipped_surrogate(lp, lp.detach(), seq_adv, 0.2, 0.28)
    close(loss, [[-1.0] * 4, [2.0] * 4, [-0.5] * 4])
    loss.sum().backward()
    close(lp.grad, [[-1.0] * 4, [2.0] * 4, [-0.5] * 4])


# ---------------------------------------------------------------- k3 KL loss


def test_k3_kl_loss_value_and_gradient():
    # ref - logprob = -0.5, 1.0, 0: k3 = e^-0.5 + 0.5 - 1, e^1 - 1 - 1, 0; gradient 1 - e^(ref - logprob).
    lp = t([[-1.0, -2.0, -0.5]]).requires_grad_(True)
    ref = t([[-1.5, -1.0, -0.5]]).requires_grad_(True)
    k3 = k3_kl_loss(lp, ref)
    close(k3, [[math.exp(-0.5) - 0.5, math.e - 2, 0.0]])
    k3.sum().backward()
    close(lp.grad, [[1 - math.exp(-0.5), 1 - math.e, 0.0]])
    assert ref.grad is None  # the reference is a constant


# ---------------------------------------------------------------- aggregation and truncation

LOSS = t([[1.0, 2.0, 3.0, NAN], [4.0, 1e6, -1e6, NAN]])
LOSS_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)


def test_aggregate_each_mode_hand_computed():
    # token_mean: (1+2+3+4) / 4 = 2.5; over a global count of 8 tokens: 10 / 8.
    assert aggregate(LOSS, LOSS_MASK, "token_mean").item() == pytest.approx(2.5)
    assert aggregate(LOSS, LOSS_MASK, "token_mean", num_tokens=8).item() == pytest.approx(1.25)
    # seq_mean_token_mean: row means 2 and 4 -> 3; over 4 sequences (global): 6 / 4.
    assert aggregate(LOSS, LOSS_MASK, "seq_mean_token_mean").item() == pytest.approx(3.0)
    assert aggregate(LOSS, LOSS_MASK, "seq_mean_token_mean", num_seqs=torch.tensor(4.0)).item() == pytest.approx(1.5)
    # seq_mean_token_sum_norm with norm 4: row sums 6 and 4 -> 1.5 and 1 -> mean 1.25.
    assert aggregate(LOSS, LOSS_MASK, "seq_mean_token_sum_norm", norm_length=4).item() == pytest.approx(1.25)
    assert AGGREGATIONS == ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def test_aggregate_gradients_and_errors():
    x = LOSS.clone().requires_grad_(True)
    aggregate(x, LOSS_MASK, "seq_mean_token_mean").backward()
    # d/dx: 1/(3 tokens * 2 rows) on row 0, 1/(1 * 2) on row 1, 0 (not nan) elsewhere.
    close(x.grad, [[1 / 6, 1 / 6, 1 / 6, 0.0], [0.5, 0.0, 0.0, 0.0]])
    empty = torch.zeros_like(LOSS_MASK)
    for mode in ("token_mean", "seq_mean_token_mean"):
        assert aggregate(LOSS, empty, mode).item() == 0.0
    with pytest.raises(ValueError, match="norm_length"):
        aggregate(LOSS, LOSS_MASK, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(LOSS, LOSS_MASK, "grpo")


def test_mask_truncated_zeroes_rows_without_eos():
    has_eos = torch.tensor([True, False])
    assert mask_truncated(LOSS_MASK, has_eos).tolist() == [[True, True, True, False], [False] * 4]
    out = mask_truncated(LOSS_MASK.float(), has_eos)
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, 1.0, 1.0, 0.0], [0.0] * 4]
    # The truncated row then drops out of the token mean: (1+2+3) / 3.
    assert aggregate(LOSS, mask_truncated(LOSS_MASK, has_eos), "token_mean").item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="has_eos"):
        mask_truncated(LOSS_MASK, torch.tensor([True]))


@pytest.mark.parametrize("mode", cf.AGGREGATIONS)
def test_aggregation_weights_split_over_micro_batches_equal_aggregate(mode):
    """Per-token weights summed over two micro-batches and divided by the global count == `aggregate` of the whole
    batch (what the actor step relies on)."""
    loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [5.0, 6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    w = cf.aggregation_weights(mask, mode, norm_length=4)
    count = cf.aggregation_count(mask[:2], mode) + cf.aggregation_count(mask[2:], mode)
    split = ((w[:2] * loss[:2]).sum() + (w[2:] * loss[2:]).sum()) / count
    whole = cf.aggregate(loss, mask, mode, norm_length=4)
    assert float(split) == pytest.approx(float(whole))
    # by hand: tokens 21/6; per-sequence means (2 + 4 + 5.5)/3; Dr. GRPO sums / 4: (6 + 4 + 11)/4/3
    expected = {"token_mean": 21 / 6, "seq_mean_token_mean": 11.5 / 3, "seq_mean_token_sum_norm": 21 / 12}
    assert float(whole) == pytest.approx(expected[mode])


def test_every_estimator_says_where_its_kl_goes_and_only_grpo_puts_it_in_the_loss():
    from types import SimpleNamespace

    from rlhf_cli.config.online import ADVANTAGES, KL_PLACEMENT, kl_in_loss

    assert set(KL_PLACEMENT) == set(ADVANTAGES)
    assert [a for a in ADVANTAGES if kl_in_loss(SimpleNamespace(advantage=a))] == ["grpo"]


def test_every_estimator_names_its_baseline_and_the_grouped_ones_follow_from_it():
    from types import SimpleNamespace

    from rlhf_cli.config.online import ADVANTAGES, BASELINE, GROUPED, baseline, compares_group

    assert set(BASELINE) == set(ADVANTAGES)
    assert GROUPED == ("grpo", "rloo", "reinforce_pp_baseline")  # plain REINFORCE++ compares with the batch only
    st = {a: SimpleNamespace(advantage=a) for a in ADVANTAGES}
    assert [a for a in ADVANTAGES if compares_group(st[a])] == list(GROUPED)
    assert {a: baseline(st[a]) for a in ADVANTAGES} == {
        "grpo": "group",
        "rloo": "leave_one_out",
        "reinforce_pp": "batch",
        "reinforce_pp_baseline": "group_mean",
    }
