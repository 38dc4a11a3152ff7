"""User mistakes end in one clear message, exit code 2, no traceback, and nothing written is harmed."""

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FAST, rlhf

from rlhf_cli.stage_state import open_run

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def _one_clear_error(res, *needles):
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("error: ") == 1
    for needle in needles:
        assert needle in res.stderr


def test_typo_in_key_fails_before_anything_is_built(runs, tmp_path):
    res = rlhf("sft", f"run.root={runs}", "optim.lrr=1", cwd=tmp_path)
    _one_clear_error(res, "`optim.lrr`", "did you mean `optim.lr`")
    assert not runs.exists()


def test_wrong_type_names_the_key(runs, tmp_path):
    _one_clear_error(rlhf("sft", f"run.root={runs}", "stage.max_steps=many", cwd=tmp_path), "`stage.max_steps`")


def test_bad_row_with_fail_policy_names_file_and_line(runs, tmp_path):
    res = rlhf(
        "sft", *FAST, f"run.root={runs}", f"data.source={FIXTURES / 'dolly.jsonl'}", "data.bad_rows=fail", cwd=tmp_path
    )
    _one_clear_error(res, "dolly.jsonl:", "data.bad_rows=skip")
    assert not (runs / "demo").exists()  # refused before the stage began: no run directory left behind


def test_missing_data_file(runs, tmp_path):
    res = rlhf("sft", *FAST, f"run.root={runs}", "data.source=./nope.jsonl", cwd=tmp_path)
    _one_clear_error(res, "nope.jsonl")


def test_missing_model_folder(runs, tmp_path):
    res = rlhf("sft", *FAST, f"run.root={runs}", "model.name_or_path=./no_such_model", cwd=tmp_path)
    _one_clear_error(res, "no_such_model")


def test_run_directory_in_use(runs, tmp_path):
    held = open_run(SimpleNamespace(root=str(runs), name="busy", overwrite=False), "sft")
    try:
        res = rlhf("sft", *FAST, f"run.root={runs}", "run.name=busy", cwd=tmp_path)
        _one_clear_error(res, "in use by pid", "run.name")
    finally:
        held.release()


def test_generate_from_missing_run_or_stage(runs, tmp_path):
    _one_clear_error(rlhf("generate", "run=ghost", f"root={runs}", "prompt=hi", cwd=tmp_path), "no run directory")
    (runs / "half").mkdir(parents=True)
    _one_clear_error(
        rlhf("generate", "run=half", f"root={runs}", "prompt=hi", cwd=tmp_path), "run `rlhf sft run.name=half` first"
    )
    _one_clear_error(rlhf("generate", "run=half", f"root={runs}", "promt=hi", cwd=tmp_path), "did you mean `prompt`")


def test_out_of_range_value_fails_before_anything_is_built(runs, tmp_path):
    res = rlhf("sft", f"run.root={runs}", "optim.lr=-0.1", cwd=tmp_path)
    _one_clear_error(res, "config key `optim.lr` is -0.1, must be > 0")
    assert not runs.exists()


def test_override_syntax_error_names_the_override(runs, tmp_path):
    res = rlhf("dpo", f"run.root={runs}", "stage.beta=0.1", "optim.lr=[1,", cwd=tmp_path)
    _one_clear_error(res, "cannot parse the override `optim.lr=[1,`")
    assert res.stderr.count("\n") == 1 and not runs.exists()


def test_run_name_outside_the_root_is_refused(runs, tmp_path):
    res = rlhf("sft", f"run.root={runs}", "run.name=../../x", "run.overwrite=true", cwd=tmp_path)
    _one_clear_error(res, "`run.name` is '../../x', must be a single folder name")
    _one_clear_error(rlhf("generate", "run=../x", f"root={runs}", "prompt=hi", cwd=tmp_path), "argument `run.name`")
    assert not runs.exists() and not (tmp_path.parent / "x").exists()


def test_the_helper_runs_the_cli_as_a_fresh_interpreter_does(runs, tmp_path):
    """`rlhf()` forks a zygote that has the libraries imported (conftest.py); what a command prints and returns must
    not differ from `python -m rlhf_cli`: a command that succeeds with a reward function in the cwd, and a refusal."""
    (tmp_path / "localreward.py").write_text("def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    for function, code in (("localreward:score", 0), ("nothere:score", 2)):
        args = ("explain", "grpo", f"stage.reward.function={function}", f"run.root={runs}")
        forked = rlhf(*args, cwd=tmp_path)
        fresh = rlhf(*args, cwd=tmp_path, fresh=True)
        assert forked.returncode == fresh.returncode == code, forked.stderr
        assert (forked.stdout, forked.stderr) == (fresh.stdout, fresh.stderr)
        assert "batch algebra" in forked.stdout if code == 0 else "cannot import `nothere`" in forked.stderr
    assert not runs.exists()


def test_the_helper_kills_a_call_past_its_timeout_and_serves_the_next(runs, tmp_path):
    """A model folder whose config.json is a FIFO: `generate` blocks reading it. (Not a training run cut at a random
    moment: a kill inside DeepSpeed's JIT build of its shm op leaves the build's lock file, and every later run on
    the machine waits on it.)"""
    (tmp_path / "model").mkdir()
    os.mkfifo(tmp_path / "model" / "config.json")
    with pytest.raises(subprocess.TimeoutExpired):
        rlhf("generate", f"model={tmp_path / 'model'}", "prompt=hi", cwd=tmp_path, timeout=2.0)
    res = rlhf("sft", f"run.root={runs}", "optim.lrr=1", cwd=tmp_path)  # the zygote still answers
    _one_clear_error(res, "`optim.lrr`")
