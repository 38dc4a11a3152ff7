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

from rlhf_cli.config import schema as s
from rlhf_cli.config.ranges import check_ranges, data_keys, range_bounds, stage_ranges  # noqa: F401 (read from here)
from rlhf_cli.errors import UserError
from rlhf_cli.files import check_run_name
from rlhf_cli.registry import STAGES


def config_dir() -> Path:
    """The configs folder: inside the installed wheel, else the repository's top-level configs/."""
    packaged = Path(str(resources.files("rlhf_cli"))) / "configs"
    if (packaged / "config.yaml").is_file():
        return packaged
    repo = Path(__file__).resolve().parents[2] / "configs"
    if (repo / "config.yaml").is_file():
        return repo
    raise UserError("cannot find the configs folder (config.yaml); reinstall the package with `make install`")


# Folders under configs/ that are not config groups of a stage: pipeline/ holds `rlhf pipeline`'s stage lists.
NOT_GROUPS = ("pipeline",)


def _groups(cfg_dir: Path) -> set[str]:
    return {p.name for p in cfg_dir.iterdir() if p.is_dir() and p.name not in NOT_GROUPS}


# The tools' spelling of the run keys -> the stages' (`rlhf generate run=x`, `rlhf sft run.name=x`): each command
# accepts both. `run=x` is never a valid stage override (run is a group of keys), and no stage schema has a top-level
# `root` (tests/integration/test_cli_help.py checks it), so neither alias can shadow a real key.
RUN_ALIASES = {"run": "run.name", "root": "run.root"}


def check_group_choices(overrides: list[str], cfg_dir: Path) -> None:
    """A group choice (`model=x`, `+experiment=x`) that names no file under configs/<group>/ is refused with the
    closest one, as a key typo is: Hydra's own message lists the files but suggests none. `null` is refused too (Hydra
    raises a bare ValueError on it). A value that is not a plain name (a list, a nested path) is left to Hydra."""
    groups = _groups(cfg_dir)
    for ov in overrides:
        key, sep, value = ov.partition("=")
        group = key.lstrip("+")
        if not sep or group not in groups or not re.fullmatch(r"[\w.-]+", value):
            continue
        choices = sorted(p.stem for p in (cfg_dir / group).glob("*.yaml"))
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f"; did you mean `{key}={close[0]}`?" if close else ""
            raise UserError(
                f"unknown choice `{value}` for config group `{group}`{hint} (choices under "
                f"{cfg_dir / group}/: {', '.join(choices)})"
            )


def _as_forced(overrides: list[str], groups: set[str]) -> list[str]:
    """Turn plain `a.b=v` overrides into `++a.b=v` so a key that the schema has but the chosen YAML
    leaves out (say `model.lora.r` with a hub model file) can still be set; the schema check that
    follows rejects keys that exist nowhere. Group choices (`model=x`, `+experiment=y`) stay as given.
    `run=x` / `root=r` become `run.name=x` / `run.root=r` (RUN_ALIASES)."""
    out = []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if sep and key in RUN_ALIASES and not value.startswith("{"):  # `run={name: x}` is Hydra's own dict syntax
            key, ov = RUN_ALIASES[key], f"{RUN_ALIASES[key]}={value}"
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


def locate_key(key: str, cfg_dir: Path, overrides: list[str], stage: str | None = None) -> str:
    """Where a bad key was set: the command line, or `file:line` of the first YAML of this composition that sets it
    (the experiments named, the groups chosen on the command line, the stage's file, then config.yaml's defaults)."""
    if any(ov.lstrip("+~").split("=", 1)[0] == key for ov in overrides):
        return "on the command line"
    leaf = key.rsplit(".", 1)[-1]
    pattern = re.compile(rf"^\s*{re.escape(leaf)}\s*:")
    for path in _composed_files(cfg_dir, overrides, stage):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.match(line):
                return f"in {path}:{lineno}"
    return "in the composed config"


