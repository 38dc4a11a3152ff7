"""One source for every default and every list of allowed values: the schema dataclasses hold the defaults and
configs/ states only what differs from them, so a stage's composed config is "schema + its files"; the tuples of
allowed values in config/schema.py are exactly what the code that dispatches on them accepts."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from rlhf_cli.config import online as o
from rlhf_cli.config import schema as s
from rlhf_cli.config.compose import compose, config_dir
from rlhf_cli.registry import STAGES

CONFIGS = config_dir()
# Keys that name what a group file is: stated even when they equal the schema default.
IDENTITY = {"data": {"source", "format"}, "model": {"name_or_path"}, "deepspeed": {"zero_stage"}}
DATA_SCHEMAS = {
    s.DataConfig: s.SFT_FORMATS,
    s.PreferenceDataConfig: s.PREFERENCE_FORMATS,
    s.PromptDataConfig: s.PROMPT_FORMATS,
}


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty dict stays a value. Hydra's defaults list is left out."""
    out = {}
    for key, value in node.items():
        if key == "defaults" and not prefix:
            continue
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def schema_defaults(cls: type) -> dict[str, Any]:
    return flat(OmegaConf.to_container(OmegaConf.structured(cls)))


def yaml_keys(path: Path) -> dict[str, Any]:
    return flat(OmegaConf.to_container(OmegaConf.load(path)) or {})


def restated(keys: dict[str, Any], defaults: dict[str, Any], allowed: set[str] = frozenset()) -> list[str]:
    return [f"{k}: {v!r}" for k, v in keys.items() if k not in allowed and k in defaults and defaults[k] == v]


# ---------------------------------------------------------------- configs/ states only what differs


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_file_states_only_what_differs_from_the_schema(stage):
    path = CONFIGS / "stage" / f"{stage}.yaml"
    offenders = restated(yaml_keys(path), schema_defaults(STAGES[stage].schema))
    assert not offenders, f"{path} restates schema defaults: {offenders}"


def test_root_optim_and_deepspeed_files_state_only_what_differs():
    offenders = restated(yaml_keys(CONFIGS / "config.yaml"), schema_defaults(s.RootConfig))
    for group, cls in (("optim", s.OptimConfig), ("deepspeed", s.DeepSpeedConfig), ("model", s.ModelConfig)):
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            offenders += [
                f"{group}/{path.name}: {o}"
                for o in restated(yaml_keys(path), schema_defaults(cls), IDENTITY.get(group, set()))
            ]
    assert not offenders, f"restated schema defaults: {offenders}"


