"""Reward-model losses against hand-computed numbers; score position with right padding and with pad == eos."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.data import PreferenceExample, collate_preference
from rlhf_cli.losses import (
    bradley_terry_loss,
    gather_last,
    last_token_index,
    pairwise_accuracy,
    reward_moments,
    split_pairs,
)

EOS = 2


def softplus(x: float) -> float:
    """-log sigmoid(-x), written out: log(1 + e^x)."""
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- Bradley-Terry


def test_bt_loss_with_margin_hand_computed():
    r_c, r_r, m = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.5, 0.0])
    loss, stats = bradley_terry_loss(r_c, r_r, m)
    # Pair 0: -log sigmoid(1 - 0 - 0.5) = log(1 + e^-0.5) = 0.474077; pair 1: -log sigmoid(0) = log 2 = 0.693147.
    expected = (math.log(1 + math.exp(-0.5)) + math.log(2)) / 2
    assert expected == pytest.approx(0.583612, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # Stats: ties count as wrong, so one of the two pairs is right.
    assert stats["accuracy"].item() == 0.5
    assert stats["margin"].item() == pytest.approx(0.5)
    assert stats["chosen"].item() == pytest.approx(0.5) and stats["rejected"].item() == 0.0
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_bt_loss_without_margin_and_its_gradient():
    r_c = torch.tensor([2.0, -1.0], requires_grad=True)
    r_r = torch.tensor([0.5, 1.0], requires_grad=True)
    loss, stats = bradley_terry_loss(r_c, r_r)
    assert loss.item() == pytest.approx((softplus(-1.5) + softplus(2.0)) / 2, abs=1e-6)
    loss.backward()
    # d/d r_c of -log sigmoid(d) / B is -sigmoid(-d) / B; r_r gets the opposite.
    expected = [-1 / (1 + math.exp(1.5)) / 2, -1 / (1 + math.exp(-2.0)) / 2]
    assert r_c.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert r_r.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-6)
    assert stats["accuracy"].item() == 0.5


def test_bt_centering_term_adds_mean_squared_sum():
    r_c, r_r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    plain, _ = bradley_terry_loss(r_c, r_r)
    centered, _ = bradley_terry_loss(r_c, r_r, center_coef=0.01)
    # c * mean((r_c + r_r)^2) = 0.01 * (1 + 0) / 2 = 0.005
    assert (centered - plain).item() == pytest.approx(0.005, abs=1e-7)
    shifted, _ = bradley_terry_loss(r_c + 10, r_r + 10)
    assert shifted.item() == pytest.approx(plain.item(), abs=1e-5)  # BT alone cannot see an offset
    shifted_centered, _ = bradley_terry_loss(r_c + 10, r_r + 10, center_coef=0.01)
    assert shifted_centered.item() == pytest.approx(plain.item() + 0.01 * (21**2 + 20**2) / 2, abs=1e-4)


def test_bt_loss_stays_finite_for_large_gaps_and_low_precision():
    loss, _ = bradley_terry_loss(torch.tensor([-500.0]), torch.tensor([500.0]))
    assert loss.item() == pytest.approx(1000.0)  # a naive log(sigmoid(.)) gives inf here
    loss, _ = bradley_terry_loss(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([0.0], dtype=torch.bfloat16))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(softplus(-1.0), abs=1e-6)


def test_bt_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))


def test_pairwise_accuracy_and_moments():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 0.0, 3.0]), torch.tensor([0.0, 3.0, 0.0, 1.0])).item() == 0.5
    mean, std = reward_moments(torch.tensor([1.0, 3.0, 5.0, 7.0]))
    assert mean.item() == 4.0 and std.item() == pytest.approx(math.sqrt(5.0))  # population std


def test_split_pairs_first_half_is_chosen():
    chosen, rejected = split_pairs(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert chosen.tolist() == [1.0, 2.0] and rejected.tolist() == [3.0, 4.0]
    with pytest.raises(ValueError):
        split_pairs(torch.tensor([1.0, 2.0, 3.0]))


# ---------------------------------------------------------------- score position


def test_last_token_index_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]
    values = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    assert gather_last(values, mask).tolist() == [2.0, 9.0, 10.0]
    assert gather_last(values.unsqueeze(-1), mask).tolist() == [2.0, 9.0, 10.0]  # a scalar head's (B, T, 1)


def test_score_is_read_at_eos_when_pad_equals_eos():
    # Right-padded batch where pad id == EOS id: rows end "... EOS EOS EOS" and only the mask tells them apart.
    pairs = [PreferenceExample([5, 6], [7, EOS], [8, 9, 10, EOS]), PreferenceExample([5], [EOS], [11, EOS])]
    batch = collate_preference(pairs, pad_token_id=EOS)
    index = last_token_index(batch["attention_mask"])
    ids = batch["input_ids"]
    assert index.tolist() == [3, 1, 5, 2]  # the EOS of each row: prompt + reply length - 1
    assert (ids.gather(1, index[:, None]).squeeze(1) == EOS).all()
    # The HF "last token != pad" rule reads one token before EOS here; that is the bug this avoids.
    hf_rule = ((ids != EOS).long() * torch.arange(ids.shape[1])).argmax(dim=1)
    assert (hf_rule < index).all()
    values = torch.arange(ids.numel(), dtype=torch.float32).reshape(ids.shape)
    chosen, rejected = split_pairs(gather_last(values, batch["attention_mask"]))
    width = ids.shape[1]
    assert chosen.tolist() == [3.0, width + 1.0] and rejected.tolist() == [2 * width + 5.0, 3 * width + 2.0]


def test_last_token_index_rejects_empty_rows():
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))
