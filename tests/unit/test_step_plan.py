"""The offline stages' data position (`StepPlan.rank_indices`) and training loop (`train_loop`), tested directly:
the resume and scale-out guarantees of every offline stage rest on them."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_cli import preempt
from rlhf_cli.stages import common
from rlhf_cli.stages.plan import StepPlan


def plan(n=24, micro=2, accum=2, world=1, epochs=2) -> StepPlan:
    per_step = micro * accum * world
    return StepPlan(n, micro, accum, world, n // per_step, epochs * (n // per_step))


def test_an_epoch_sees_every_example_once_across_steps_and_ranks():
    p = plan(world=2)  # 24 examples, global batch 8: 3 steps per epoch
    for epoch in range(2):
        seen = [i for s in range(3) for r in range(2) for i in p.rank_indices(epoch * 3 + s, r, seed=7)]
        assert sorted(seen) == list(range(24))
    first, second = [p.rank_indices(e * 3, 0, 7) for e in range(2)]
    assert first != second  # a new order each epoch


def test_the_position_is_a_pure_function_of_step_rank_and_seed():
    p = plan()
    assert p.rank_indices(5, 0, 3) == plan().rank_indices(5, 0, 3)  # a resumed run sees what it would have seen
    assert p.rank_indices(5, 0, 3) != p.rank_indices(5, 0, 4)


def test_two_ranks_split_the_global_batch_of_one_rank_in_contiguous_halves():
    """2 ranks x micro 2 x accumulation 2 read, together, exactly what 1 rank x micro 4 x accumulation 2 reads."""
    two, one = plan(micro=2, accum=2, world=2), plan(micro=4, accum=2, world=1)
    for step in range(two.total_steps):
        assert two.rank_indices(step, 0, 1) + two.rank_indices(step, 1, 1) == one.rank_indices(step, 0, 1)


def test_examples_beyond_the_last_whole_batch_are_left_out_of_the_epoch():
    p = StepPlan(10, 2, 2, 1, 2, 2)  # 10 examples, batch 4: 2 steps, 2 examples unused this epoch
    seen = p.rank_indices(0, 0, 0) + p.rank_indices(1, 0, 0)
    assert len(set(seen)) == 8 and set(seen) <= set(range(10))


class FakeMetrics:
    def __init__(self):
        self.logged, self.messages = [], []

    def log(self, step, values, show):
        self.logged.append((step, values))

    def message(self, text):
        self.messages.append(text)

    def closed_on_error(self):
        return nullcontext()


@pytest.fixture
def loop(monkeypatch, tmp_path):
    """train_loop with a fake engine and rank; `stop_at`: the step after which a preemption is requested."""
    monkeypatch.setattr(common.eng, "current_lr", lambda engine: 0.1)
    monkeypatch.setattr(common.eng, "peak_memory_mib", lambda device: 1.0)
    state = {"stop_at": None, "done": 0}
    monkeypatch.setattr(common.eng, "any_rank", lambda flag: state["stop_at"] == state["done"])
    engine = SimpleNamespace(train=lambda: None)
    run = SimpleNamespace(checkpoints_dir=Path(tmp_path))

    def go(p, start=0, eval_every=0, save_every=0, stop_after=None, offset=0):
        st = SimpleNamespace(eval_every=eval_every, save_every=save_every, stop_after_steps=stop_after, keep_last=2)
        saves, evals, metrics = [], [], FakeMetrics()

        def step_fn(step):
            state["done"] = step + 1
            return {"loss": float(step), "tokens": 10.0}

        ctx = SimpleNamespace(cfg=SimpleNamespace(stage=st), dist=SimpleNamespace(device="cpu"), run=run)
        loop = common.Loop(
            step_fn,
            lambda: evals.append(state["done"]) or {"eval_loss": 1.0},
            ("loss",),
            save=saves.append,
            step_offset=offset,
        )
        last = common.train_loop(ctx, engine, p, metrics, start, loop)
        return last, saves, evals, metrics

    return go, state


def test_the_loop_runs_to_the_end_evaluates_and_saves_on_schedule(loop):
    go, _ = loop
    last, saves, evals, metrics = go(plan(n=24, epochs=2), eval_every=2, save_every=3)  # 12 steps
    assert [s for s, _ in metrics.logged] == list(range(1, 13))
    assert evals == [2, 4, 6, 8, 10]  # not at the last step: the stage's final evaluation covers it
    assert saves == [3, 6, 9, 12]
    assert last["step"] == 12 and last["loss"] == 11.0 and last["tokens"] == 120.0
    assert metrics.logged[0][1]["epoch"] == pytest.approx(1 / 6) and metrics.logged[0][1]["tok/s"] > 0


def test_a_resumed_loop_starts_at_its_step_and_numbers_steps_after_the_offset(loop):
    go, _ = loop
    last, saves, _, metrics = go(plan(), start=9, save_every=3, offset=100)
    assert [s for s, _ in metrics.logged] == [110, 111, 112] and saves == [12] and last["step"] == 12


def test_stop_after_steps_saves_and_stops_where_it_says(loop):
    go, _ = loop
    last, saves, _, metrics = go(plan(), stop_after=5)
    assert last["step"] == 5 and saves == [5] and "stopped after step 5" in metrics.messages[0]


def test_a_preemption_saves_at_the_step_boundary_and_raises(loop):
    go, state = loop
    state["stop_at"] = 4
    with pytest.raises(preempt.Preempted, match="checkpoint saved at step 4"):
        go(plan(), save_every=10)
