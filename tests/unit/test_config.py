"""Every YAML under configs/ composes and validates; mistakes name the key and the closest valid one."""

from pathlib import Path

import pytest

from rlhf_cli.cli import main
from rlhf_cli.config.compose import compose, config_dir, config_hash
from rlhf_cli.errors import UserError

CONFIGS = config_dir()
GROUPS = ["model", "data", "optim", "deepspeed"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    """Each option validates under at least one stage (SFT data under sft, preference data under rm, prompts
    under ppo)."""
    errors = []
    for stage in ("sft", "rm", "ppo"):
        try:
            cfg = compose(stage, [f"{group}={option}"])
        except UserError as err:
            errors.append(str(err))
            continue
        assert cfg.stage.name == stage
        return
    pytest.fail(f"{group}/{option} composes under no stage: {errors}")


def test_ppo_composes_with_prompt_data_and_its_choices():
    cfg = compose("ppo", [])
    assert cfg.data.source == "builtin:sample_prompts" and cfg.stage.reward.model == "stage:rm"
    assert compose("ppo", ["+experiment=ppo_parity"]).stage.reward.function == "rlhf_cli.tasks.parity:gold_reward"
    with pytest.raises(UserError, match="stage.kl_control"):
        compose("ppo", ["stage.kl_control=adaptiv"])
    with pytest.raises(UserError, match="stage.generation.max_new_tokens"):
        compose("ppo", ["stage.generation.max_new_tokens=0"])


def test_stage_files_choose_their_data_and_model():
    rm = compose("rm", [])
    assert rm.stage.name == "rm" and rm.data.source == "builtin:sample_preferences"
    assert rm.model.name_or_path == "stage:sft"
    assert compose("rm", ["data=hh_rlhf"]).data.format == "hh_rlhf"
    with pytest.raises(UserError, match="data.format"):
        compose("sft", ["data=hh_rlhf"])


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_is_global(experiment):
    text = (CONFIGS / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_")
    prefix = experiment.split("_")[0]
    stage = {"rs": "rejection_sampling"}.get(prefix, prefix)  # an online stage's experiment is named after it
    errors = []
    online = ("rm", "dpo", "ppo", "rejection_sampling", "grpo", "rloo", "reinforce_pp", "distill")
    for candidate in [stage] if stage in online else ["sft", "rm", "dpo"]:
        try:
            compose(candidate, [f"+experiment={experiment}"])
            return
        except UserError as err:
            errors.append(str(err))
    pytest.fail(f"experiment {experiment} composes under no stage: {errors}")


def test_dolly_experiment_uses_real_model_and_data():
    cfg = compose("sft", ["+experiment=dolly", "optim.lr=2e-5", "data.max_length=1024"])
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.data.source == "databricks/databricks-dolly-15k"
    assert cfg.optim.lr == pytest.approx(2e-5) and cfg.data.max_length == 1024
    assert cfg.deepspeed.precision == "bf16"


def test_override_of_schema_key_absent_from_yaml():
    # qwen's model file names no lora block; the schema still has it.
    cfg = compose("sft", ["model=qwen2_5_0_5b", "model.lora.r=4", "model.lora.enabled=true"])
    assert cfg.model.lora.r == 4 and cfg.model.lora.enabled


def test_config_is_read_only():
    cfg = compose("sft", [])
    from omegaconf.errors import ReadonlyConfigError

    with pytest.raises(ReadonlyConfigError):
        cfg.optim.lr = 1.0


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.lrr=1", "`optim.lrr`; did you mean `optim.lr`?"),
        ("stage.micro_batch_sise=2", "did you mean `stage.micro_batch_size`?"),
        ("optim.lr=fast", "bad value for config key `optim.lr` (set on the command line)"),
        ("data.format=dolyy", "did you mean `dolly`?"),
        ("deepspeed.zero_stage=5", "`deepspeed.zero_stage`"),
        ("model=qwen3", "unknown choice `qwen3` for config group `model` (choices under "),
        ("model=qwen2_5", "did you mean `model=qwen2_5_0_5b`?"),
        ("+experiment=dolyy", "did you mean `+experiment=dolly`?"),
        ("model=null", "unknown choice `null` for config group `model`"),
        ("stage.micro_batch_size=0", "must be >= 1"),
    ],
)
def test_mistakes_are_user_errors(override, needle):
    with pytest.raises(UserError) as err:
        compose("sft", [override])
    assert needle in str(err.value)


