"""Numeric config keys with a known range, and the check that refuses a value outside it before anything is built."""

from __future__ import annotations

import dataclasses
import math
import operator
import re

from omegaconf import DictConfig, OmegaConf

from rlhf_cli.config import schema as s
from rlhf_cli.errors import UserError
from rlhf_cli.registry import STAGES


def data_keys(table: dict, groups: tuple[str, ...]) -> dict:
    """`table`'s keys (relative to a data group) as full keys under each of `groups`."""
    return {f"{group}.{key}": rule for group in groups for key, rule in table.items()}


# Numeric keys with a known range, key -> range: `> 0`, `>= 1`, `== 0`, `[0, 1)` (brackets include the end, parens
# exclude it), `finite`; a bound may be another config key. `or null` marks a key that may be null (the schema's
# `X | None` decides; the words are for the message). A list is checked item by item. Keys a stage's schema lacks
# are skipped, so one table serves every stage; a stage's registry entry adds or overrides keys (StageSpec.ranges),
# as it does for choices. Every value must also be finite. An entry may be (range, why) to explain the rule.
_DATA_RANGES = {
    "eval_fraction": "[0, 1)",
    "max_samples": ">= 1 or null",
    "max_length": ">= 1",
    "max_prompt_length": ">= 1",
    "min_response_tokens": ">= 1",
    "shp_min_score_ratio": ">= 0",
}
_TRAIN_RANGES = {
    "epochs": "> 0",
    "max_steps": ">= 1 or null",
    "micro_batch_size": ">= 1",
    "gradient_accumulation_steps": ">= 1",
    "eval_every": ">= 0",
    "eval_batch_size": ">= 1",
    "save_every": ">= 0",
    "keep_last": ">= 1",
    "stop_after_steps": ">= 1 or null",
}
_RANGES: dict[str, str | tuple[str, str]] = {
    "seed": ">= 0",
    "optim.lr": "> 0",
    "optim.betas": "[0, 1)",
    "optim.eps": "> 0",
    "optim.weight_decay": ">= 0",
    "optim.warmup_ratio": "[0, 1]",
    "optim.warmup_steps": ">= 0 or null",
    "optim.min_lr_ratio": "[0, 1]",
    "optim.max_grad_norm": "> 0",  # the schema has no null here: clipping is always on
    "model.lora.r": ">= 1",
    "model.lora.alpha": "> 0",
    "model.lora.dropout": "[0, 1)",
    **{f"model.tiny.{f.name}": ">= 1" for f in dataclasses.fields(s.TinyModelConfig)},
    **data_keys(_DATA_RANGES, ("data",)),
    **{f"stage.{key}": spec for key, spec in _TRAIN_RANGES.items()},
    "logging.log_every": ">= 1",
    "launcher.nproc_per_node": ">= 1",
    "launcher.nnodes": ">= 1",
    "launcher.node_rank": "[0, launcher.nnodes)",
    "launcher.master_port": "[1, 65535]",
}


def stage_ranges(stage: str) -> dict[str, str | tuple[str, str]]:
    """Every range checked for `stage`: the common table, the data ranges of its nested data groups, its own."""
    spec = STAGES[stage]
    return {**_RANGES, **data_keys(_DATA_RANGES, spec.nested_data), **spec.ranges}


# Lists whose length is fixed.
_LENGTHS = {"optim.betas": 2}
_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq}
_INTERVAL = re.compile(r"([\[(])(\S+), (\S+)([\])])")


def range_bounds(spec: str) -> tuple[tuple[str, str], ...]:
    """A range as (comparison, bound) pairs: `[0, 1)` -> ((">=", "0"), ("<", "1")); `finite` -> ()."""
    spec = spec.removesuffix(" or null")
    interval = _INTERVAL.fullmatch(spec)
    if interval:
        low, a, b, high = interval.groups()
        return ((">=" if low == "[" else ">", a), ("<=" if high == "]" else "<", b))
    if spec == "finite":
        return ()
    op, _, bound = spec.partition(" ")
    if op not in _COMPARE or not bound:
        raise ValueError(f"bad range {spec!r}")
    return ((op, bound),)


def _in_range(cfg: DictConfig, value: float, spec: str) -> bool:
    if not math.isfinite(value):
        return False
    for op, bound in range_bounds(spec):
        limit = OmegaConf.select(cfg, bound) if bound[0].isalpha() else float(bound)
        if not _COMPARE[op](value, limit):
            return False
    return True


def _range_error(cfg: DictConfig, key: str, value: float, spec: str, why: str) -> UserError:
    need = "in " + spec if _INTERVAL.match(spec) else spec.removeprefix("== ")
    if spec.startswith("finite"):
        need = "a finite number" + spec.removeprefix("finite")
    elif not math.isfinite(value):
        need = f"a finite number {need}"
    refs = [f"{bound} is {OmegaConf.select(cfg, bound)}" for _, bound in range_bounds(spec) if bound[0].isalpha()]
    given = f" ({', '.join(refs)})" if refs else ""
    return UserError(f"config key `{key}` is {value}, must be {need}{given}{why}")


def check_ranges(cfg: DictConfig, stage: str | None = None) -> None:
    """Refuse numbers out of their range (table above) before anything is built: a negative learning rate
    otherwise ends in a traceback from the optimizer, and a DPO beta of 0 trains on a constant loss."""
    stage = stage or cfg.stage.name
    for key, rule in stage_ranges(stage).items():
        spec, why = (rule, None) if isinstance(rule, str) else rule
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if key in _LENGTHS and len(value) != _LENGTHS[key]:
            raise UserError(
                f"config key `{key}` has {len(value)} value(s) {list(value)}, must have exactly {_LENGTHS[key]}"
            )
        items = enumerate(value) if OmegaConf.is_list(value) else [(None, value)]
        for i, item in items:
            if not _in_range(cfg, item, spec):
                because = f" for `rlhf {stage}`: {why}" if why else ""
                raise _range_error(cfg, key if i is None else f"{key}[{i}]", item, spec, because)
