"""Compose the YAML under configs/ with Hydra and validate it against the stage's dataclass schema.

Why not `@hydra.main`: it owns argv, changes the working directory and prints its own tracebacks; the
compose API gives the same composition (defaults lists, groups, `+experiment=...`, overrides) under our
control, so every mistake becomes one `UserError` naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhf_cli.config.schema import STAGE_SCHEMAS
from rlhf_cli.errors import UserError


def config_dir() -> Path:
    """The configs folder: inside the installed wheel, else the repository's top-level configs/."""
    packaged = Path(str(resources.files("rlhf_cli"))) / "configs"
    if (packaged / "config.yaml").is_file():
        return packaged
    repo = Path(__file__).resolve().parents[2] / "configs"
    if (repo / "config.yaml").is_file():
        return repo
    raise UserError("cannot find the configs folder (config.yaml); reinstall the package with `make install`")


def _groups(cfg_dir: Path) -> set[str]:
    return {p.name for p in cfg_dir.iterdir() if p.is_dir()}


def _as_forced(overrides: list[str], groups: set[str]) -> list[str]:
    """Turn plain `a.b=v` overrides into `++a.b=v` so a key that the schema has but the chosen YAML
    leaves out (say `model.lora.r` with a hub model file) can still be set; the schema check that
    follows rejects keys that exist nowhere. Group choices (`model=x`, `+experiment=y`) stay as given."""
    out = []
    for ov in overrides:
        key = ov.split("=", 1)[0]
        if "=" not in ov or key.startswith(("+", "~")) or key in groups:
            out.append(ov)
        else:
            out.append("++" + ov)
    return out


def _valid_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        full = f"{prefix}{f.name}"
        keys.append(full)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += _valid_keys(type(default), full + ".")
    return keys


def locate_key(key: str, cfg_dir: Path, overrides: list[str]) -> str:
    """Where a bad key was set: the command line, or `file:line` of a YAML under configs/."""
    if any(ov.lstrip("+~").split("=", 1)[0] == key for ov in overrides):
        return "on the command line"
    leaf = key.rsplit(".", 1)[-1]
    pattern = re.compile(rf"^\s*{re.escape(leaf)}\s*:")
    for path in sorted(cfg_dir.rglob("*.yaml")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.match(line):
                return f"in {path}:{lineno}"
    return "in the composed config"


def _schema_error(err: OmegaConfBaseException, schema: type, where: str) -> UserError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if "not in" in msg:
        close = difflib.get_close_matches(key, _valid_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        return UserError(f"unknown config key `{key}`{hint} (set {where}; `rlhf <stage> --cfg job` lists the keys)")
    return UserError(f"bad value for config key `{key}` (set {where}): {msg}")


def compose(stage: str, overrides: list[str]) -> DictConfig:
    """Compose `config.yaml` for `stage` with Hydra-style `overrides`; returns the validated, typed config
    (a DictConfig backed by the stage's dataclass: unknown keys and wrong types are errors)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    if stage not in STAGE_SCHEMAS:
        raise UserError(f"unknown stage `{stage}`; stages: {', '.join(STAGE_SCHEMAS)}")
    cfg_dir = config_dir()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(cfg_dir), version_base=None):
            raw = hydra_compose("config", overrides=[f"stage={stage}"] + _as_forced(overrides, _groups(cfg_dir)))
    except (HydraException, OmegaConfBaseException) as err:
        text = str(err).split("\nConfig search path")[0].strip()
        raise UserError(f"cannot compose the config: {text}") from None
    finally:
        GlobalHydra.instance().clear()
    return validate(stage, raw, lambda key: locate_key(key, cfg_dir, overrides))


def validate(stage: str, raw: DictConfig | dict, where: Any = lambda key: "in the config") -> DictConfig:
    """Merge `raw` onto the stage's schema; the result is read-only so every rank sees the same config.
    `where(key)` says where a bad key was set, for the message."""
    schema = STAGE_SCHEMAS[stage]
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), raw)
    except OmegaConfBaseException as err:
        raise _schema_error(err, schema, where(getattr(err, "full_key", "") or "")) from None
    check_choices(typed)
    OmegaConf.set_readonly(typed, True)
    return typed


# Keys whose value must be one of a few words: checked here so a typo fails before any model is built.
_CHOICES: dict[str, tuple] = {
    "data.truncation": ("drop", "truncate_response", "truncate_prompt"),
    "data.bad_rows": ("skip", "fail"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "deepspeed.precision": ("fp32", "bf16", "fp16"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
}
_FORMATS = {
    "sft": ("dolly", "alpaca", "oasst1", "jsonl"),
    "rm": ("hh_rlhf", "shp", "ultrafeedback", "jsonl"),
    "dpo": ("hh_rlhf", "shp", "ultrafeedback", "jsonl"),
    "ppo": ("jsonl", "dolly", "alpaca", "hh_rlhf", "shp", "ultrafeedback"),
}
_STAGE_CHOICES = {
    "dpo": {"stage.loss": ("sigmoid", "cdpo", "robust", "hinge", "ipo", "rpo", "simpo", "orpo")},
    "ppo": {
        "stage.kl_estimator": ("k1", "k2", "k3"),
        "stage.kl_control": ("fixed", "adaptive"),
        "stage.reward.reduce": ("logit", "prob"),
        "stage.reward.normalize": ("none", "rm_stats", "running"),
        "stage.critic.init": ("reward", "policy"),
        "stage.ptx.data.format": ("dolly", "alpaca", "oasst1", "jsonl"),
    },
}


def check_choices(cfg: DictConfig) -> None:
    choices = {**_CHOICES, "data.format": _FORMATS[cfg.stage.name], **_STAGE_CHOICES.get(cfg.stage.name, {})}
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise UserError(f"config key `{key}` is {value!r}, must be one of {list(allowed)}{hint}")
    lora = OmegaConf.select(cfg, "model.lora")
    if lora is not None and lora.enabled and lora.merge and cfg.deepspeed.zero_stage == 3:
        # Merging needs the whole base weight next to the adapters; LoRA's trainable state is small, so
        # ZeRO-2 loses little. (Gathered merge under ZeRO-3 is future work.)
        raise UserError(
            "model.lora.merge=true is not supported with deepspeed.zero_stage=3; use deepspeed=zero2 "
            "or model.lora.merge=false (final/ then holds the adapters only)"
        )
    positive = ("stage.micro_batch_size", "stage.gradient_accumulation_steps", "data.max_length",
                "data.max_prompt_length", "stage.rollout_batch_size", "stage.ppo_epochs",
                "stage.generation.max_new_tokens")  # fmt: skip
    for key in positive:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise UserError(f"config key `{key}` must be >= 1, got {value}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config, less the keys that do not change what a stage computes."""
    data: Any = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in data.items() if k not in ("logging", "launcher")}
    data["run"] = {k: v for k, v in data["run"].items() if k != "overwrite"}
    data["stage"] = {k: v for k, v in data["stage"].items() if k != "stop_after_steps"}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
