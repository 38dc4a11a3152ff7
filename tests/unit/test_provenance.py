"""Provenance and staleness from the records alone (rlhf_cli/provenance.py), and what opening a stage does with what
is already in the run directory (rlhf_cli/stage_state.py): refusals, resume checks, overwrite set aside and put back."""

import json
import os
from types import SimpleNamespace

import pytest

from rlhf_cli.commands.pipeline import attempt_id, record_attempt
from rlhf_cli.config.compose import compose
from rlhf_cli.errors import UserError
from rlhf_cli.provenance import (
    damage,
    fingerprint,
    input_specs,
    new_completion,
    path_fingerprint,
    stale_reasons,
    upstream,
)
from rlhf_cli.registry import STAGES
from rlhf_cli.run_dir import aside_dir
from rlhf_cli.stage_state import INTENT_ENV, open_run, restore_overwritten


def test_a_file_fingerprint_changes_with_its_size_or_time_and_a_stage_with_its_completion(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    first = fingerprint(str(data), {}, tmp_path)
    assert first == fingerprint(str(data), {}, tmp_path) == path_fingerprint(data)
    data.write_text("{}\n{}\n")
    assert fingerprint(str(data), {}, tmp_path) != first
    os.utime(data, ns=(1, 1))
    touched = fingerprint(str(data), {}, tmp_path)
    os.utime(data, ns=(2, 2))
    assert fingerprint(str(data), {}, tmp_path) != touched
    manifest = {"stages": {"sft": {"status": "completed", "completion": {"id": "abc"}}}}
    assert fingerprint("stage:sft", manifest, tmp_path) == "abc"
    assert fingerprint("stage:rm", manifest, tmp_path) == "missing"
    assert fingerprint("org/model", {}, tmp_path) == "id:org/model"  # a hub id: the id itself
    assert fingerprint("rlhf_cli.tasks.parity:gold_reward", {}, tmp_path).startswith("sha256:")  # its module's bytes
    module = tmp_path / "my_reward_mod.py"
    module.write_text("def f(p, r):\n    return [1.0] * len(r)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = fingerprint("my_reward_mod:f", {}, tmp_path)
    os.utime(module, ns=(9, 9))  # a fresh clone or a reinstall: new times, same code
    assert fingerprint("my_reward_mod:f", {}, tmp_path) == before
    module.write_text("def f(p, r):\n    return [0.0] * len(r)\n")
    assert fingerprint("my_reward_mod:f", {}, tmp_path) != before
    assert fingerprint("builtin:parity", {}, tmp_path).startswith("sha256:")


def test_the_outputs_digest_sees_a_missing_or_truncated_file_but_not_a_copy(tmp_path):
    final = tmp_path / "sft" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"x" * 10)
    record = {
        "status": "completed",
        "outputs": {"final": "sft/final"},
        "completion": new_completion(tmp_path, {"final": "sft/final"}),
    }
    assert damage(tmp_path, record) is None
    os.utime(final / "model.safetensors", ns=(5, 5))  # copied without keeping times: still intact
    assert damage(tmp_path, record) is None
    (final / "model.safetensors").write_bytes(b"x" * 4)
    assert "changed after it completed" in damage(tmp_path, record)
    (final / "model.safetensors").unlink()
    final.rmdir()
    assert damage(tmp_path, record).endswith("sft/final is missing")


def test_input_specs_follow_the_registry_table():
    ppo = compose("ppo", [])
    specs = input_specs(ppo, STAGES["ppo"].inputs)
    assert upstream(specs) == {"model.name_or_path": "sft", "stage.reward.model": "rm"}
    fn = compose("grpo", ["+experiment=grpo_parity"])
    assert "stage.reward.model" not in input_specs(fn, STAGES["grpo"].inputs)  # a reward function replaces the model
    ev = compose("eval", ["stage.policies=[ppo,dpo]"])
    assert upstream(input_specs(ev, STAGES["eval"].inputs)) == {
        "model.name_or_path": "sft",
        "stage.policies[ppo]": "ppo",
        "stage.policies[dpo]": "dpo",
        "stage.reward.model": "rm",
    }
    done = {"stages": {"sft": {"status": "completed"}, "rm": {"status": "completed"}, "dpo": {"status": "failed"}}}
    assert upstream(input_specs(compose("eval", []), STAGES["eval"].inputs, done))["stage.policies[sft]"] == "sft"


def test_stale_reasons_name_what_changed(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    inputs = {
        "model.name_or_path": {"spec": "stage:sft", "fp": "old"},
        "data.source": {"spec": str(data), "path": str(data), "fp": path_fingerprint(data)},
    }
    manifest = {
        "stages": {
            "sft": {"status": "completed", "completion": {"id": "new"}},
            "rm": {"status": "completed", "provenance": {"inputs": inputs}},
        }
    }
    assert stale_reasons(manifest, "rm", tmp_path) == ["sft re-ran after it"]
    assert stale_reasons(manifest, "rm", tmp_path, frozenset({"sft"})) == ["sft runs again"]
    data.write_text("{}\n{}\n")
    assert stale_reasons(manifest, "rm", tmp_path)[1] == f"data.source {data} changed"
    manifest["stages"]["sft"]["status"] = "failed"
    assert stale_reasons(manifest, "rm", tmp_path)[0] == "sft is not complete"
    assert stale_reasons({"stages": {"rm": {"status": "completed"}}}, "rm", tmp_path) == []  # no provenance: unknown


def _run_cfg(tmp_path, overwrite=False):
    return SimpleNamespace(root=str(tmp_path), name="r", overwrite=overwrite, allow_stale_inputs=False)


def _completed_sft(tmp_path):
    run = open_run(_run_cfg(tmp_path), "sft")
    (run.final_dir).mkdir()
    (run.final_dir / "model.safetensors").write_text("old weights")
    run.update_stage(status="completed", outputs={"final": "sft/final"})
    run.release()
    return run


def test_an_overwrite_sets_the_old_output_aside_and_puts_it_back_when_the_new_run_never_starts(tmp_path):
    old = _completed_sft(tmp_path)
    record = old.stage_record()
    run = open_run(_run_cfg(tmp_path, overwrite=True), "sft")
    assert aside_dir(run).is_dir() and not (run.final_dir / "model.safetensors").exists()
    assert run.stage_record()["replacing"] == ".sft.replaced"
    assert restore_overwritten(run)  # the stage failed before `begin`
    run.release()
    assert (run.final_dir / "model.safetensors").read_text() == "old weights" and run.stage_record() == record
    # Killed before `begin`: the next open puts it back first, then decides again.
    run = open_run(_run_cfg(tmp_path, overwrite=True), "sft")
    run.release()
    with pytest.raises(UserError, match="already complete"):
        open_run(_run_cfg(tmp_path), "sft")
    assert (run.final_dir / "model.safetensors").read_text() == "old weights"
    # Once the new run has begun, the old output is gone for good.
    run = open_run(_run_cfg(tmp_path, overwrite=True), "sft")
    run.begin("", "h", {}, None)
    run.release()
    assert not aside_dir(run).exists() and "replacing" not in run.stage_record()


def test_an_overwritten_stage_that_stopped_resumes_under_the_same_intent(tmp_path, monkeypatch):
    _completed_sft(tmp_path)
    monkeypatch.setenv(INTENT_ENV, "attempt-1")
    run = open_run(_run_cfg(tmp_path, overwrite=True), "sft")
    run.begin("", "h", {}, None)
    run.update_stage(status="preempted")
    run.release()
    again = open_run(_run_cfg(tmp_path, overwrite=True), "sft")  # the requeued command: no second overwrite
    assert not aside_dir(again).exists() and any("continuing that run" in n for n in again.notes)
    again.release()
    monkeypatch.setenv(INTENT_ENV, "attempt-2")  # a new command: the overwrite applies
    assert open_run(_run_cfg(tmp_path, overwrite=True), "sft").stage_record()["replacing"]


def test_a_deleted_output_makes_a_completed_stage_incomplete(tmp_path):
    sft = _completed_sft(tmp_path)
    (sft.final_dir / "model.safetensors").unlink()
    run = open_run(_run_cfg(tmp_path), "sft")  # not refused as complete
    assert "it is not complete, training again" in run.notes[0]
    run.release()
    with pytest.raises(UserError, match="recorded as completed, but .*changed after it completed"):
        run.stage_output("sft")


def test_a_pipeline_attempt_continues_until_the_same_command_finishes(tmp_path):
    run_dir = tmp_path / "r"
    first = attempt_id(run_dir, ["a"])
    record_attempt(run_dir, ["a"], first, finished=False)
    assert attempt_id(run_dir, ["a"]) == first and attempt_id(run_dir, ["b"]) != first
    record_attempt(run_dir, ["a"], first, finished=True)
    assert attempt_id(run_dir, ["a"]) != first


def test_nan_never_reaches_the_manifest(tmp_path):
    run = open_run(_run_cfg(tmp_path), "sft")
    run.update_stage(metrics={"loss": float("nan"), "kl": float("inf"), "ok": 1.5})
    run.release()
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["stages"]["sft"]["metrics"] == {
        "loss": None,
        "kl": None,
        "ok": 1.5,
    }


def test_the_pipeline_plans_a_stage_killed_inside_its_overwrite_as_it_will_be_put_back(tmp_path, monkeypatch):
    from rlhf_cli.commands.pipeline import load_pipeline, plan_steps

    common = [f"run.root={tmp_path}", "run.name=r"]
    _completed_sft(tmp_path)
    monkeypatch.setenv(INTENT_ENV, "A")
    open_run(_run_cfg(tmp_path, overwrite=True), "sft").release()  # set aside, then killed before `begin`
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"stages": ["sft"]}))
    step = plan_steps(load_pipeline(str(path)), common, {"sft": ["run.overwrite=true"]}, attempt="A")[0]
    assert step.why == "run.overwrite" and "run.overwrite=true" in step.args


def test_rlhf_runs_shows_stale_and_incomplete_stages(tmp_path):
    from rlhf_cli.commands.runs import read_run

    sft = _completed_sft(tmp_path)
    stale = {"model.name_or_path": {"spec": "stage:sft", "fp": "an older completion"}}
    run = open_run(_run_cfg(tmp_path), "rm")
    run.update_stage(status="completed", provenance={"inputs": stale})
    run.release()
    rows = {r.stage: r.status for r in read_run(tmp_path / "r").stages}
    assert rows == {"sft": "completed", "rm": "completed (stale: sft re-ran after it)"}
    (sft.final_dir / "model.safetensors").unlink()
    rows = {r.stage: r.status for r in read_run(tmp_path / "r").stages}
    assert rows["sft"].startswith("incomplete (the files of") and rows["rm"] == "completed (stale: sft is not complete)"