def test_typo_in_yaml_file_is_caught(tmp_path, monkeypatch):
    import shutil

    import rlhf_cli.config.compose as compose_mod

    copy = tmp_path / "configs"
    shutil.copytree(CONFIGS, copy)
    (copy / "optim" / "adamw.yaml").write_text("lr: 1.0e-3\nwarmup_ration: 0.1\n")
    monkeypatch.setattr(compose_mod, "config_dir", lambda: copy)
    with pytest.raises(UserError, match=r"`optim.warmup_ration`; did you mean `optim.warmup_ratio`.*adamw.yaml:2"):
        compose("sft", [])


def test_a_key_another_stage_takes_is_located_in_the_experiment_that_sets_it():
    # max_steps is in several experiment files; the one named on the command line is where eval met it.
    with pytest.raises(UserError, match=r"`stage.max_steps`.*experiment/ppo_detox.yaml:\d+"):
        compose("eval", ["+experiment=ppo_detox"])


def test_config_hash_ignores_logging_and_overwrite():
    base = config_hash(compose("sft", []))
    assert base == config_hash(compose("sft", ["logging.log_every=5", "run.overwrite=true"]))
    assert base != config_hash(compose("sft", ["optim.lr=1e-4"]))


def test_cli_cfg_job_prints_config_without_running(capsys, tmp_path):
    assert main(["sft", "--cfg", "job", f"run.root={tmp_path}", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "zero_stage: 0" in out
    assert not any(tmp_path.iterdir())  # nothing was created


def test_cli_help_lists_stages_with_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "rlhf sft +experiment=dolly" in out and "generate" in out
    assert "  rejection_sampling\n            best-of-N rejection sampling in rounds, from sft; reward from rm\n" in out
    assert "rlhf rejection_sampling stage.n_samples=8 stage.rounds=2" in out


def test_cli_bad_key_exits_2_with_one_line(capsys):
    assert main(["sft", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean `optim.lr`" in err and "Traceback" not in err


def test_cli_unknown_command_suggests(capsys):
    assert main(["sfft"]) == 2
    assert "did you mean `sft`" in capsys.readouterr().err


def test_configs_ship_with_the_package():
    # pyproject maps configs/ to rlhf_cli/configs in the wheel; the editable checkout reads it in place.
    assert (CONFIGS / "config.yaml").is_file()
    text = Path(__file__).resolve().parents[2].joinpath("pyproject.toml").read_text()
    assert '"rlhf_cli.configs" = "configs"' in text


# Numbers out of range: one message naming the key, the value and the range, before anything is built.
@pytest.mark.parametrize(
    "stage,override,message",
    [
        ("sft", "optim.lr=-0.1", "config key `optim.lr` is -0.1, must be > 0"),
        ("sft", "optim.lr=inf", "`optim.lr` is inf, must be a finite number > 0"),
        ("sft", "optim.lr=nan", "`optim.lr` is nan, must be a finite number > 0"),
        ("sft", "optim.betas=[0.9,1.0]", "`optim.betas[1]` is 1.0, must be in [0, 1)"),
        ("sft", "optim.betas=[0.9]", "`optim.betas` has 1 value(s) [0.9], must have exactly 2"),
        ("sft", "optim.eps=0", "`optim.eps` is 0.0, must be > 0"),
        ("sft", "optim.weight_decay=-1", "`optim.weight_decay` is -1.0, must be >= 0"),
        ("sft", "optim.warmup_ratio=1.5", "`optim.warmup_ratio` is 1.5, must be in [0, 1]"),
        ("sft", "optim.warmup_steps=-1", "`optim.warmup_steps` is -1, must be >= 0 or null"),
        ("sft", "optim.min_lr_ratio=2", "`optim.min_lr_ratio` is 2.0, must be in [0, 1]"),
        ("sft", "optim.max_grad_norm=0", "`optim.max_grad_norm` is 0.0, must be > 0"),
        ("sft", "stage.epochs=0", "`stage.epochs` is 0.0, must be > 0"),
        ("sft", "stage.max_steps=0", "`stage.max_steps` is 0, must be >= 1 or null"),
        ("sft", "stage.eval_every=-1", "`stage.eval_every` is -1, must be >= 0"),
        ("sft", "stage.eval_batch_size=0", "`stage.eval_batch_size` is 0, must be >= 1"),
        ("sft", "stage.save_every=-5", "`stage.save_every` is -5, must be >= 0"),
        ("sft", "stage.keep_last=0", "`stage.keep_last` is 0, must be >= 1"),
        ("sft", "stage.stop_after_steps=0", "`stage.stop_after_steps` is 0, must be >= 1 or null"),
        ("sft", "data.eval_fraction=1", "`data.eval_fraction` is 1.0, must be in [0, 1)"),
        ("sft", "data.max_samples=0", "`data.max_samples` is 0, must be >= 1 or null"),
        ("sft", "data.min_response_tokens=0", "`data.min_response_tokens` is 0, must be >= 1"),
        ("sft", "model.lora.r=0", "`model.lora.r` is 0, must be >= 1"),
        ("sft", "model.lora.alpha=0", "`model.lora.alpha` is 0, must be > 0"),
        ("sft", "model.lora.dropout=1", "`model.lora.dropout` is 1.0, must be in [0, 1)"),
        ("sft", "model.tiny.num_hidden_layers=0", "`model.tiny.num_hidden_layers` is 0, must be >= 1"),
        ("sft", "seed=-1", "`seed` is -1, must be >= 0"),
        ("sft", "logging.log_every=0", "`logging.log_every` is 0, must be >= 1"),
        ("rm", "stage.center_coef=-0.1", "`stage.center_coef` is -0.1, must be >= 0 or null"),
        ("rm", "stage.min_eval_accuracy=1.5", "`stage.min_eval_accuracy` is 1.5, must be in [0, 1] or null"),
        ("rm", "data.shp_min_score_ratio=-1", "`data.shp_min_score_ratio` is -1.0, must be >= 0"),
        ("dpo", "stage.beta=0", "config key `stage.beta` is 0.0, must be > 0"),
        ("dpo", "stage.label_smoothing=0.5", "`stage.label_smoothing` is 0.5, must be in [0, 0.5)"),
        ("dpo", "stage.simpo_gamma=-1", "`stage.simpo_gamma` is -1.0, must be >= 0"),
        ("dpo", "stage.rpo_alpha=-1", "`stage.rpo_alpha` is -1.0, must be >= 0"),
        ("dpo", "stage.orpo_lambda=-1", "`stage.orpo_lambda` is -1.0, must be >= 0"),
        ("ppo", "stage.clip_eps=0", "`stage.clip_eps` is 0.0, must be > 0"),
        ("ppo", "stage.value_clip_eps=-1", "`stage.value_clip_eps` is -1.0, must be > 0"),
        ("ppo", "stage.vf_coef=-1", "`stage.vf_coef` is -1.0, must be >= 0"),
        ("ppo", "stage.gamma=1.01", "`stage.gamma` is 1.01, must be in [0, 1]"),
        ("ppo", "stage.lam=-0.5", "`stage.lam` is -0.5, must be in [0, 1]"),
        ("ppo", "stage.entropy_coef=-1", "`stage.entropy_coef` is -1.0, must be >= 0"),
        ("ppo", "stage.kl_coef=-0.05", "`stage.kl_coef` is -0.05, must be >= 0"),
        ("ppo", "stage.kl_target=0", "`stage.kl_target` is 0.0, must be > 0"),
        ("ppo", "stage.kl_horizon=0", "`stage.kl_horizon` is 0, must be >= 1"),
        ("ppo", "stage.target_kl=0", "`stage.target_kl` is 0.0, must be > 0 or null"),
        ("ppo", "stage.critic.lr=0", "`stage.critic.lr` is 0.0, must be > 0"),
        ("ppo", "stage.ptx.coef=-1", "`stage.ptx.coef` is -1.0, must be >= 0"),
        ("ppo", "stage.ptx.micro_batch_size=0", "`stage.ptx.micro_batch_size` is 0, must be >= 1"),
        ("ppo", "stage.ptx.data.max_length=0", "`stage.ptx.data.max_length` is 0, must be >= 1"),
        ("ppo", "stage.sample_every=-1", "`stage.sample_every` is -1, must be >= 0"),
        ("ppo", "stage.sample_rows=-1", "`stage.sample_rows` is -1, must be >= 0"),
        ("ppo", "stage.reward.clip=0", "`stage.reward.clip` is 0.0, must be > 0 or null"),
        ("ppo", "stage.reward.missing_eos_penalty=-1", "`stage.reward.missing_eos_penalty` is -1.0, must be >= 0 or"),
        ("ppo", "stage.reward.missing_eos_score=nan", "`stage.reward.missing_eos_score` is nan, must be a finite"),
        ("ppo", "data.max_prompt_length=0", "`data.max_prompt_length` is 0, must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused(stage, override, message):
    with pytest.raises(UserError) as err:
        compose(stage, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override",
    [
        "stage.generation.temperature=0",
        "stage.generation.temperature=-1",
        "stage.generation.top_k=50",
        "stage.generation.top_p=0.9",
    ],
)
def test_ppo_refuses_off_policy_sampling_and_says_why(override):
    with pytest.raises(UserError) as err:
        compose("ppo", [override])
    key = override.split("=")[0]
    assert f"config key `{key}`" in str(err.value) and "for `rlhf ppo`" in str(err.value)
    assert "log-probs enter the ratio and the KL" in str(err.value) and "off-policy" in str(err.value)


def test_values_on_the_edge_of_their_range_are_accepted():
    """Closed ends are allowed, and so is null where the schema allows it: nothing valid is refused."""
    edges = [
        "optim.warmup_ratio=0",
        "optim.warmup_ratio=1",
        "optim.min_lr_ratio=1",
        "optim.betas=[0,0.999]",
        "optim.weight_decay=0",
        "optim.warmup_steps=0",
        "stage.eval_every=0",
        "stage.save_every=0",
        "data.eval_fraction=0",
        "seed=0",
        "model.lora.dropout=0",
    ]
    compose("sft", edges)
    compose("rm", ["stage.center_coef=0", "stage.min_eval_accuracy=1"])
    compose("dpo", ["stage.label_smoothing=0.49", "stage.simpo_gamma=0", "stage.rpo_alpha=0", "stage.orpo_lambda=0"])
    compose(
        "ppo",
        [
            "stage.gamma=0",
            "stage.lam=1",
            "stage.kl_coef=0",
            "stage.target_kl=null",
            "stage.sample_rows=0",
            "stage.generation.top_k=0",
            "stage.generation.top_p=1.0",
            "stage.reward.clip=null",
            "stage.reward.missing_eos_penalty=0",
        ],
    )


def test_missing_eos_score_can_be_set_alone_or_with_the_penalty():
    assert compose("ppo", ["stage.reward.missing_eos_score=-1"]).stage.reward.missing_eos_score == -1
    both = compose("ppo", ["stage.reward.missing_eos_score=-2", "stage.reward.missing_eos_penalty=null"])
    assert both.stage.reward.missing_eos_penalty is None


def test_range_table_names_schema_keys_and_marks_nullable_ones():
    """A typo in the table would silently check nothing; `or null` must match the schema's `X | None`."""
    import dataclasses

    from rlhf_cli.config import ranges as ranges_mod
    from rlhf_cli.registry import STAGES

    def field_types(schema, prefix=""):
        out = {}
        for f in dataclasses.fields(schema):
            out[prefix + f.name] = str(f.type)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                out.update(field_types(type(default), f"{prefix}{f.name}."))
        return out

    tables = [(None, ranges_mod._RANGES)] + [(name, spec.ranges) for name, spec in STAGES.items()]
    for stage, table in tables:
        schemas = [STAGES[stage].schema] if stage else [spec.schema for spec in STAGES.values()]
        types = {}
        for schema in schemas:
            types.update(field_types(schema))
        for key, rule in table.items():
            spec = rule if isinstance(rule, str) else rule[0]
            assert key in types, f"range table key `{key}` is in no schema of {stage or 'any stage'}"
            ranges_mod.range_bounds(spec)  # parses
            assert ("None" in types[key]) == spec.endswith(" or null"), (key, types[key], spec)


def test_override_syntax_error_names_the_override():
    with pytest.raises(UserError, match=r"cannot parse the override `optim.lr=\[1,`: no viable alternative"):
        compose("sft", ["stage.max_steps=3", "optim.lr=[1,", "seed=1"])
    with pytest.raises(UserError, match=r"cannot parse the override `data.system_prompt=a'b`: unexpected `'`"):
        compose("sft", ["data.system_prompt=a'b"])
    with pytest.raises(UserError, match=r"cannot parse the override `=3`: no key before `=`"):
        compose("sft", ["=3"])


@pytest.mark.parametrize("name", ["", ".", "..", "../../x", "a/b", "a\\b", "a\0b"])
def test_run_name_must_be_one_folder_name(name):
    from rlhf_cli.config.compose import validate

    with pytest.raises(UserError, match=r"config key `run.name` is .*, must be a single folder name"):
        validate("sft", {"run": {"name": name}})


def test_run_name_from_the_command_line_is_checked():
    with pytest.raises(UserError, match=r"`run.name` is '../../x', must be a single folder name"):
        compose("sft", ["run.name=../../x"])
    with pytest.raises(UserError, match=r"`run.name` is '', must be a single folder name"):
        compose("sft", ["run.name="])


def test_run_names_of_the_experiments_are_accepted():
    assert compose("sft", ["+experiment=dolly"]).run.name == "dolly-qwen2.5-0.5b"
    assert compose("sft", ["run.name=my-run_2.v1"]).run.name == "my-run_2.v1"
