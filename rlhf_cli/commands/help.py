"""`rlhf <command> --help`: the help of a stage or a tool, generated from what the command really reads.

A stage's help lists its config groups with the choices under configs/ that validate for it, and its most used keys
with their composed defaults and the comment that documents each field in rlhf_cli/config/schema.py; a tool's help
lists the fields of its arguments dataclass the same way. Nothing is written twice by hand, so the help cannot drift
from the schema or the YAML. Every line fits 80 columns.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
from pathlib import Path
from typing import Any

WIDTH = 80
# The keys every stage's help shows before the stage's own `stage.*` fields: the ones a first run changes.
COMMON_KEYS = (
    "run.name",
    "model.name_or_path",
    "data.source",
    "data.format",
    "optim.lr",
    "deepspeed.zero_stage",
    "launcher.nproc_per_node",
)
_PRAGMAS = ("fmt:", "noqa", "type:")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment that documents it in the class source (the comment lines right above the field,
    then the one at the end of its line). A field inherited from a base class keeps the base's comment."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_comments(klass))
    return out


def _own_comments(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source shipped (a byte-code-only install): the help goes without comments
        return {}
    lines = source.splitlines()
    # Comments by line number, from the tokenizer so that a `#` inside a string is not one.
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    comments = {n: text for n, text in comments.items() if text and not text.startswith(_PRAGMAS)}
    out = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above, n = [], node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        inline = [comments[node.lineno]] if node.lineno in comments else []
        text = " ".join(above + inline)
        if text:
            out[node.target.id] = text
    return out


def field_owner(schema: type, key: str) -> tuple[type, dataclasses.Field]:
    """(the dataclass that declares the last part of the dotted `key`, that field)."""
    cls: Any = schema
    *parents, leaf = key.split(".")
    for name in parents:
        cls = type(_default(_field(cls, name)))
    return cls, _field(cls, leaf)


def _field(cls: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _wrap(text: str, indent: int) -> list[str]:
    pad = " " * indent
    return textwrap.wrap(text, WIDTH, initial_indent=pad, subsequent_indent=pad, break_on_hyphens=False)


def _usage(text: str) -> list[str]:
    return textwrap.wrap("usage: " + text, WIDTH, subsequent_indent=" " * 6, break_on_hyphens=False)


def key_entry(key: str, value: str, comment: str) -> list[str]:
    """`  key=value`, then the comment wrapped below it."""
    return [*_wrap(f"{key}={value}", 2), *_wrap(comment, 6)]


def paragraphs(doc: str) -> list[str]:
    """A docstring's paragraphs, each on one line (to be wrapped to the help's width)."""
    return [" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n") if p.strip()]


def alias_note(key: str) -> str:
    from rlhf_cli.config.compose import RUN_ALIASES

    other = {spelled: alias for alias, spelled in RUN_ALIASES.items()}.get(key)
    return f" (`{other}=` is accepted too)" if other else ""


# ---------------------------------------------------------------- tools


def tool_help(verb: str, module: Any, examples: tuple[str, ...]) -> str:
    """Usage (the backticked start of the module docstring), its description, the arguments dataclass `module.ARGS`
    (when the tool has one) with defaults and comments, the examples."""
    from rlhf_cli.config.compose import RUN_ALIASES

    first, *more = paragraphs(module.__doc__ or f"`rlhf {verb}`")
    usage, _, summary = first.partition("`: ")
    lines = [*_usage(usage.strip("`")), ""]
    for text in (summary[:1].upper() + summary[1:], *more):
        lines += [*_wrap(text, 0), ""]
    schema = getattr(module, "ARGS", None)
    if schema is not None:
        lines.append("Arguments (key=value; the default after `=`):")
        comments = field_comments(schema)
        for f in dataclasses.fields(schema):
            key = RUN_ALIASES.get(f.name, f.name)
            value = "" if f.default is None else str(f.default)
            lines += key_entry(key, value, comments.get(f.name, "") + alias_note(key))
        lines.append("")
    lines += ["Examples:", *(line for ex in examples for line in _wrap(ex, 2))]
    return "\n".join(lines)


# ---------------------------------------------------------------- stages


def stage_help(stage: str, overrides: list[str]) -> str:
    from omegaconf import OmegaConf

    from rlhf_cli.config.compose import compose, config_dir
    from rlhf_cli.registry import STAGES

    cfg_dir = config_dir()
    cfg = compose(stage, overrides)
    lines = _usage(f"rlhf {stage} [group=choice | +experiment=<name> | key=value ...] [--cfg job]")
    lines += ["", *_yaml_comment(cfg_dir / "stage" / f"{stage}.yaml"), ""]
    lines += ["Config groups (group=choice picks configs/<group>/<choice>.yaml; * = default):"]
    for group, choices in group_choices(stage, cfg_dir).items():
        lines += _wrap_choices(group, choices)
    values = "their values with the overrides given" if overrides else "their defaults"
    lines += ["", f"Most used keys, with {values} (key=value sets one):"]
    schema = STAGES[stage].schema
    for key in [*COMMON_KEYS, *stage_keys(schema)]:
        cls, f = field_owner(schema, key)
        if dataclasses.is_dataclass(_default(f)):  # a nested group: its keys, and its docstring's first paragraph
            keys = ", ".join(g.name for g in dataclasses.fields(type(_default(f))))
            doc = paragraphs(inspect.getdoc(type(_default(f))) or "")
            names = textwrap.wrap(f"{key}.{{{keys}}}", WIDTH, initial_indent="  ", subsequent_indent="    ")
            lines += [*names, *_wrap(doc[0] if doc else "", 6)]
            continue
        lines += key_entry(
            key, _yaml_value(OmegaConf.select(cfg, key)), field_comments(cls).get(f.name, "") + alias_note(key)
        )
    lines += ["", "Example:", *_wrap(STAGES[stage].example, 2), ""]
    lines.append(f"`rlhf {stage} --cfg job` prints every key.")
    return "\n".join(lines)


def _yaml_value(value: Any) -> str:
    """A value as it is typed on the command line: null, true, 0.001, [0.9, 0.95]."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return json.dumps(value) if value is None or isinstance(value, bool | list | dict) else str(value)


