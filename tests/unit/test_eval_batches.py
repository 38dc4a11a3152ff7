"""`eval_batches`: the evaluation shard of a rank. Every rank runs the same forwards (ZeRO-3 all-gathers parameters
inside each one), every example counts exactly once over the ranks, and filler rows weigh 0."""

import pytest
import torch

from rlhf_cli.data.sharding import eval_batches


@pytest.mark.parametrize("n", [0, 1, 5, 9, 16])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_every_rank_runs_the_same_batches_and_every_example_counts_once(n, world_size, batch_size):
    shards = [eval_batches(n, batch_size, rank, world_size) for rank in range(world_size)]
    layouts = [[len(b.idx) for b in shard] for shard in shards]
    assert all(layout == layouts[0] for layout in layouts), layouts  # same forwards of the same sizes
    assert all(0 < size <= batch_size for size in layouts[0])
    per_rank = -(-n // world_size)
    assert sum(layouts[0]) == per_rank  # no forward more than the largest rank needs
    counted, fillers = [], 0
    for shard in shards:
        for b in shard:
            assert b.weight.shape == (len(b.idx),) and b.weight.dtype == torch.float64
            assert set(b.weight.tolist()) <= {0.0, 1.0}
            assert torch.equal(b.real, b.weight > 0)
            assert all(0 <= i < n for i in b.idx)  # a filler repeats a real example (DPO's table needs one)
            counted += [i for i, w in zip(b.idx, b.weight.tolist(), strict=True) if w == 1.0]
            fillers += int((b.weight == 0).sum())
    assert sorted(counted) == list(range(n))
    assert fillers == per_rank * world_size - n


def test_nine_examples_on_two_ranks_in_batches_of_four():
    """The case that hung: 2 forwards on rank 0, 1 on rank 1 before; now 2 each, the last one of rank 1 a filler."""
    zero, one = eval_batches(9, 4, 0, 2), eval_batches(9, 4, 1, 2)
    assert [b.idx for b in zero] == [[0, 2, 4, 6], [8]]
    assert [b.weight.tolist() for b in one] == [[1.0] * 4, [0.0]]
    assert [len(b.idx) for b in one] == [4, 1]


def test_a_rank_without_examples_still_runs_the_forwards():
    shards = [eval_batches(1, 4, rank, 3) for rank in range(3)]
    assert [[b.idx for b in s] for s in shards] == [[[0]]] * 3
    assert [s[0].weight.tolist() for s in shards] == [[1.0], [0.0], [0.0]]
