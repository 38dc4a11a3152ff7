"""rollout/comparison.py: win values with ties and missing scores, means and standard errors from summed moments,
filler rows left out."""

import math

import pytest
import torch

from rlhf_cli.rollout.comparison import QUANTITIES, mean_and_se, moment_sums, summarise, win_values


def test_win_values_count_ties_half_and_leave_unscored_rows_out():
    won = win_values(torch.tensor([1.0, 0.0, 2.0, math.nan, 1.0]), torch.tensor([0.0, 1.0, 2.0, 0.0, math.nan]))
    assert won[:3].tolist() == [1.0, 0.0, 0.5] and won[3:].isnan().all()


def test_mean_and_standard_error_by_hand():
    # values 1, 2, 4: mean 7/3, sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3, se = sqrt(7/3 / 3)
    mean, se = mean_and_se(3, 7.0, 21.0)
    assert mean == pytest.approx(7 / 3) and se == pytest.approx(math.sqrt(7 / 9))
    assert mean_and_se(1, 5.0, 25.0) == (5.0, 0.0) and all(math.isnan(v) for v in mean_and_se(0, 0.0, 0.0))


def test_moment_sums_skip_fillers_and_non_finite_values_and_add_up_over_batches():
    weight = torch.tensor([1.0, 1.0, 0.0])  # the third row only keeps the ranks in step
    a = moment_sums({"reward": torch.tensor([1.0, 2.0, 100.0]), "win": torch.tensor([1.0, math.nan, 0.0])}, weight)
    b = moment_sums({"reward": torch.tensor([4.0]), "win": torch.tensor([0.5])}, torch.tensor([1.0]))
    out = summarise(a + b)
    assert out["reward_mean"] == pytest.approx(7 / 3) and out["reward_mean_se"] == pytest.approx(math.sqrt(7 / 9))
    assert out["win_rate"] == pytest.approx(0.75)  # 1 and 0.5: the NaN and the filler are out
    assert "kl" not in out and out["responses"] == 3.0
    assert a.shape == (len(QUANTITIES), 3)
