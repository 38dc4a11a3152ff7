"""The stage registry (rlhf_cli/registry.py): one entry per stage that the CLI, composition, validation, the
help and `rlhf explain` read; an entry without optional tables still works; rejection_sampling's keys are checked
before anything is built."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from rlhf_cli.cli import main, usage
from rlhf_cli.config import schema as s
from rlhf_cli.config.compose import compose, config_dir, stage_ranges, validate
from rlhf_cli.errors import UserError
from rlhf_cli.registry import ONLINE_RANGES, STAGES, StageSpec

RS = "rejection_sampling"


def _fields(cls: type, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(cls):
        out.add(prefix + f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out |= _fields(type(default), f"{prefix}{f.name}.")
    return out


@pytest.mark.parametrize("name", list(STAGES))
def test_an_entry_names_one_stage_everywhere(name):
    spec = STAGES[name]
    # A family of verbs (grpo / rloo / reinforce_pp) shares one module and schema; the rest have their own.
    family = [other for other in STAGES.values() if other.module == spec.module]
    assert spec.name == name and (spec.module == f"rlhf_cli.stages.{name}" or len(family) > 1)
    assert all(other.schema is spec.schema for other in family)
    assert importlib.util.find_spec(spec.module) is not None  # the module exists (not imported: it is heavy)
    assert (config_dir() / "stage" / f"{name}.yaml").is_file()
    stage_cls = {f.name: f for f in dataclasses.fields(spec.schema)}["stage"].default_factory
    assert stage_cls().name == name or compose(name, []).stage.name == name  # the run-dir folder is the verb
    assert "\n" not in spec.summary and spec.example.startswith(f"rlhf {name}")
    keys = _fields(spec.schema)
    for key in [*spec.choices, *spec.required_when, *(other for other, _ in spec.required_when.values())]:
        assert key in keys, f"{name}: `{key}` is in no field of {spec.schema.__name__}"
    assert set(spec.formats) <= set(s.SFT_FORMATS + s.PREFERENCE_FORMATS + s.PROMPT_FORMATS)


def test_importing_the_registry_stays_light():
    code = (
        "import sys, rlhf_cli.registry; print(*[m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""


def test_an_entry_without_optional_tables_works(monkeypatch):
    """A new stage with no formats, choices, ranges or explain settings of its own: no KeyError anywhere."""
    monkeypatch.setitem(STAGES, "toy", StageSpec("toy", "rlhf_cli.stages.toy", s.SFTRoot, "a toy", "rlhf toy"))
    cfg = validate("toy", {"stage": {"name": "toy"}, "data": {"format": "anything"}})
    assert cfg.stage.name == "toy" and stage_ranges("toy")["stage.micro_batch_size"] == ">= 1"
    assert "  toy       a toy\n" in usage()
    with pytest.raises(UserError, match="`stage.micro_batch_size` is 0, must be >= 1"):
        validate("toy", {"stage": {"name": "toy", "micro_batch_size": 0}})


def test_the_stage_name_is_the_verb():
    with pytest.raises(UserError, match=r"config key `stage.name` is 'dpo', must be 'sft'"):
        compose("sft", ["stage.name=dpo"])


def test_the_online_stages_share_the_generation_and_reward_ranges():
    for stage in ("ppo", RS):
        ranges = stage_ranges(stage)
        shared = {k for k in ONLINE_RANGES if k not in ("stage.generation.top_k", "stage.generation.top_p")}
        assert {k: ranges[k] for k in shared} == {k: ONLINE_RANGES[k] for k in shared}
    for stage in ("sft", "rm", "dpo"):
        assert not set(ONLINE_RANGES) & set(stage_ranges(stage))


# ---------------------------------------------------------------- rejection_sampling


def test_rejection_sampling_composes_from_sft_with_rm_and_prompt_data():
    cfg = compose(RS, [])
    assert cfg.stage.name == RS and cfg.model.name_or_path == "stage:sft" and cfg.stage.reward.model == "stage:rm"
    assert cfg.data.source == "builtin:sample_prompts" and cfg.data.format == "jsonl"
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio) == (1e-4, "constant", 0.0)
    assert (cfg.stage.epochs, cfg.stage.micro_batch_size, cfg.stage.gradient_accumulation_steps) == (1, 8, 1)
    assert (cfg.stage.eval_batch_size, cfg.stage.n_samples, cfg.stage.rounds) == (32, 4, 1)
    assert (cfg.stage.generation.temperature, cfg.stage.generation.max_new_tokens) == (1.0, 32)
    assert compose(RS, ["+experiment=rs_parity"]).stage.reward.function == "rlhf_cli.tasks.parity:gold_reward"
    assert compose(RS, ["data=parity"]).data.source == "builtin:parity"
    with pytest.raises(UserError, match="data.format"):
        compose(RS, ["data.format=oasst1"])


def test_rejection_sampling_accepts_what_ppo_refuses_and_the_edges():
    """top-k / top-p sampling is fine here: the sampling log-probs enter no loss."""
    cfg = compose(
        RS,
        [
            "stage.generation.top_k=50",
            "stage.generation.top_p=0.9",
            "stage.prompts_per_round=1",
            "stage.reward.normalize=rm_stats",
            "stage.selection=top_k",
            "stage.top_k=1",
            "stage.init=sft",
            "stage.reward.reduce=prob",
            "stage.generation.temperature=0.01",
        ],
    )
    assert cfg.stage.generation.top_k == 50 and cfg.stage.selection == "top_k"
    assert compose(RS, ["stage.selection=threshold", "stage.threshold=-3"]).stage.threshold == -3
    assert compose(RS, ["stage.threshold=0.5"]).stage.selection == "best"  # a threshold alone is harmless


@pytest.mark.parametrize(
    "override,message",
    [
        ("stage.rounds=0", "`stage.rounds` is 0, must be >= 1"),
        ("stage.n_samples=0", "`stage.n_samples` is 0, must be >= 1"),
        ("stage.top_k=0", "`stage.top_k` is 0, must be >= 1"),
        ("stage.threshold=nan", "`stage.threshold` is nan, must be a finite number or null"),
        ("stage.prompts_per_round=0", "`stage.prompts_per_round` is 0, must be >= 1 or null"),
        ("stage.generation_batch_size=0", "`stage.generation_batch_size` is 0, must be >= 1"),
        ("stage.eval_batch_size=0", "`stage.eval_batch_size` is 0, must be >= 1"),
        ("stage.generation.max_new_tokens=0", "`stage.generation.max_new_tokens` is 0, must be >= 1"),
        ("stage.generation.top_p=0", "`stage.generation.top_p` is 0.0, must be in (0, 1]"),
        ("stage.reward.clip=0", "`stage.reward.clip` is 0.0, must be > 0 or null"),
        (
            "stage.generation.temperature=0",
            "`stage.generation.temperature` is 0.0, must be > 0 for `rlhf "
            "rejection_sampling`: N samples at temperature 0 are one greedy answer N times",
        ),
        (
            "stage.selection=bets",
            "`stage.selection` is 'bets', must be one of ['best', 'top_k', 'threshold']; did you mean `best`?",
        ),
        ("stage.init=policy", "`stage.init` is 'policy', must be one of ['previous', 'sft']"),
        ("stage.reward.reduce=mean", "`stage.reward.reduce` is 'mean', must be one of ['logit', 'prob']"),
        (
            "stage.reward.normalize=running",
            "`stage.reward.normalize` is 'running', must be one of ['none', "
            "'rm_stats'] for `rlhf rejection_sampling`: a running normalisation moves between the generate calls",
        ),
        (
            "stage.selection=threshold",
            "config key `stage.selection` is 'threshold', which needs `stage.threshold`, "
            "but `stage.threshold` is null: set stage.threshold=<value> or choose another stage.selection",
        ),
    ],
)
def test_rejection_sampling_refuses_with_one_message(override, message):
    with pytest.raises(UserError) as err:
        compose(RS, [override])
    assert message in str(err.value)


def test_rejection_sampling_cfg_job_and_help(capsys, tmp_path):
    assert main([RS, "--cfg", "job", f"run.root={tmp_path}", "stage.n_samples=8", "stage.rounds=2"]) == 0
    out = capsys.readouterr().out
    printed = OmegaConf.create(out)
    assert printed.stage.name == RS and printed.stage.n_samples == 8 and printed.stage.rounds == 2
    assert not any(tmp_path.iterdir())
    assert main([RS, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rlhf {RS}") and "stage.n_samples=4" in out and "stage.selection=best" in out
    assert "rlhf rejection_sampling stage.n_samples=8 stage.rounds=2" in out


@pytest.mark.parametrize(
    "stage,overrides,message",
    [
        ("ppo", ["stage.reward.function=nosuchmodule:f"], "stage.reward.function=`nosuchmodule:f`: cannot import"),
        ("ppo", ["stage.reward.function=rlhf_cli.tasks.parity"], "expected `module:function`"),
        ("grpo", ["stage.gold_reward=no_such_pkg.metrics:gold"], "stage.gold_reward=`no_such_pkg.metrics:gold`"),
        (
            "rejection_sampling",
            ["stage.reward.functions=[{fn: nosuchmodule:f, weight: 1.0}]"],
            "stage.reward.functions=`nosuchmodule:f`",
        ),
        ("eval", ["stage.gold=nosuchmodule:f"], "stage.gold=`nosuchmodule:f`: cannot import `nosuchmodule`"),
        ("ppo", ["stage.rollout_batch_size=6"], "stage.rollout_batch_size=6 is not a multiple of the mini-batch"),
        ("grpo", ["stage.n_samples=1"], "stage.n_samples must be >= 2"),
        (
            "grpo",
            ["stage.rollout_batch_size=3", "stage.n_samples=3", "launcher.nproc_per_node=2"],
            "9 rollout rows cannot be dealt evenly to 2 ranks",
        ),
    ],
)
def test_online_settings_that_would_fail_after_loading_are_refused_at_composition(stage, overrides, message):
    # These used to end the stage only after torch, DeepSpeed and the models had loaded (5-6 s in).
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        compose(stage, overrides)


def test_a_function_beside_the_command_and_model_sources_pass(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text("def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    compose("ppo", ["stage.reward.function=my_reward:score", "stage.gold_reward=stage:rm"])
    compose(
        "grpo",
        [
            "stage.rollout_batch_size=3",
            "stage.n_samples=4",
            "stage.micro_batch_size=6",
            "stage.gradient_accumulation_steps=1",
            "launcher.nproc_per_node=2",
        ],
    )
    monkeypatch.setenv("WORLD_SIZE", "4")  # under torchrun the launcher's world size counts, not launcher.*
    with pytest.raises(UserError, match="cannot be dealt evenly to 4 ranks"):
        compose("grpo", ["stage.rollout_batch_size=3", "stage.n_samples=2"])


def test_rejection_sampling_refuses_unmerged_lora_rounds_at_composition(tmp_path):
    # The previous round's exported policy is the next round's sampler: an adapter alone cannot be one. Refused by the
    # registry entry's `check` when the config is composed, before a run directory, torch or a model.
    lora = ["model.lora.enabled=true", "model.lora.merge=false"]
    with pytest.raises(UserError, match="model.lora.merge=false with stage.rounds > 1"):
        compose(RS, [*lora, "stage.rounds=2"])
    compose(RS, [*lora, "stage.rounds=1"])  # one round exports only final/: an adapter is fine there
    compose(RS, ["model.lora.enabled=true", "model.lora.merge=true", "stage.rounds=2"])
    code = (
        "import sys; from rlhf_cli.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, *[m for m in ('torch', 'deepspeed') if m in sys.modules])"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, RS, *lora, "stage.rounds=2", f"run.root={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert res.stdout.strip() == "2", res.stdout + res.stderr
    assert "model.lora.merge=false with stage.rounds > 1" in res.stderr and not any(tmp_path.iterdir())
