"""Rejection sampling's round data (rlhf_cli/rollout/best_of_n.py): prompt subsets, chunk dealing, chunk files and
the selection read back from them, training examples on the sampled ids."""

import json
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli.data import IGNORE_INDEX
from rlhf_cli.rollout import best_of_n as bon


def test_round_prompts_are_a_seeded_subset_that_changes_by_round():
    a, b = bon.round_prompts(50, 20, seed=3, round_no=1), bon.round_prompts(50, 20, seed=3, round_no=2)
    assert len(a) == 20 == len(set(a)) and a == bon.round_prompts(50, 20, seed=3, round_no=1)
    assert a != b
    assert sorted(bon.round_prompts(7, None, seed=3, round_no=1)) == list(range(7))


@pytest.mark.parametrize(
    "n,done,world,expected",
    [
        (5, set(), 1, [[0, 1, 2, 3, 4]]),
        (5, set(), 2, [[0, 2, 4], [1, 3, None]]),  # every rank gets the same number of slots
        (5, {1}, 2, [[0, 3], [2, 4]]),
        (3, {0, 1, 2}, 2, [[], []]),
        (1, set(), 3, [[0], [None], [None]]),
    ],
)
def test_chunk_slots_deal_the_missing_chunks_evenly(n, done, world, expected):
    assert [bon.chunk_slots(n, done, rank, world) for rank in range(world)] == expected


def _row(p, c, score, ids):
    return {
        "round": 1,
        "prompt_index": p,
        "candidate": c,
        "prompt": f"q{p}",
        "response": str(ids),
        "score": score,
        "raw_score": score,
        "ended_with_eos": True,
        "response_ids": ids,
    }


def test_merge_and_select_read_the_chunks_and_write_the_selection(tmp_path):
    files = bon.RoundFiles.of(tmp_path, 1)
    # chunk 0: prompts 7 and 2; chunk 1: prompt 5 (two candidates per prompt)
    bon.write_chunk(
        files, 0, [_row(7, 0, 0.5, [1, 2]), _row(7, 1, 0.9, [3]), _row(2, 0, None, [4]), _row(2, 1, None, [5])]
    )
    bon.write_chunk(files, 1, [_row(5, 0, 0.2, [6]), _row(5, 1, 0.8, [6])])  # a copy: the second is not a new sample
    assert bon.finished_chunks(files) == {0, 1}
    assert bon.merge_chunks(files, 2, 2) == 6
    assert not files.chunks.exists()
    assert [r["duplicate"] for r in bon.read_rows(files.candidates)] == [False, False, False, False, False, True]
    st = SimpleNamespace(selection="best", top_k=1, threshold=None)
    stats = bon.select_round(files, 2, st, {"stage.selection": "best"})
    chosen = bon.read_rows(files.selected)
    assert [(r["prompt_index"], r["candidate"]) for r in chosen] == [(7, 1), (5, 0)]
    assert "duplicate" not in chosen[0]
    assert stats["valid_prompt_fraction"] == pytest.approx(2 / 3) and stats["selected"] == 2
    assert stats["duplicate_fraction"] == pytest.approx(1 / 6)
    assert json.loads(files.selection.read_text()) == {**stats, "rule": {"stage.selection": "best"}}
    again = bon.select_round(files, 2, SimpleNamespace(selection="threshold", top_k=1, threshold=0.1), {})
    assert again["selected"] == 3  # the same candidates, selected by another rule: nothing is drawn


def test_prompt_groups_follow_the_prompt_index_not_the_position():
    rows = [
        _row(7, 0, 0.1, [1]),
        _row(7, 1, 0.2, [2]),
        _row(7, 2, 0.3, [3]),
        _row(2, 0, 0.4, [4]),
        _row(2, 1, 0.5, [5]),
        _row(2, 2, 0.6, [6]),
    ]
    groups = bon.prompt_groups(rows, 3)
    assert [[r["prompt_index"] for r in g] for g in groups] == [[7, 7, 7], [2, 2, 2]]
    with pytest.raises(ValueError, match="prompt 7 has 3 candidate"):  # grouped by 2, rows of N = 3 would mix prompts
        bon.prompt_groups(rows, 2)


def test_training_examples_are_the_prompt_ids_then_the_sampled_ids():
    prompts = [SimpleNamespace(input_ids=[10, 11, 12]), SimpleNamespace(input_ids=[20])]
    (ex,) = bon.training_examples([{"prompt_index": 0, "response_ids": [5, 6, 2]}], prompts)
    assert ex.input_ids == [10, 11, 12, 5, 6, 2]
    assert ex.labels == [IGNORE_INDEX] * 3 + [5, 6, 2]


def test_candidate_rows_keep_prompt_and_candidate_alignment():
    prompts = [SimpleNamespace(text="a"), SimpleNamespace(text="b")]
    seq = SimpleNamespace(
        response_ids=torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6], [7, 2, 0]]),
        response_mask=torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]),
        has_eos=torch.tensor([True, True, False, True]),
    )
    raw = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    rows = bon.candidate_rows(2, [9, 4], prompts, 2, seq, ["w", "x", "y", "z"], raw, raw - 1)
    assert [(r["prompt_index"], r["candidate"], r["prompt"]) for r in rows] == [
        (9, 0, "a"),
        (9, 1, "a"),
        (4, 0, "b"),
        (4, 1, "b"),
    ]
    assert [r["response_ids"] for r in rows] == [[1, 2], [3], [4, 5, 6], [7, 2]]
    assert rows[1]["score"] is None and rows[2]["score"] == 2.0 and rows[2]["ended_with_eos"] is False


def _late_rank_zero(rank: int, port: int, root: str, out: str) -> None:
    """One of 2 gloo ranks drawing 6 chunks with the draw stubbed out. Rank 0 reaches the round a second late, after
    rank 1 could already have written a chunk: the deal must still give every chunk to exactly one rank."""
    import os
    import time
    from pathlib import Path

    import torch.distributed as tdist

    from rlhf_cli import engine as eng

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    drawn = []

    def draw(model, prompt_idx, *args):
        drawn.append(prompt_idx[0])
        return [_row(prompt_idx[0], 0, 1.0, [1])], (0.0, 0.0)

    bon.draw_chunk, bon.sampling_config = draw, lambda *args: None
    if rank == 0:
        time.sleep(1.0)
    dist = eng.Dist(rank, 2, rank, torch.device("cpu"))
    files = bon.RoundFiles(Path(root))
    how = bon.Drawing(
        [],
        SimpleNamespace(eos_token_id=0, pad_token_id=0),
        None,
        SimpleNamespace(generation=None),
        None,
        dist,
        0,
        collective=False,
    )
    bon.sample_chunks(None, [[c] for c in range(6)], files, 1, how, print)
    Path(out, f"rank{rank}.json").write_text(json.dumps(drawn))
    tdist.destroy_process_group()


def test_ranks_deal_the_chunks_from_one_listing_even_when_one_rank_is_late(tmp_path):
    import torch.multiprocessing as mp

    from rlhf_cli.engine import _free_port

    mp.spawn(_late_rank_zero, args=(_free_port(), str(tmp_path / "round"), str(tmp_path)), nprocs=2)
    drawn = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(drawn[0] + drawn[1]) == list(range(6)), drawn  # each chunk drawn once, none left out
    assert bon.finished_chunks(bon.RoundFiles(tmp_path / "round")) == set(range(6))