def _composed_files(cfg_dir: Path, overrides: list[str], stage: str | None) -> list[Path]:
    """The YAML files a composition read, the later-merged (stronger) first: experiments, groups chosen on the command
    line, the stage's file, config.yaml's default groups and config.yaml itself; without `stage`, every file."""
    if stage is None:
        return sorted(cfg_dir.rglob("*.yaml"))
    chosen = dict(ov.lstrip("+").split("=", 1) for ov in overrides if "=" in ov and "." not in ov.split("=", 1)[0])
    files = [cfg_dir / "experiment" / f"{chosen['experiment']}.yaml"] if "experiment" in chosen else []
    files += [cfg_dir / group / f"{choice}.yaml" for group, choice in chosen.items() if group != "experiment"]
    files.append(cfg_dir / "stage" / f"{stage}.yaml")
    defaults = OmegaConf.to_container(OmegaConf.load(cfg_dir / "config.yaml")).get("defaults", [])
    files += [cfg_dir / g / f"{c}.yaml" for d in defaults if isinstance(d, dict) for g, c in d.items() if g != "stage"]
    return [f for f in files if f.is_file()] + [cfg_dir / "config.yaml"]


def _schema_error(err: OmegaConfBaseException, schema: type, where: str) -> UserError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if "not in" in msg:
        close = difflib.get_close_matches(key, _valid_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        return UserError(f"unknown config key `{key}`{hint} (set {where}; `rlhf <stage> --cfg job` lists the keys)")
    return UserError(f"bad value for config key `{key}` (set {where}): {msg}")


_GRAMMAR_NOISE = ("See https://hydra.cc", "Error parsing override")
_LEXER_PREFIX = "LexerNoViableAltException: "


def check_override_syntax(overrides: list[str]) -> None:
    """Parse each override on its own, so a grammar error names the override it is in: Hydra's message for the
    whole list can say only "no viable alternative at input '[1,'"."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for ov in overrides:
        try:
            parsed = parser.parse_overrides([ov])[0]
        except OverrideParseException as err:
            raise UserError(
                f"cannot parse the override `{ov}`: {_grammar_problem(err.message, ov)} (quote a value with special "
                "characters, e.g. 'data.system_prompt=\"Be brief, please.\"'; "
                "https://hydra.cc/docs/advanced/override_grammar/basic)"
            ) from None
        if not parsed.key_or_group:
            raise UserError(f"cannot parse the override `{ov}`: no key before `=` (overrides are key=value)")


def _grammar_problem(message: str, override: str) -> str:
    """Hydra's parse error in one line: a lexer error points at a character with a caret on a second line."""
    lines = [ln for ln in message.splitlines() if ln.strip() and not ln.startswith(_GRAMMAR_NOISE)]
    if len(lines) == 2 and lines[0].startswith(_LEXER_PREFIX):
        pos = len(lines[1]) - 1 - len(_LEXER_PREFIX)  # the caret sits under the override after the prefix
        if 0 <= pos < len(override):
            return f"unexpected `{override[pos]}` at character {pos + 1}"
    return "; ".join(lines) or message


def compose(stage: str, overrides: list[str]) -> DictConfig:
    """Compose `config.yaml` for `stage` with Hydra-style `overrides`; returns the validated, typed config
    (a DictConfig backed by the stage's dataclass: unknown keys and wrong types are errors)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    if stage not in STAGES:
        raise UserError(f"unknown stage `{stage}`; stages: {', '.join(STAGES)}")
    cfg_dir = config_dir()
    check_override_syntax(overrides)
    check_group_choices(overrides, cfg_dir)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(cfg_dir), version_base=None):
            raw = hydra_compose("config", overrides=[f"stage={stage}"] + _as_forced(overrides, _groups(cfg_dir)))
    except (HydraException, OmegaConfBaseException) as err:
        text = str(err).split("\nConfig search path")[0].strip()
        raise UserError(f"cannot compose the config: {text}") from None
    finally:
        GlobalHydra.instance().clear()
    return validate(stage, raw, lambda key: locate_key(key, cfg_dir, overrides, stage))


def validate(stage: str, raw: DictConfig | dict, where: Any = lambda key: "in the config") -> DictConfig:
    """Merge `raw` onto the stage's schema; the result is read-only so every rank sees the same config.
    `where(key)` says where a bad key was set, for the message."""
    schema = STAGES[stage].schema
    try:
        # The verb names the stage (grpo / rloo / reinforce_pp share one schema, whose default name is one of them).
        typed = OmegaConf.merge(OmegaConf.structured(schema), {"stage": {"name": stage}}, raw)
    except OmegaConfBaseException as err:
        raise _schema_error(err, schema, where(getattr(err, "full_key", "") or "")) from None
    if typed.stage.name != stage:  # the verb picks the stage: another name would check and run a different one
        raise UserError(
            f"config key `stage.name` is {typed.stage.name!r}, must be {stage!r}: the command chooses the stage "
            "(`rlhf <stage>`)"
        )
    check_choices(typed, stage)
    check_ranges(typed, stage)
    check_run_name(typed.run.name, "config key `run.name`")
    if STAGES[stage].check is not None:  # rules across keys, before anything runs (a pipeline checks every stage)
        STAGES[stage].check(typed)
    OmegaConf.set_readonly(typed, True)
    return typed


# Keys whose value must be one of a few words: checked here so a typo fails before any model is built. The stage's own
# keys and its data formats come from its registry entry (rlhf_cli/registry.py); the lists from the schema.
_CHOICES: dict[str, tuple] = {
    "optim.schedule": s.SCHEDULES,
    "deepspeed.precision": s.PRECISIONS,
    "deepspeed.zero_stage": s.ZERO_STAGES,
    "logging.wandb_mode": s.WANDB_MODES,
}
# The same for every data group: `data` and a stage's nested ones (StageSpec.nested_data), relative to the group.
_DATA_CHOICES: dict[str, tuple] = {"truncation": s.TRUNCATIONS, "bad_rows": s.BAD_ROWS}


def check_choices(cfg: DictConfig, stage: str | None = None) -> None:
    spec = STAGES[stage or cfg.stage.name]
    formats = {"data.format": spec.formats} if spec.formats else {}
    data = data_keys(_DATA_CHOICES, ("data", *spec.nested_data))
    for key, rule in {**_CHOICES, **data, **formats, **spec.choices}.items():
        allowed, why = rule if isinstance(rule[0], tuple) else (rule, None)
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            because = f" for `rlhf {spec.name}`: {why}" if why else ""
            raise UserError(f"config key `{key}` is {value!r}, must be one of {list(allowed)}{hint}{because}")
    for key, (other, value) in spec.required_when.items():
        if OmegaConf.select(cfg, other) == value and OmegaConf.select(cfg, key) is None:
            raise UserError(
                f"config key `{other}` is {value!r}, which needs `{key}`, but `{key}` is null: set {key}=<value> "
                f"or choose another {other}"
            )
    lora = OmegaConf.select(cfg, "model.lora")
    if lora is not None and lora.enabled and lora.merge and cfg.deepspeed.zero_stage == 3:
        # Merging needs the whole base weight next to the adapters; LoRA's trainable state is small, so
        # ZeRO-2 loses little. (Gathered merge under ZeRO-3 is future work.)
        raise UserError(
            "model.lora.merge=true is not supported with deepspeed.zero_stage=3; use deepspeed=zero2 "
            "or model.lora.merge=false (final/ then holds the adapters only)"
        )
    if OmegaConf.select(cfg, "data.share_prompt") is True and OmegaConf.select(cfg, "data.packing") is False:
        raise UserError(
            "config key `data.share_prompt` is true, which needs packed pairs, but `data.packing` is false: set "
            "data.packing=true (or leave it unset) or data.share_prompt=false"
        )


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg: DictConfig, location: bool = True) -> str:
    """Hash of the resolved config, less the keys that do not change what a stage computes. `location=False` leaves
    out where the run directory is (run.root, run.name) too: a provenance survives a run directory moved or copied."""
    data: Any = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in data.items() if k not in ("logging", "launcher")}
    skip = ("overwrite", "allow_stale_inputs") if location else ("overwrite", "allow_stale_inputs", "root", "name")
    data["run"] = {k: v for k, v in data["run"].items() if k not in skip}
    data["stage"] = {k: v for k, v in data["stage"].items() if k != "stop_after_steps"}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
