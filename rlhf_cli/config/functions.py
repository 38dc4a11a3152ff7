"""Reward and gold-metric names, read without importing torch or the hub client: a `module:function` or a model
source. Checked when the config is composed (the registry's cross-key checks, rlhf_cli/registry.py), so a misspelt
module is refused before any model loads; the function itself is imported by the stage (rollout/rewards.py
`load_function`), a model source is checked by models/kind.py `check_reward_sources`."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from rlhf_cli.errors import UserError


def is_model_source(spec: str) -> bool:
    """A reward *model* (`stage:<name>`, a folder, a hub id `org/name`) rather than a `module:function`."""
    return spec.startswith("stage:") or "/" in spec or os.path.isdir(os.path.expanduser(spec))


def split_function(spec: str, key: str) -> tuple[str, str]:
    """(module, function) of `module:function`; UserError naming `key` otherwise."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"{key}=`{spec}`: expected `module:function`, e.g. rlhf_cli.tasks.word_order:gold_reward")
    return module_name, name


def cannot_import(spec: str, key: str, module_name: str, err: BaseException) -> UserError:
    return UserError(
        f"{key}=`{spec}`: cannot import `{module_name}` ({err}); the module must be importable from the "
        "current directory or the Python path"
    )


def importable_path() -> None:
    """Put the current directory on sys.path: the `rlhf` console script does not, and users' functions live there."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def check_function_spec(spec: str, key: str) -> None:
    """`module:function` well formed and its module found (not executed: a parent package is imported at most)."""
    module_name, _ = split_function(spec, key)
    importable_path()
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as err:
        raise cannot_import(spec, key, module_name, err) from None
    if found is None:
        raise cannot_import(spec, key, module_name, ModuleNotFoundError(f"No module named '{module_name}'"))


def function_specs(st: Any) -> list[tuple[str, str]]:
    """(spec, key) of every Python function an online stage's config names: the reward and the gold metric."""
    out = []
    reward = getattr(st, "reward", None)
    if reward is not None:
        out += [(f.fn, "stage.reward.functions") for f in getattr(reward, "functions", None) or []]
        if getattr(reward, "function", None):
            out.append((reward.function, "stage.reward.function"))
    for key in ("gold_reward", "gold"):  # the training stages' gold metric, and `rlhf eval`'s
        gold = getattr(st, key, None)
        if gold and not is_model_source(gold):
            out.append((gold, f"stage.{key}"))
    return out
