"""A committed checkpoint damaged after the fact (a state file cut short): resume names it, sets it aside as
`damaged-step-N/` and goes on from the older one to the result of an uninterrupted run; when no checkpoint loads,
one clear error says what to remove. Needs the stages to resume through `checkpoints.resume_latest`."""

import shutil

import pytest
from conftest import FAST, manifest, metrics, rlhf, weights
from test_errors import _one_clear_error

COMMON = ["sft", "stage.max_steps=4", "stage.save_every=1", "stage.keep_last=3", *FAST]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """`runs/` with run `cut` stopped after step 3 (checkpoints step-1..3), made once for the module."""
    base = tmp_path_factory.mktemp("stopped")
    res = rlhf(*COMMON, f"run.root={base / 'runs'}", "run.name=cut", "stage.stop_after_steps=3", cwd=base)
    assert res.returncode == 0, res.stderr
    return base / "runs"


def _copy(stopped, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(stopped, runs)
    return runs, runs / "cut" / "sft" / "checkpoints"


def _cut(step_dir):
    state = next(step_dir.rglob("*model_states.pt"))
    with open(state, "r+b") as fh:
        fh.truncate(state.stat().st_size // 2)


def test_damaged_checkpoint_falls_back_to_the_older_one(stopped, tmp_path):
    runs, ckpt = _copy(stopped, tmp_path)
    _cut(ckpt / "step-3")
    resumed = rlhf(*COMMON, f"run.root={runs}", "run.name=cut", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert "damaged checkpoint(s)" in resumed.stderr and "damaged-step-3" in resumed.stderr, resumed.stderr
    assert f"resuming sft from {ckpt / 'step-2'}" in resumed.stderr
    assert (ckpt / "damaged-step-3").is_dir() and manifest(runs / "cut")["stages"]["sft"]["status"] == "completed"
    full = rlhf(*COMMON, f"run.root={runs}", "run.name=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    loss_full = {r["step"]: r["loss"] for r in metrics(runs / "full") if "loss" in r}
    loss_cut = {r["step"]: r["loss"] for r in metrics(runs / "cut") if "loss" in r}  # the resumed steps logged last
    assert abs(loss_full[4] - loss_cut[4]) < 1e-5
    a, b = weights(runs / "full" / "sft" / "final"), weights(runs / "cut" / "sft" / "final")
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


def test_no_loadable_checkpoint_is_one_clear_error(stopped, tmp_path):
    runs, ckpt = _copy(stopped, tmp_path)
    for step in (1, 2, 3):
        _cut(ckpt / f"step-{step}")
    res = rlhf(*COMMON, f"run.root={runs}", "run.name=cut", cwd=tmp_path)
    _one_clear_error(res, f"no checkpoint in {ckpt} can be loaded", f"rm -r {ckpt / 'step-3'}", "run.name")
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1", "step-2", "step-3"]  # nothing renamed
