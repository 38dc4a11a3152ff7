"""commands/pipeline.py without running stages: pipeline files, the split of the overrides, and the plan (skip a
stage completed with the same config, resume an interrupted one, refuse a changed one, re-run what follows a stage
that runs again)."""

import json

import pytest

from rlhf_cli.commands.pipeline import load_pipeline, pipeline_files, plan_steps, split_args
from rlhf_cli.config.compose import compose, config_hash
from rlhf_cli.errors import UserError


@pytest.mark.parametrize("name", sorted(pipeline_files()))
def test_every_shipped_pipeline_composes_and_validates(name, tmp_path):
    pipeline = load_pipeline(name)
    steps = plan_steps(pipeline, [f"run.root={tmp_path}", "run.name=x"], {s: [] for s in pipeline.stages})
    assert [s.stage for s in steps] == pipeline.stages and all(s.action == "run" for s in steps)
    assert pipeline.stages[-1] == "eval"  # every pipeline ends with the evaluation


def test_overrides_go_to_every_stage_or_to_the_one_they_name():
    common, per_stage = split_args(["seed=3", "ppo.stage.kl_coef=0.1", "sft.+experiment=dolly"], ["sft", "rm", "ppo"])
    assert common == ["seed=3"] and per_stage == {"sft": ["+experiment=dolly"], "rm": [], "ppo": ["stage.kl_coef=0.1"]}
    with pytest.raises(UserError, match="stage `dpo` is not in this pipeline"):
        split_args(["dpo.stage.beta=0.2"], ["sft", "rm"])
    with pytest.raises(UserError, match="shares one run"):
        split_args(["rm.run.name=other"], ["sft", "rm"])


def test_bad_pipeline_files_are_refused(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("stages: [sft, rmm]\n")
    with pytest.raises(UserError, match="must list distinct stages"):
        load_pipeline(str(bad))
    with pytest.raises(UserError, match="unknown pipeline `nope`"):
        load_pipeline("nope")


def _manifest(root, stages):
    (root / "x").mkdir(parents=True)
    (root / "x" / "manifest.json").write_text(json.dumps({"run": "x", "stages": stages}))


def test_plan_skips_resumes_refuses_and_reruns_what_follows(tmp_path):
    pipeline = load_pipeline("instructgpt")  # sft, rm, ppo, eval
    common = [f"run.root={tmp_path}", "run.name=x"]
    hashes = {s: config_hash(compose(s, common)) for s in pipeline.stages}
    no_extra = {s: [] for s in pipeline.stages}
    _manifest(
        tmp_path,
        {
            "sft": {"status": "completed", "config_hash": hashes["sft"]},
            "rm": {"status": "preempted", "config_hash": hashes["rm"]},
        },
    )
    steps = plan_steps(pipeline, common, no_extra)
    assert [(s.stage, s.action, s.why) for s in steps[:3]] == [
        ("sft", "skip", "completed with this config"),
        ("rm", "run", "starts again"),
        ("ppo", "run", "new"),
    ]
    (tmp_path / "x" / "rm" / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "x" / "rm" / "checkpoints" / "step-2" / "COMPLETE").touch()
    assert plan_steps(pipeline, common, no_extra)[1].why == "resumes"
    # A changed config of a completed stage: refused before anything runs, naming the way to re-run it.
    refused = r"`sft` of run `x` was completed with another config .*`sft.run.overwrite=true`"
    with pytest.raises(UserError, match=refused):
        plan_steps(pipeline, common, {**no_extra, "sft": ["stage.max_steps=7"]})
    # Overwriting sft re-runs it, and the completed stages after it run again too.
    (tmp_path / "x" / "manifest.json").write_text(
        json.dumps(
            {"run": "x", "stages": {s: {"status": "completed", "config_hash": hashes[s]} for s in pipeline.stages}}
        )
    )
    steps = plan_steps(pipeline, common, {**no_extra, "sft": ["run.overwrite=true"]})
    assert all(s.action == "run" and "run.overwrite=true" in s.args for s in steps)
    assert [s.why for s in steps[1:]] == [
        "stale: sft runs again",
        "stale: sft runs again; rm runs again",
        "stale: sft runs again; rm runs again; ppo runs again",
    ]
    assert all(s.action == "skip" for s in plan_steps(pipeline, common, no_extra))


def test_a_pipeline_whose_experiments_name_different_runs_asks_for_run_name(tmp_path):
    pipeline = load_pipeline("hh_rlhf")  # ppo_hh_rlhf's experiment file names its run hh-rlhf
    with pytest.raises(UserError, match=r"would write to different runs .*give run.name=<name>"):
        plan_steps(pipeline, [f"run.root={tmp_path}"], {s: [] for s in pipeline.stages})


def test_a_bad_combination_in_a_later_stage_is_refused_before_the_first_runs(tmp_path):
    pipeline = load_pipeline("dpo")  # sft, dpo, eval
    with pytest.raises(UserError, match="stage.n_samples=2 needs stage.generation.temperature > 0"):
        plan_steps(pipeline, [f"run.root={tmp_path}"], {"sft": [], "dpo": [], "eval": ["stage.n_samples=2"]})


def _file(tmp_path, stages, overrides=None):
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"stages": stages, "overrides": overrides or {}}))
    return load_pipeline(str(path))


