"""The run-directory contract: atomic manifest, lock, overwrite rule, complete checkpoints only."""

import json
from types import SimpleNamespace

import pytest

from rlhf_cli.errors import UserError
from rlhf_cli.files import COMPLETE_MARKER, complete_checkpoints
from rlhf_cli.stage_state import open_run


def _cfg(tmp_path, overwrite=False):
    return SimpleNamespace(root=str(tmp_path), name="r1", overwrite=overwrite)


def test_manifest_records_stage_and_is_valid_json(tmp_path):
    run = open_run(_cfg(tmp_path), "sft")
    assert run.begin("seed: 1\n", "abc", {"model": "m"}, None).startswith("starting sft")
    assert (run.stage_dir / "config.yaml").read_text() == "seed: 1\n"
    run.update_stage(status="completed", metrics={"loss": 1.5})
    data = json.loads((tmp_path / "r1" / "manifest.json").read_text())
    rec = data["stages"]["sft"]
    assert rec["status"] == "completed" and rec["config_hash"] == "abc" and rec["metrics"] == {"loss": 1.5}
    assert "torch" in rec["versions"] and rec["command"].startswith("rlhf")
    assert not list((tmp_path / "r1").glob(".manifest.json.tmp*"))  # no temporary file left behind
    run.release()


def test_run_directory_in_use_is_refused(tmp_path):
    first = open_run(_cfg(tmp_path), "sft")
    with pytest.raises(UserError, match="in use by pid"):
        open_run(_cfg(tmp_path), "sft")
    first.release()
    open_run(_cfg(tmp_path), "sft").release()  # free again once released


def test_completed_stage_needs_overwrite(tmp_path):
    run = open_run(_cfg(tmp_path), "sft")
    (run.final_dir).mkdir(parents=True)
    run.update_stage(status="completed")
    run.release()
    with pytest.raises(UserError, match="run.overwrite=true"):
        open_run(_cfg(tmp_path), "sft")
    assert run.final_dir.is_dir()  # refusing wrote and deleted nothing
    again = open_run(_cfg(tmp_path, overwrite=True), "sft")
    assert again.stage_dir.is_dir() and not again.final_dir.exists()
    again.release()


def test_only_complete_checkpoints_count(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step, complete in [(2, True), (4, True), (6, False)]:
        (ckpt / f"step-{step}").mkdir(parents=True)
        if complete:
            (ckpt / f"step-{step}" / COMPLETE_MARKER).write_text("")
    (ckpt / ".tmp-step-8").mkdir()
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step-2", "step-4"]


def test_stage_output_missing_says_which_command(tmp_path):
    run = open_run(_cfg(tmp_path), "rm")
    with pytest.raises(UserError, match=r"run `rlhf sft run.name=r1` first"):
        run.stage_output("sft")
    run.release()


def test_corrupt_manifest_is_a_user_error(tmp_path):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest.json is not valid JSON"):
        open_run(_cfg(tmp_path), "sft")


def test_resume_under_changed_config_is_refused_with_the_way_out(tmp_path):
    from rlhf_cli.config.compose import compose

    def cfg(*extra):
        return compose("sft", [f"run.root={tmp_path}", "run.name=r1", *extra])

    first = cfg()
    run = open_run(first.run, "sft", cfg=first)
    run.begin("", "abc", {}, None)
    (run.checkpoints_dir / "step-2").mkdir(parents=True)
    (run.checkpoints_dir / "step-2" / COMPLETE_MARKER).touch()
    run.update_stage(status="interrupted")
    run.release()
    open_run(first.run, "sft", cfg=first).release()  # the same config resumes
    changed = cfg("stage.max_steps=7")
    with pytest.raises(UserError, match=r"were written from other inputs: the config changed .*run.overwrite=true"):
        open_run(changed.run, "sft", cfg=changed)
    stopped = cfg("stage.stop_after_steps=1")  # not part of what a stage computes
    open_run(stopped.run, "sft", cfg=stopped).release()


@pytest.mark.parametrize("name", ["", ".", "..", "../outside", "a/b", "a\\b"])
def test_run_name_must_be_one_folder_name_before_anything_is_created(tmp_path, name):
    root = tmp_path / "runs"
    root.mkdir()
    with pytest.raises(UserError, match="`run.name` is .*, must be a single folder name"):
        open_run(SimpleNamespace(root=str(root), name=name, overwrite=True), "sft")
    assert not any(tmp_path.rglob("*.lock")) and list(tmp_path.iterdir()) == [root] and not any(root.iterdir())


def test_overwrite_never_deletes_outside_the_run_directory(tmp_path):
    """A stage folder that is a symlink to elsewhere: run.overwrite must refuse, not delete the target."""
    run = open_run(_cfg(tmp_path), "sft")
    run.update_stage(status="completed")
    run.release()
    precious = tmp_path / "precious"
    (precious / "final").mkdir(parents=True)
    (precious / "final" / "model.safetensors").write_text("weights")
    run.stage_dir.rmdir()
    run.stage_dir.symlink_to(precious, target_is_directory=True)
    with pytest.raises(UserError, match="refusing to replace .*outside the run directory"):
        open_run(_cfg(tmp_path, overwrite=True), "sft")
    assert (precious / "final" / "model.safetensors").read_text() == "weights"
    open_run(_cfg(tmp_path), "rm").release()  # the lock was released


@pytest.mark.parametrize(
    "run,stage,key", [("../x", "sft", "run.name"), ("", "sft", "run.name"), ("demo", "../../x", "stage")]
)
def test_tools_refuse_a_run_or_stage_that_is_not_one_folder_name(tmp_path, run, stage, key):
    from rlhf_cli.commands.args import resolve_checkpoint

    with pytest.raises(UserError, match=f"argument `{key}` is .*, must be a single folder name"):
        resolve_checkpoint(None, run, str(tmp_path), stage)
