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
    stage = experiment.split("_")[0] if experiment.split("_")[0] in ("rm", "dpo", "ppo") else None
    errors = []
    for candidate in [stage] if stage else ["sft", "rm", "dpo"]:
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
        ("model=qwen3", "Could not find 'model/qwen3'"),
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