@pytest.mark.parametrize("path", sorted((CONFIGS / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_data_file_states_only_what_differs_under_every_schema_that_reads_it(path):
    """A data file may fit several data schemas (sample_preferences is jsonl pairs, and jsonl for sft too): a key is
    a restated default when it equals the default of every schema that can read the file."""
    keys = yaml_keys(path)
    readers = [
        schema_defaults(cls)
        for cls, formats in DATA_SCHEMAS.items()
        if keys["format"] in formats and set(keys) <= {f.name for f in dataclasses.fields(cls)}
    ]
    assert readers, f"{path} fits no data schema"
    for defaults in readers[1:]:
        keys = {k: v for k, v in keys.items() if restated({k: v}, defaults)}
    offenders = restated(keys, readers[0], IDENTITY["data"])
    assert not offenders, f"{path} restates schema defaults: {offenders}"


def test_every_stage_file_has_a_registry_entry_and_back():
    assert {p.stem for p in (CONFIGS / "stage").glob("*.yaml")} == set(STAGES)


# ---------------------------------------------------------------- the composed configs


# Stage -> its composed config less the schema's defaults: what configs/config.yaml, the group files it picks and
# configs/stage/<stage>.yaml change. (Unchanged by moving the shared values into the schema: checked against the
# composed configs from before.)
# What the three critic-free verbs share (the schema's defaults are GRPO's; rloo / reinforce_pp set their own).
_ONLINE = {
    "model.name_or_path": "stage:sft",
    "optim.lr": 2e-5,
    "optim.schedule": "constant",
    "optim.warmup_ratio": 0.0,
    "data.max_prompt_length": 192,
    "stage.max_steps": 30,
    "stage.micro_batch_size": 16,
    "stage.gradient_accumulation_steps": 2,
    "stage.eval_every": 10,
    "stage.eval_batch_size": 32,
    "stage.save_every": 10,
    "stage.rollout_batch_size": 8,
    "stage.generation.temperature": 1.0,
}
STAGE_VALUES = {
    "sft": {
        "data.max_length": 256,
        "stage.epochs": 16.0,
        "stage.micro_batch_size": 8,
        "stage.gradient_accumulation_steps": 2,
        "stage.eval_every": 50,
        "stage.eval_batch_size": 16,
    },
    "rm": {
        "model.name_or_path": "stage:sft",
        "optim.lr": 1e-4,
        "data.max_length": 256,
        "stage.epochs": 2.0,
        "stage.micro_batch_size": 8,
        "stage.eval_every": 25,
        "stage.eval_batch_size": 32,
    },
    "dpo": {
        "model.name_or_path": "stage:sft",
        "optim.lr": 2e-4,
        "data.max_length": 256,
        "stage.epochs": 2.0,
        "stage.micro_batch_size": 8,
        "stage.eval_every": 25,
        "stage.eval_batch_size": 16,
    },
    "ppo": {
        "model.name_or_path": "stage:sft",
        "optim.lr": 2e-5,
        "optim.schedule": "constant",
        "optim.warmup_ratio": 0.0,
        "data.max_prompt_length": 192,
        "stage.max_steps": 30,
        "stage.micro_batch_size": 8,
        "stage.gradient_accumulation_steps": 2,
        "stage.eval_every": 10,
        "stage.eval_batch_size": 32,
        "stage.save_every": 10,
        "stage.rollout_batch_size": 32,
        "stage.kl_control": "adaptive",
        "stage.kl_horizon": 64,
    },
    "rejection_sampling": {
        "model.name_or_path": "stage:sft",
        "optim.lr": 1e-4,
        "optim.schedule": "constant",
        "optim.warmup_ratio": 0.0,
        "data.max_prompt_length": 192,
        "stage.micro_batch_size": 8,
        "stage.eval_batch_size": 32,
        "stage.generation.temperature": 1.0,
    },
    "grpo": {**_ONLINE, "stage.gradient_accumulation_steps": 4},
    "rloo": {**_ONLINE, "stage.name": "rloo", "stage.advantage": "rloo", "stage.n_samples": 4, "stage.kl_coef": 0.05},
    "reinforce_pp": {
        **_ONLINE,
        "stage.name": "reinforce_pp",
        "stage.advantage": "reinforce_pp",
        "stage.n_samples": 4,
        "stage.kl_coef": 0.01,
    },
    "eval": {"model.name_or_path": "stage:sft", "data.max_prompt_length": 192},
    "distill": {k: v for k, v in _ONLINE.items() if k != "stage.rollout_batch_size"},
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_composes_to_the_schema_defaults_and_its_own_values(stage):
    composed = flat(OmegaConf.to_container(compose(stage, [])))
    defaults = schema_defaults(STAGES[stage].schema)
    assert set(composed) == set(defaults)
    assert {k: v for k, v in composed.items() if defaults[k] != v} == STAGE_VALUES[stage]


def test_the_shared_values_are_the_schema_defaults():
    """What configs/optim/adamw.yaml and configs/config.yaml used to state for every stage."""
    cfg = compose("sft", [])
    assert cfg.optim.lr == 1e-3 and cfg.optim.schedule == "cosine" and list(cfg.optim.betas) == [0.9, 0.95]
    assert (cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio, cfg.optim.weight_decay) == (0.05, 0.1, 0.0)
    assert (cfg.optim.eps, cfg.optim.max_grad_norm) == (1e-8, 1.0)
    assert cfg.logging.log_every == 10 and cfg.run.name == "demo" and cfg.seed == 42
    assert cfg.model.name_or_path == "builtin:tiny-llama" and cfg.model.tiny.hidden_size == 256
    assert cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"


EXPERIMENT_KEYS = (
    "optim.lr",
    "optim.schedule",
    "optim.warmup_ratio",
    "optim.min_lr_ratio",
    "logging.log_every",
    "stage.epochs",
    "stage.micro_batch_size",
    "stage.eval_batch_size",
    "stage.save_every",
)
# (stage, experiment) -> the values of EXPERIMENT_KEYS, most of them from the stage file or the schema underneath.
EXPERIMENTS = {
    ("sft", "dolly"): (2e-05, "cosine", 0.03, 0.0, 10, 3.0, 8, 16, 500),
    ("sft", "dolly_lora"): (0.0002, "cosine", 0.05, 0.1, 10, 2.0, 8, 16, 500),
    ("sft", "oasst"): (1e-05, "cosine", 0.05, 0.1, 10, 2.0, 4, 16, 250),
    ("rm", "hh_rlhf"): (1e-05, "cosine", 0.03, 0.1, 10, 1.0, 8, 32, 500),
    ("dpo", "hh_rlhf"): (1e-05, "cosine", 0.03, 0.1, 10, 1.0, 8, 32, 500),
    ("dpo", "dpo_hh_rlhf"): (1e-06, "cosine", 0.1, 0.0, 10, 1.0, 4, 16, 500),
    ("dpo", "dpo_ultrafeedback"): (5e-07, "cosine", 0.1, 0.0, 10, 1.0, 4, 16, 500),
    ("ppo", "ppo_hh_rlhf"): (1e-06, "constant", 0.0, 0.1, 10, 1.0, 8, 32, 25),
    ("ppo", "ppo_parity"): (0.0001, "constant", 0.0, 0.1, 10, 1.0, 8, 32, 10),
    ("ppo", "ppo_detox"): (1.4e-05, "constant", 0.0, 0.1, 10, 1.0, 8, 32, 10),
    ("rejection_sampling", "rs_parity"): (0.001, "constant", 0.0, 0.1, 10, 3.0, 8, 32, 50),
    ("rejection_sampling", "rs_hh_rlhf"): (1e-05, "constant", 0.0, 0.1, 10, 1.0, 4, 32, 100),
    **{
        (verb, "grpo_parity"): (0.0001, "constant", 0.0, 0.1, 10, 1.0, 16, 32, 10)
        for verb in ("grpo", "rloo", "reinforce_pp")
    },
    ("distill", "distill_parity"): (0.001, "constant", 0.0, 0.1, 10, 1.0, 16, 32, 10),
}


@pytest.mark.parametrize("stage,experiment", list(EXPERIMENTS))
def test_experiment_composes_to_its_values(stage, experiment):
    cfg = compose(stage, [f"+experiment={experiment}"])
    assert tuple(OmegaConf.select(cfg, key) for key in EXPERIMENT_KEYS) == EXPERIMENTS[(stage, experiment)]


def test_every_experiment_is_in_the_table():
    assert {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")} <= {e for _, e in EXPERIMENTS}


# ---------------------------------------------------------------- allowed values: the lists the code dispatches on


def _kl_controllers() -> tuple[str, ...]:
    # The KL controllers are moving from losses/ppo.py to rollout/controllers.py (DESIGN.md): either home counts.
    for module in ("rlhf_cli.rollout.controllers", "rlhf_cli.losses.ppo"):
        try:
            return importlib.import_module(module).KL_CONTROLLERS
        except (ImportError, AttributeError):
            continue
    raise AssertionError("KL_CONTROLLERS is in neither rlhf_cli.rollout.controllers nor rlhf_cli.losses.ppo")


def test_allowed_values_are_what_the_dispatching_code_accepts():
    from rlhf_cli import data
    from rlhf_cli.data import prompts, sft
    from rlhf_cli.losses import dpo, ppo

    assert set(s.DPO_LOSSES) == set(dpo.LOSSES)
    assert set(o.KL_ESTIMATORS) == set(ppo.KL_ESTIMATORS)
    assert set(o.KL_CONTROLS) == set(_kl_controllers())
    assert set(s.SFT_FORMATS) == set(data.FORMATS)
    assert set(s.PREFERENCE_FORMATS) == set(data.PREFERENCE_FORMATS)
    assert set(s.PROMPT_FORMATS) == set(data.PROMPT_FORMATS)
    assert set(s.TRUNCATIONS) == set(sft.TRUNCATION_POLICIES) >= set(prompts.PROMPT_TRUNCATION_POLICIES)
    assert set(s.BAD_ROWS) == set(sft.BAD_ROW_POLICIES)


def test_selections_are_what_the_selection_code_accepts():
    selection = pytest.importorskip("rlhf_cli.rollout.selection")
    assert set(o.SELECTIONS) == set(selection.SELECTIONS)


def test_every_dpo_loss_and_kl_estimator_dispatches():
    """Each listed value reaches its own branch (an unknown one raises)."""
    import torch

    from rlhf_cli.losses import dpo, ppo

    x = torch.tensor([-1.0, -2.0])
    for kind in s.DPO_LOSSES:
        loss = dpo.preference_loss(kind, x, x - 1, x, x - 0.5, x.abs(), x.abs(), beta=0.1, label_smoothing=0.1)
        assert torch.isfinite(loss).all()
    for estimator in o.KL_ESTIMATORS:
        assert torch.isfinite(ppo.kl_penalty(x, x - 0.1, estimator)).all()
    with pytest.raises(ValueError):
        dpo.preference_loss("dpo", x, x, x, x, x, x, beta=0.1)


def test_every_schedule_has_its_own_curve():
    """engine.lr_schedule falls back to cosine for a word it does not know: each listed schedule must differ."""
    import torch

    from rlhf_cli.engine import lr_schedule

    curves = set()
    for schedule in s.SCHEDULES:
        optim = OmegaConf.structured(s.OptimConfig(schedule=schedule, warmup_ratio=0.0))
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = lr_schedule(optim, total_steps=10)(opt)
        curve = []
        for _ in range(10):
            curve.append(round(sched.get_last_lr()[0], 6))
            opt.step()
            sched.step()
        curves.add(tuple(curve))
    assert len(curves) == len(s.SCHEDULES)
