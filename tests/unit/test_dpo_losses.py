"""The DPO family against hand-computed numbers (python math, not torch)."""

import math

import pytest
import torch

from rlhf_cli.losses.dpo import LOSSES, implicit_rewards, log1mexp, preference_loss

# One pair: policy chosen/rejected summed log-probs, reference ones, completion lengths.
PC, PR, RC, RR, LC, LR = -10.0, -12.0, -11.0, -11.0, 5.0, 4.0  # h = (1) - (-1) = 2


def _loss(kind, **kw):
    t = lambda x: torch.tensor([x], dtype=torch.float32)  # noqa: E731
    return preference_loss(kind, t(PC), t(PR), t(RC), t(RR), t(LC), t(LR), **kw).item()


@pytest.mark.parametrize(
    "kind,kwargs,expected",
    [
        ("sigmoid", {"beta": 0.1}, 0.5981388693815918),  # log(1 + e^-0.2)
        ("cdpo", {"beta": 0.1, "label_smoothing": 0.1}, 0.6181388693815918),  # 0.9*0.5981 + 0.1*log(1+e^0.2)
        ("robust", {"beta": 0.1, "label_smoothing": 0.1}, 0.5731388693815918),  # (0.9*0.5981 - 0.1*0.7981)/0.8
        ("hinge", {"beta": 0.1}, 0.8),  # relu(1 - 0.2)
        ("ipo", {"beta": 0.1}, 20.7025),  # h per token = 1/5 + 1/4 = 0.45; (0.45 - 5)^2
        ("rpo", {"beta": 0.1, "rpo_alpha": 1.0}, 0.5981388693815918 + 2.0),  # + NLL(y_w)/|y_w| = 10/5
        ("simpo", {"beta": 2.0, "simpo_gamma": 1.0}, 0.31326168751822286),  # 2*(-2 + 3) - 1 = 1
        ("orpo", {"beta": 0.1, "orpo_lambda": 0.1}, 2.028875078434462),  # 2 - 0.1 log s(lo(-2) - lo(-3))
    ],
)
def test_loss_hand_computed(kind, kwargs, expected):
    assert _loss(kind, **kwargs) == pytest.approx(expected, rel=1e-6)


def test_every_loss_is_covered():
    assert set(LOSSES) == {"sigmoid", "cdpo", "robust", "hinge", "ipo", "rpo", "simpo", "orpo"}


def test_dpo_is_log2_when_policy_equals_reference():
    lp = torch.tensor([-7.0, -30.0, -2.5])
    loss = preference_loss("sigmoid", lp, lp - 3, lp, lp - 3, None, None, beta=0.1)
    torch.testing.assert_close(loss, torch.full((3,), math.log(2)))


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-12.0], requires_grad=True)
    preference_loss("sigmoid", pc, pr, torch.tensor([-11.0]), torch.tensor([-11.0]), None, None, beta=0.1).backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_log1mexp_stable_both_sides():
    x = torch.tensor([-1e-4, -0.5, -20.0], dtype=torch.float64)
    expected = [math.log(1 - math.exp(v)) for v in (-1e-4, -0.5)] + [-2.0611536203e-09]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-15)


def test_implicit_rewards():
    r = implicit_rewards(torch.tensor([PC]), torch.tensor([PR]), torch.tensor([RC]), torch.tensor([RR]), beta=0.1)
    assert r["reward_chosen"].item() == pytest.approx(0.1)
    assert r["reward_rejected"].item() == pytest.approx(-0.1)
    assert r["reward_margin"].item() == pytest.approx(0.2) and r["reward_accuracy"].item() == 1.0
