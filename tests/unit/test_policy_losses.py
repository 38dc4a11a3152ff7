"""GSPO and CISPO (rlhf_cli/losses/policy_losses.py; docs/algorithms.md 8.9, 8.10) on hand-computed numbers: values
and gradients, rows of unequal lengths, a row with no valid token (junk there stays out), ratio exactly 1, and how
they compose in the actor step's loss (aggregation weights, sampler weights, k3 KL, entropy)."""

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli.losses.critic_free import aggregate, aggregation_weights, clipped_surrogate, k3_kl_loss
from rlhf_cli.losses.policy_losses import (
    POLICY_LOSSES,
    cispo_surrogate,
    clipped_rows,
    gspo_surrogate,
    policy_surrogate,
    sequence_log_ratio,
)
from rlhf_cli.rollout.update import Objective, _objective_terms

INF = math.inf


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, **kw):
    torch.testing.assert_close(a, t(b) if not isinstance(b, torch.Tensor) else b, **kw)


# Four rows of width 4 (log-prob differences l - l_old on the valid tokens):
#   row 0: 3 tokens, 0.3 -0.1 0.1 -> mean 0.1, s = e^0.1, A = +1: inside [0.8, 1.2]
#   row 1: 2 tokens, 0.5 0.3      -> mean 0.4, s = e^0.4 = 1.49, A = +2: clipped at 1.2
#   row 2: 4 tokens, -0.6 -0.4 -0.5 -0.5 -> mean -0.5, s = e^-0.5 = 0.61, A = -1: clipped at 0.8
#   row 3: no valid token; junk (inf, nan) where the mask is 0
MASK = t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
ADV = t([1.0, 2.0, -1.0, 3.0])


def _inputs():
    old = t([[-1.0, -2.0, -0.5, INF], [-1.0, -1.0, -INF, 0.0], [-1.0, -1.0, -1.0, -1.0], [INF, -INF, 0.0, 0.0]])
    diff = t([[0.3, -0.1, 0.1, 0.0], [0.5, 0.3, 0.0, 0.0], [-0.6, -0.4, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]])
    lp = torch.where(MASK.bool(), old + diff, t([[0, 0, 0, -INF], [0, 0, INF, 7], [0] * 4, [-INF, INF, 1, 2]]))
    lp[3, 2] = math.nan
    return lp.requires_grad_(True), old


def test_sequence_log_ratio_is_the_mean_over_valid_tokens_and_zero_for_an_empty_row():
    lp, old = _inputs()
    seq = sequence_log_ratio(lp, old, MASK)
    close(seq, [0.1, 0.4, -0.5, 0.0])
    seq.sum().backward()  # d mean / d l_t = 1 / |o_i| on the valid tokens, 0 elsewhere
    close(lp.grad, [[1 / 3] * 3 + [0.0], [0.5, 0.5, 0, 0], [0.25] * 4, [0.0] * 4])


def test_gspo_values_clip_flags_and_gradients():
    lp, old = _inputs()
    loss, low, high = gspo_surrogate(lp, old, ADV, MASK, 0.2, 0.2)
    s0 = math.exp(0.1)
    close(loss, [[-s0] * 3 + [0.0], [-2.4, -2.4, 0, 0], [0.8] * 4, [0.0] * 4])
    close(high, [[0.0] * 4, [1.0, 1.0, 0, 0], [0.0] * 4, [0.0] * 4])
    close(low, [[0.0] * 4, [0.0] * 4, [1.0] * 4, [0.0] * 4])
    # Per token the gradient is -A s_i (GSPO-token); the clipped rows get none, the empty row none, no nan anywhere.
    loss.sum().backward()
    close(lp.grad, [[-s0] * 3 + [0.0], [0.0] * 4, [0.0] * 4, [0.0] * 4])
    assert torch.isfinite(lp.grad).all()