def stage_keys(schema: type) -> list[str]:
    """The stage group's own fields, in schema order (`stage.name` is the verb itself)."""
    stage_cls = type(_default(_field(schema, "stage")))
    return [f"stage.{f.name}" for f in dataclasses.fields(stage_cls) if f.name != "name"]


def _yaml_comment(path: Path) -> list[str]:
    """The leading comment of a YAML file (its description), rewrapped; Hydra's `@package` line left out."""
    text = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            text.append(line.lstrip("#").strip())
    return _wrap(" ".join(text), 0)


def _wrap_choices(group: str, choices: list[str]) -> list[str]:
    label = f"  {group:<13}"
    wrapped = textwrap.wrap(", ".join(choices), WIDTH - len(label), break_on_hyphens=False) or ["(none)"]
    return [label + wrapped[0], *(" " * len(label) + rest for rest in wrapped[1:])]


def group_choices(stage: str, cfg_dir: Path) -> dict[str, list[str]]:
    """Config group -> its files under configs/ that validate for `stage` (the default marked with *), in the order
    of config.yaml's defaults list; `+experiment` last. The stage group itself is the verb, so it is left out, and so
    are the folders that are no group of a stage (pipeline/: `rlhf pipeline`'s stage lists)."""
    from rlhf_cli.config.compose import NOT_GROUPS

    defaults = default_choices(cfg_dir, stage)
    # A file that another stage picks by default holds that stage's rows (sample_preferences validates for sft as
    # jsonl, but its rows are pairs): it is that stage's, not this one's.
    others = [default_choices(cfg_dir, p.stem) for p in (cfg_dir / "stage").glob("*.yaml") if p.stem != stage]
    groups = [g for g in defaults if g != "stage"]
    groups += sorted(p.name for p in cfg_dir.iterdir() if p.is_dir() and p.name not in (*defaults, *NOT_GROUPS))
    out = {}
    for group in groups:
        default = defaults.get(group)
        theirs = {d.get(group) for d in others} - {default}
        files = [p for p in sorted((cfg_dir / group).glob("*.yaml")) if p.stem not in theirs]
        names = [p.stem for p in files if _fits(stage, cfg_dir, group, p)]
        names = ([f"{default}*"] if default in names else []) + [n for n in names if n != default]
        out[group if group in defaults else f"+{group}"] = names
    return out


def default_choices(cfg_dir: Path, stage: str) -> dict[str, str]:
    """Group -> default choice: config.yaml's defaults list, then the stage file's `override /group: choice`."""
    out: dict[str, str] = {}
    for path in (cfg_dir / "config.yaml", cfg_dir / "stage" / f"{stage}.yaml"):
        out.update(_defaults_list(_load_yaml(path)))
    return out


def _defaults_list(raw: Any) -> dict[str, str]:
    out = {}
    for item in raw.get("defaults", None) or []:
        if not isinstance(item, str):  # `_self_` is a plain string
            out.update({key.removeprefix("override ").strip("/"): value for key, value in item.items()})
    return out


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.load(path)


def _fits(stage: str, cfg_dir: Path, group: str, path: Path) -> bool:
    """Does the file validate against the stage's schema (its keys exist, its data format suits the stage)? A global
    file (an experiment) is checked whole, with the group files its defaults list picks."""
    from omegaconf import OmegaConf

    from rlhf_cli.config.compose import validate
    from rlhf_cli.errors import UserError

    raw = _load_yaml(path)
    if path.read_text().lstrip().startswith("# @package _global_"):
        picked = [{g: _load_yaml(cfg_dir / g / f"{c}.yaml")} for g, c in _defaults_list(raw).items()]
        raw = OmegaConf.merge(*picked, {k: v for k, v in raw.items() if k != "defaults"})
    else:
        raw = {group: raw}
    try:
        validate(stage, raw)
    except UserError:
        return False
    return True