@pytest.mark.parametrize(
    ("stages", "overrides", "refused"),
    [
        # grpo's reward is this run's rm by default: no stage provides it, and no reward function is named.
        (
            ["sft", "grpo", "eval"],
            {},
            r"grpo reads rm \(stage.reward.model=stage:rm\), and neither an earlier stage .*"
            r"list rm before grpo.*or give grpo.stage.reward.function=module:function",
        ),
        (["sft", "rejection_sampling"], {}, r"rejection_sampling reads rm .*neither an earlier stage"),
        (
            ["sft", "dpo", "eval"],
            {"eval": ["stage.policies=[ppo]"]},
            r"eval reads ppo \(stage.policies\[ppo\]=stage:ppo\)",
        ),
        (["sft", "ppo", "rm", "eval"], {}, r"ppo reads rm .*which the pipeline runs after it; list rm before ppo"),
    ],
)
def test_a_chain_whose_inputs_no_stage_provides_is_refused_at_composition(tmp_path, stages, overrides, refused):
    pipeline = _file(tmp_path, stages, overrides)
    with pytest.raises(UserError, match=refused):
        plan_steps(pipeline, [f"run.root={tmp_path}", "run.name=x"], {s: [] for s in stages})


def test_a_chain_may_read_a_completed_stage_of_the_run_or_go_without_an_optional_one(tmp_path):
    common = [f"run.root={tmp_path}", "run.name=x"]
    # eval's default reward (stage:rm) is optional: a DPO-only chain is evaluated without reward.
    assert [
        s.stage for s in plan_steps(_file(tmp_path, ["sft", "dpo", "eval"]), common, {"sft": [], "dpo": [], "eval": []})
    ] == ["sft", "dpo", "eval"]
    # grpo with a reward function needs no rm.
    pipeline = _file(tmp_path, ["sft", "grpo"], {"grpo": ["+experiment=grpo_parity"]})
    assert plan_steps(pipeline, common, {"sft": [], "grpo": []})[1].stage == "grpo"
    # A completed rm of the run (outside the chain) is an input the chain may read.
    _manifest(tmp_path, {"rm": {"status": "completed"}})
    pipeline = _file(tmp_path, ["sft", "rejection_sampling"])
    assert [s.action for s in plan_steps(pipeline, common, {"sft": [], "rejection_sampling": []})] == ["run", "run"]


def test_a_stale_stage_outside_the_chain_is_refused_and_one_inside_reruns(tmp_path):
    """rm recorded sft's completion `a`; sft has since completed again (`b`)."""
    common = [f"run.root={tmp_path}", "run.name=x"]
    hashes = {s: config_hash(compose(s, common)) for s in ("sft", "rm", "ppo")}
    sft_input = {"model.name_or_path": {"spec": "stage:sft", "fp": "a"}}
    _manifest(
        tmp_path,
        {
            "sft": {"status": "completed", "config_hash": hashes["sft"], "completion": {"id": "b"}},
            "rm": {
                "status": "completed",
                "config_hash": hashes["rm"],
                "completion": {"id": "c"},
                "provenance": {"config": hashes["rm"], "inputs": sft_input},
            },
        },
    )
    with pytest.raises(UserError, match=r"ppo reads rm .*which is stale \(sft re-ran after it\) and not in this pipe"):
        plan_steps(_file(tmp_path, ["ppo"]), common, {"ppo": []})
    steps = plan_steps(_file(tmp_path, ["sft", "rm", "ppo"]), common, {"sft": [], "rm": [], "ppo": []})
    assert [(s.action, s.why) for s in steps] == [
        ("skip", "completed with this config"),
        ("run", "stale: sft re-ran after it"),
        ("run", "new"),
    ]
    assert "run.overwrite=true" in steps[1].args and "run.overwrite=true" not in steps[2].args


def test_an_overwrite_applies_once_per_attempt(tmp_path):
    """A completed stage that this attempt's overwrite already replaced is skipped when the command runs again."""
    common = [f"run.root={tmp_path}", "run.name=x"]
    h = config_hash(compose("sft", common))
    _manifest(tmp_path, {"sft": {"status": "completed", "config_hash": h, "overwrite_intent": "A"}})
    pipeline = _file(tmp_path, ["sft"])
    assert plan_steps(pipeline, common, {"sft": ["run.overwrite=true"]}, attempt="A")[0].action == "skip"
    assert plan_steps(pipeline, common, {"sft": ["run.overwrite=true"]}, attempt="B")[0].why == "run.overwrite"


def test_checkpoints_of_a_stage_whose_input_runs_again_in_this_pipeline_are_not_resumed(tmp_path):
    common = [f"run.root={tmp_path}", "run.name=x"]
    hashes = {s: config_hash(compose(s, common)) for s in ("sft", "rm")}
    _manifest(
        tmp_path,
        {
            "sft": {"status": "failed", "config_hash": hashes["sft"]},
            "rm": {"status": "preempted", "config_hash": hashes["rm"]},
        },
    )
    (tmp_path / "x" / "rm" / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "x" / "rm" / "checkpoints" / "step-2" / "COMPLETE").touch()
    steps = plan_steps(_file(tmp_path, ["sft", "rm"]), common, {"sft": [], "rm": []})
    assert [(s.why, "run.overwrite=true" in s.args) for s in steps] == [
        ("starts again", False),
        ("its checkpoints are stale (sft runs again): starting again", True),
    ]
