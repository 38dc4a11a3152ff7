"""Rejection sampling's selection on hand-made score grids (rlhf_cli/rollout/selection.py)."""

import math

import pytest
import torch

from rlhf_cli.rollout.selection import duplicates, select, selection_stats, valid_mask

NAN = float("nan")


def grid(rows):
    return torch.tensor(rows, dtype=torch.float32)


def picked(mask):
    return [torch.nonzero(row).flatten().tolist() for row in mask]


def test_best_of_n_takes_the_highest_valid_candidate_per_prompt():
    scores = grid([[0.1, 0.9, 0.5], [2.0, -1.0, 1.0]])
    chosen = select(scores, valid_mask(scores), "best")
    assert picked(chosen) == [[1], [0]]


def test_ties_go_to_the_first_drawn_candidate():
    scores = grid([[0.5, 0.7, 0.7, 0.7], [1.0, 1.0, 0.0, 1.0]])
    assert picked(select(scores, valid_mask(scores), "best")) == [[1], [0]]
    assert picked(select(scores, valid_mask(scores), "top_k", top_k=2)) == [[1, 2], [0, 1]]


def test_top_k_keeps_k_best_and_fewer_when_fewer_are_valid():
    scores = grid([[0.3, 0.1, 0.4, 0.2], [NAN, 5.0, NAN, NAN]])
    chosen = select(scores, valid_mask(scores), "top_k", top_k=3)
    assert picked(chosen) == [[0, 2, 3], [1]]


def test_threshold_keeps_every_valid_candidate_at_or_above_it():
    scores = grid([[0.5, 0.49, 0.7, NAN], [0.1, 0.2, 0.3, 0.4]])
    chosen = select(scores, valid_mask(scores), "threshold", threshold=0.5)
    assert picked(chosen) == [[0, 2], []]


def test_a_prompt_whose_candidates_are_all_invalid_gets_nothing():
    scores = grid([[NAN, NAN], [float("inf"), NAN], [0.0, NAN]])
    valid = valid_mask(scores)
    assert valid.tolist() == [[False, False], [False, False], [True, False]]
    for mode in ("best", "top_k", "threshold"):
        chosen = select(scores, valid, mode, top_k=2, threshold=-1.0)
        assert picked(chosen) == [[], [], [0]], mode


def test_nan_scores_never_win_even_against_negative_scores():
    scores = grid([[NAN, -3.0, -2.0]])
    assert picked(select(scores, valid_mask(scores), "best")) == [[2]]


def test_duplicates_are_dropped_before_selection():
    ids = [[(5, 2), (5, 2), (7,), (5, 2)], [(1,), (2,), (1, 2), (2, 1)]]
    dup = duplicates(ids)
    assert dup.tolist() == [[False, True, False, True], [False, False, False, False]]
    scores = grid([[0.9, 0.9, 0.1, 0.9], [0.0, 0.0, 0.0, 0.0]])
    valid = valid_mask(scores, dup)
    chosen = select(scores, valid, "top_k", top_k=2)
    assert picked(chosen) == [[0, 2], [0, 1]]  # the copies of (5, 2) are not a second and third pick


def test_selection_stats_on_hand_computed_numbers():
    scores = grid([[1.0, 3.0, NAN], [0.0, 0.0, 6.0], [NAN, NAN, NAN]])
    valid = valid_mask(scores)
    chosen = select(scores, valid, "best")
    stats = selection_stats(scores, valid, chosen)
    assert stats["candidates"] == 9
    assert stats["selected"] == 2
    assert stats["candidate_score_mean"] == pytest.approx((1 + 3 + 0 + 0 + 6) / 5)
    assert stats["selected_score_mean"] == pytest.approx(4.5)  # 3 and 6
    assert stats["selected_score_std"] == pytest.approx(1.5)  # population std of (3, 6)
    # per prompt: 3 - 2 = 1 and 6 - 2 = 4, mean 2.5 (the prompt without a valid candidate is left out)
    assert stats["best_of_n_gain"] == pytest.approx(2.5)
    assert stats["valid_prompt_fraction"] == pytest.approx(2 / 3)


def test_selection_stats_when_nothing_is_valid():
    scores = grid([[NAN, NAN]])
    valid = valid_mask(scores)
    stats = selection_stats(scores, valid, select(scores, valid, "best"))
    assert stats["selected"] == 0 and stats["valid_prompt_fraction"] == 0.0
    assert math.isnan(stats["selected_score_mean"]) and math.isnan(stats["best_of_n_gain"])


def test_bad_arguments_are_refused():
    scores = grid([[1.0]])
    with pytest.raises(ValueError, match="selection must be one of"):
        select(scores, valid_mask(scores), "median")
    with pytest.raises(ValueError, match="needs a threshold"):
        select(scores, valid_mask(scores), "threshold")
