"""Shared pieces of the tool commands (`rlhf generate`, `rlhf score`): key=value arguments into a dataclass, with
the same clear errors as the stage configs, and the checkpoint named by `model=` or by `run.name=` + `stage=`."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TypeVar

from rlhf_cli.config.schema import RunConfig
from rlhf_cli.errors import UserError

T = TypeVar("T")
# The run a tool reads when none is named: the stages' own default (`rlhf sft` writes runs/demo/), so that
# `rlhf sft` then `rlhf generate prompt=...` meet in one run.
DEFAULT_RUN = RunConfig.name


def parse_key_values(args: list[str], schema: type[T], example: str) -> T:
    """`key=value` strings into an instance of the dataclass `schema`.

    A value's type is that of the field's default (int or float, else str; a None default means str).
    Unknown keys get the closest known one; `example` (e.g. `prompt="Hello"`) shows the expected form.
    The fields `run` and `root` are spelled `run.name` and `run.root` as in the stages; both spellings work.
    A tool that reads a run or a `model=` (both fields) reads `model=` alone when it is given: the run's default
    (DEFAULT_RUN) then does not apply, and naming both is an error.
    """
    from rlhf_cli.config.compose import RUN_ALIASES

    spelled = {RUN_ALIASES.get(f.name, f.name): f for f in fields(schema)}  # documented spelling -> field
    known = {**{f.name: f for f in fields(schema)}, **spelled}
    values: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"expected key=value, got `{arg}` (e.g. {example}; `--help` lists the arguments)")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise UserError(f"unknown argument `{key}`{hint} (arguments: {', '.join(spelled)})")
        values[known[key].name] = _convert(key, value, known[key].default)
    if "model" in values and "run" in {f.name for f in fields(schema)}:
        if "run" in values:
            raise UserError("give one of run.name=<name> or model=<path or hub id>, not both")
        values["run"] = None
    return schema(**values)


def _convert(key: str, value: str, default: Any) -> Any:
    kind = type(default) if default is not MISSING and default is not None else str
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise UserError(f"argument `{key}` must be {kind.__name__}, got `{value}`") from None
    return value


def resolve_checkpoint(model: str | None, run: str | None, root: str, stage: str | Callable[[Any], str]) -> str:
    """`model` as given (a folder or hub id), or the final/ of `stage` in the run directory `<root>/<run>`. `stage`
    may be a function of the run (a `Run`) that picks the stage (generate: the newest completed policy stage)."""
    if (run is None) == (model is None):
        raise UserError("give exactly one of run.name=<name> (with stage=<stage>) or model=<path or hub id>")
    if model is not None:
        return model
    from rlhf_cli.files import check_run_name
    from rlhf_cli.run_dir import Run

    check_run_name(run, "argument `run.name`")
    if not callable(stage):
        check_run_name(stage, "argument `stage`")
    handle = Run(root=Path(root) / run, stage="")
    if not handle.root.is_dir():
        raise UserError(
            f"no run directory {handle.root}; check run.name= and run.root= (runs are listed under {root}/)"
        )
    return str(handle.stage_output(stage(handle) if callable(stage) else stage))


# Architecture names (config.json) and PEFT task types (adapter_config.json) -> what the checkpoint is.
_KINDS = (("ForSequenceClassification", "classifier"), ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"))
_PEFT_KINDS = {"SEQ_CLS": "classifier", "CAUSAL_LM": "causal-lm"}


def model_kind(name: str) -> tuple[str, str] | None:
    """("causal-lm" or "classifier", the architecture) of a checkpoint, read from its config.json (a LoRA adapter
    folder: the task type in adapter_config.json) before any weight is loaded; None when it cannot be told (the
    loader then reports whatever is wrong). A hub id is checked through its config alone."""
    from rlhf_cli.models.kind import read_json_table
    from rlhf_cli.models.source import resolve_source

    source, local = resolve_source(name)
    info = read_json_table(Path(source) / "config.json") if local else _hub_config(source)
    for arch in info.get("architectures") or []:
        for suffix, kind in _KINDS:
            if arch.endswith(suffix):
                return kind, arch
    task = read_json_table(Path(source) / "adapter_config.json").get("task_type") if local else None
    return (_PEFT_KINDS[task], f"a {task} LoRA adapter") if task in _PEFT_KINDS else None


def _hub_config(name: str) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError, KeyError):  # not fetchable, custom code, unknown model type: the loader says
        return {}
