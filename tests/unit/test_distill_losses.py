"""The divergences of on-policy distillation (rlhf_cli/losses/distill.py) on hand-computed numbers: values and
gradients, masks of unequal lengths, a row with no valid token, the temperature on every log-prob.

Most cases use two distributions over 3 tokens whose numbers are easy by hand: the student s = (1/2, 1/4, 1/4), the
teacher t = (1/4, 1/2, 1/4), as logits log s and log t (times tau where a temperature is tested)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.losses.critic_free import clipped_surrogate
from rlhf_cli.losses.distill import (
    answer_agreement,
    distill_advantages,
    full_reverse_kl,
    generalized_jsd,
    greedy_agreement,
    sampled_reverse_kl,
)

S = torch.tensor([0.5, 0.25, 0.25])
T = torch.tensor([0.25, 0.5, 0.25])
LN2, LN43, LN23 = math.log(2.0), math.log(4.0 / 3.0), math.log(2.0 / 3.0)
# KL(s || t) = 1/2 ln 2 + 1/4 ln(1/2) + 0 = 1/4 ln 2; its gradient in the student's logits, s_j (log(s_j/t_j) - KL).
KL_ST = 0.25 * LN2
GRAD_KL_ST = [0.5 * (LN2 - KL_ST), 0.25 * (-LN2 - KL_ST), 0.25 * (0.0 - KL_ST)]
# KL(t || s) = 1/4 ln(1/2) + 1/2 ln 2 = 1/4 ln 2; its gradient in the student's logits is s - t.
KL_TS = 0.25 * LN2
GRAD_KL_TS = [0.25, -0.25, 0.0]


def _layout(per_position: torch.Tensor, tau: float = 1.0):
    """Three rows of width 3 (responses of 3, 1 and 0 valid tokens), each valid position with the logits of `s` and
    `t` (times tau); the padded positions get wild logits that must not matter."""
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    student = torch.randn(3, 3, 3) * 9.0
    teacher = torch.randn(3, 3, 3) * 9.0
    student[mask.bool()] = tau * S.log()
    teacher[mask.bool()] = tau * T.log()
    return student.requires_grad_(True), teacher, mask


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_full_reverse_kl_values_and_gradients(tau):
    student, teacher, mask = _layout(S, tau)
    kl = full_reverse_kl(student, teacher, mask, tau)
    expected = mask * KL_ST
    assert torch.allclose(kl, expected, atol=1e-6)
    kl.sum().backward()
    grad = student.grad
    # d/dz of KL(softmax(z / tau)) is the gradient in softmax's logits divided by tau.
    want = torch.tensor(GRAD_KL_ST) / tau
    for b, r in mask.nonzero().tolist():
        assert torch.allclose(grad[b, r], want, atol=1e-6)
    assert torch.equal(grad[~mask.bool()], torch.zeros_like(grad[~mask.bool()]))  # padding and the empty row: 0


def test_full_reverse_kl_is_zero_when_the_student_is_the_teacher_and_teacher_gets_no_gradient():
    logits = torch.randn(2, 4, 7)
    teacher = logits.clone().requires_grad_(True)
    student = logits.clone().requires_grad_(True)
    kl = full_reverse_kl(student, teacher, torch.ones(2, 4), 0.7)
    assert torch.allclose(kl, torch.zeros(2, 4), atol=1e-6)
    kl.sum().backward()
    assert teacher.grad is None and torch.allclose(student.grad, torch.zeros_like(student.grad), atol=1e-6)


def test_top_k_reverse_kl_keeps_the_tail_as_one_bucket():
    """k = 1: the student's top token (index 0, s = 1/2, t = 1/4) and the rest (s 1/2, t 3/4):
    KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3). Gradient s_j (L_b(j) - sum_b S_b L_b), L_b = log(S_b / T_b)."""
    student, teacher, mask = _layout(S)
    kl = full_reverse_kl(student, teacher, mask, 1.0, top_k=1)
    assert torch.allclose(kl, mask * 0.5 * LN43, atol=1e-6)
    kl.sum().backward()
    mean = 0.5 * LN2 + 0.5 * LN23
    want = torch.tensor([0.5 * (LN2 - mean), 0.25 * (LN23 - mean), 0.25 * (LN23 - mean)])
    for b, r in mask.nonzero().tolist():
        assert torch.allclose(student.grad[b, r], want, atol=1e-6)
    assert torch.equal(student.grad[~mask.bool()], torch.zeros_like(student.grad[~mask.bool()]))


def test_top_k_at_or_above_the_vocabulary_is_the_full_kl_and_never_above_it():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.ones(2, 5)
    full = full_reverse_kl(student, teacher, mask, 1.3)
    assert torch.allclose(full_reverse_kl(student, teacher, mask, 1.3, top_k=11), full)
    for k in (1, 3, 10):
        part = full_reverse_kl(student, teacher, mask, 1.3, top_k=k)
        assert bool((part >= -1e-6).all()) and bool((part <= full + 1e-6).all())


@pytest.mark.parametrize(
    "beta,value,grad_s",
    [
        (0.0, KL_TS, None),  # forward KL(t || s): gradient s - t
        (1.0, KL_ST, None),  # reverse KL(s || t)
        # m = (3/8, 3/8, 1/4): KL(t||m) = KL(s||m) = 1/2 ln(4/3) + 1/4 ln(2/3); dJSD/ds = (1 - beta) log(s / m)
        (0.5, 0.5 * LN43 + 0.25 * LN23, [0.5 * LN43, 0.5 * LN23, 0.0]),
    ],
)
def test_generalized_jsd_values_gradients_and_ends(beta, value, grad_s):
    student, teacher, mask = _layout(S, 2.0)
    jsd = generalized_jsd(student, teacher, mask, beta, 2.0)
    assert torch.allclose(jsd, mask * value, atol=1e-6)
    jsd.sum().backward()
    if beta == 0.0:
        want = torch.tensor(GRAD_KL_TS)
    elif beta == 1.0:
        want = torch.tensor(GRAD_KL_ST)
    else:  # through the softmax: s_j (g_j - sum_v s_v g_v)
        g = torch.tensor(grad_s)
        want = S * (g - (S * g).sum())
    for b, r in mask.nonzero().tolist():
        assert torch.allclose(student.grad[b, r], want / 2.0, atol=1e-6)
    assert torch.equal(student.grad[~mask.bool()], torch.zeros_like(student.grad[~mask.bool()]))


def test_generalized_jsd_is_between_zero_and_its_bound_and_refuses_a_bad_beta():
    student, teacher = torch.randn(3, 4, 9), torch.randn(3, 4, 9)
    mask = torch.ones(3, 4)
    for beta in (0.1, 0.5, 0.9):
        jsd = generalized_jsd(student, teacher, mask, beta)
        # JSD(beta) <= -beta log beta - (1 - beta) log(1 - beta), the entropy of the mixing weights.
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert bool((jsd >= -1e-6).all()) and bool((jsd <= bound + 1e-6).all())
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(student, teacher, mask, 1.5)


def test_sampled_reverse_kl_and_its_advantages_with_unequal_masks_and_an_empty_row():
    ls = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, 9.0, 9.0], [7.0, 7.0, 7.0]])
    lt = torch.tensor([[-1.5, -0.5, -2.0], [-0.4, -9.0, -9.0], [-7.0, -7.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    k = sampled_reverse_kl(ls, lt, mask)
    assert torch.allclose(k, torch.tensor([[1.0, -0.5, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)
    adv = distill_advantages(k, mask, 0.5)
    assert torch.allclose(adv, torch.tensor([[-0.5, 0.25, 0.0], [-0.15, 0.0, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)
    mixed = distill_advantages(k, mask, 0.5, torch.tensor([1.0, -2.0, 3.0]))
    assert torch.allclose(mixed, torch.tensor([[0.5, 1.25, 1.0], [-2.15, 0.0, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)


def test_the_sampled_estimator_through_the_surrogate_gives_coef_times_k_per_token():
    """At ratio 1 (the first pass), d(surrogate)/d l_s = -A = coef * k: the REINFORCE gradient of coef KL(s || t)."""
    ls = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -3.0, -3.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    lt = torch.tensor([[-1.5, -0.5, -2.0], [-0.4, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    k = sampled_reverse_kl(ls.detach(), lt, mask)
    adv = distill_advantages(k, mask, 2.0)
    pg, low, high = clipped_surrogate(ls, ls.detach(), adv, 0.2, 0.2)
    (pg * mask).sum().backward()
    assert torch.allclose(ls.grad, 2.0 * k, atol=1e-6)
    assert not (low.any() or high.any())


def test_greedy_and_answer_agreement():
    student = torch.tensor([[[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]], [[0.0, 3.0], [3.0, 0.0], [3.0, 0.0]]])
    teacher = torch.tensor([[[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.equal(greedy_agreement(student, teacher, mask), torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    answers = torch.tensor([[0, 1, 1], [1, 1, 1]])
    # Row 0: argmax 0, 1 on its two valid tokens (the third is padding): agrees. Row 1: argmax 1 on its one token.
    assert torch.equal(answer_agreement(student, answers, mask), torch.tensor([1.0, 1.0]))
    assert torch.equal(answer_agreement(student, torch.tensor([[0, 0, 1], [1, 1, 1]]), mask), torch.tensor([0.0, 1.0]))
    assert torch.equal(answer_agreement(student, answers, torch.zeros(2, 3)), torch.tensor([1.0, 1.0]))