def test_gspo_with_the_mean_per_sequence_is_the_papers_sequence_objective():
    """-min(s_i A_i, clip(s_i) A_i) averaged over sequences, differentiated through s_i = exp(mean log-ratio), ==
    the per-token form reduced with seq_mean_token_mean: same value, same gradient (rows in and out of the clip)."""
    torch.manual_seed(0)
    mask = t([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    old = torch.randn(4, 5) - 2
    lp = (old + 0.05 * torch.randn(4, 5)).requires_grad_(True)
    adv = t([0.7, -1.3, 2.0, -0.4])
    lo, hi = 0.01, 0.02
    loss, _, _ = gspo_surrogate(lp, old, adv, mask, lo, hi)
    token_form = aggregate(loss, mask, "seq_mean_token_mean")
    (g_token,) = torch.autograd.grad(token_form, lp)

    s = torch.exp(sequence_log_ratio(lp, old, mask))
    paper = -torch.minimum(s * adv, s.clamp(1 - lo, 1 + hi) * adv).mean()
    (g_paper,) = torch.autograd.grad(paper, lp)
    close(token_form, paper)
    close(g_token, g_paper)
    assert (g_paper.abs() > 0).any() and (g_paper == 0).any()  # some rows clipped, some not: both cases covered


def test_gspo_at_ratio_one_is_the_clip_loss():
    """One update per rollout (old = l.detach()): every ratio is 1, so GSPO, CISPO and the clip loss agree in value
    and gradient: -A per token."""
    lp = t([[-1.0, -2.0, -0.5], [-0.3, -0.7, 5.0]]).requires_grad_(True)
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv = t([[1.0, -2.0, 0.5], [3.0, 3.0, 3.0]])  # per-token advantages (REINFORCE++) too
    want = [[-1.0, 2.0, -0.5], [-3.0, -3.0, 0.0]]
    for kind in POLICY_LOSSES:
        lp.grad = None
        loss, low, high = policy_surrogate(kind, lp, lp.detach(), adv, mask, 0.2, 0.28)
        (loss * mask).sum().backward()
        close(loss * mask, want)
        close(lp.grad, want)
        assert float(low.sum() + high.sum()) == 0.0, kind


def test_cispo_weights_are_clipped_detached_and_every_token_keeps_its_gradient():
    # Ratios 1, 1.5, 0.5, 1.1 with [0.8, 1.28]: weights 1, 1.28, 0.8, 1.1; A = 2: loss -2 w, gradient -2 w.
    old = t([[-1.0, -1.0, -1.0, -1.0], [-2.0, -INF, 0.0, 0.0], [INF, 0.0, 0.0, 0.0]])
    diff = t([[0.0, math.log(1.5), math.log(0.5), math.log(1.1)], [math.log(2.0), 0, 0, 0], [0.0] * 4])
    mask = t([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    lp = torch.where(mask.bool(), old + diff, t([[0] * 4, [0, -INF, math.nan, 0], [INF, 0, 0, 0]]))
    lp.requires_grad_(True)
    adv = t([2.0, -1.0, 5.0])
    loss, low, high = cispo_surrogate(lp, old, adv, mask, 0.2, 0.28)
    close(loss, [[-2.0, -2.56, -1.6, -2.2], [1.28, 0, 0, 0], [0.0] * 4])
    close(high, [[0.0, 1.0, 0.0, 0.0], [1.0, 0, 0, 0], [0.0] * 4])
    close(low, [[0.0, 0.0, 1.0, 0.0], [0.0] * 4, [0.0] * 4])
    loss.sum().backward()
    # Unlike the clip loss, the tokens past the bound keep a gradient (the bound's weight): none is dropped.
    close(lp.grad, [[-2.0, -2.56, -1.6, -2.2], [1.28, 0, 0, 0], [0.0] * 4])
    # The clip loss drops the token with A > 0 past 1.28; the one under 0.8 only where A < 0 (the weight's flag is
    # set whatever A's sign: it says the weight was cut, not that the gradient was).
    _, clip_low, clip_high = clipped_surrogate(lp, old, adv, 0.2, 0.28)
    assert (float(clip_high[0, 1]), float(clip_low[0, 2])) == (1.0, 0.0)


def test_cispo_without_a_lower_bound():
    """clip_eps_low >= 1: the lower bound 1 - clip_eps_low <= 0 is never reached (MiniMax-M1's setting)."""
    lp = t([[math.log(0.01), math.log(0.5)]]).requires_grad_(True)
    loss, low, _ = cispo_surrogate(lp, t([[0.0, 0.0]]), t([1.0]), t([[1, 1]]), 1.0, 0.28)
    close(loss, [[-0.01, -0.5]])
    assert float(low.sum()) == 0.0
    loss.sum().backward()
    close(lp.grad, [[-0.01, -0.5]])


def test_policy_surrogate_clip_is_the_clipped_surrogate_bit_for_bit_and_rejects_an_unknown_kind():
    torch.manual_seed(3)
    lp, old, adv = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3)
    mask = torch.ones(3, 5)
    got = policy_surrogate("clip", lp, old, adv, mask, 0.2, 0.28)
    want = clipped_surrogate(lp, old, adv, 0.2, 0.28)
    assert len(got) == len(want) == 3 and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'"):
        policy_surrogate("ppo", lp, old, adv, mask, 0.2, 0.2)


def test_clipped_rows_counts_sequences_with_a_flagged_valid_token():
    flags = t([[1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 1, 1]])
    mask = t([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]])  # row 1's flag and row 3's are off the mask
    clipped, rows = clipped_rows(flags, mask)
    assert (float(clipped), float(rows)) == (1.0, 3.0)


@pytest.mark.parametrize("kind", POLICY_LOSSES)
def test_the_actor_objective_composes_weights_sampler_weights_kl_and_entropy(kind):
    """_objective_terms: sum_t weight_t * (w_sampler_t * pg_t - entropy_coef * H_t + kl_coef * k3_t), with pg the
    chosen surrogate; the sampler weights scale the policy term alone."""
    torch.manual_seed(7)
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    old, ref = torch.randn(2, 4) - 1, torch.randn(2, 4) - 1
    lp = (old + 0.3 * torch.randn(2, 4)).requires_grad_(True)
    adv = t([[1.5] * 4, [-0.5] * 4])
    entropy, is_w = torch.rand(2, 4), t([[1.0, 0.5, 2.0, 1.0], [0.9, 1.1, 1.0, 1.0]])
    weights = aggregation_weights(mask, "seq_mean_token_mean")
    ro = SimpleNamespace(logprobs=old, ref_logprobs=ref)
    objective = Objective(0.2, 0.28, weights, kl_coef=0.1, old_from_rollout=True, policy_loss=kind)
    loss, got_old, terms = _objective_terms(objective, ro, adv, torch.arange(2), lp, entropy, mask, 0.01, is_w)
    pg = policy_surrogate(kind, lp, old, adv, mask, 0.2, 0.28).loss
    want = (weights * (pg * is_w - 0.01 * entropy + 0.1 * k3_kl_loss(lp, ref))).sum()
    close(loss, want)
    assert torch.equal(got_old, old) and torch.equal(terms[0], pg)
