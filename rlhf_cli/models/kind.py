"""What a checkpoint is, told from its files without loading a weight: a causal LM or a sequence classifier (its
config.json `architectures`, or a LoRA adapter's task type), and whether a classifier's head is in the checkpoint
(the tensor names in the safetensors headers, every shard of an index).

`AutoModelForSequenceClassification` loads a causal LM, or a classifier saved without its head, with a randomly
initialised head and no error: every score it gives is made up. So the settings that name a model to score with
(`stage.reward.model`, a gold model, `rlhf score model=`) are refused here when they name such a folder, and a
policy that is a classifier likewise. Hub ids are judged after loading (`check_loaded_head`), from transformers'
list of the keys the checkpoint did not provide. Torch-free: `rlhf score` checks before importing torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.config.functions import is_model_source
from rlhf_cli.errors import UserError
from rlhf_cli.models.source import is_builtin, resolve_source
from rlhf_cli.models.weights import check_weight_files, weight_files

CAUSAL_LM, CLASSIFIER = "causal-lm", "classifier"
# Architecture suffixes (config.json) and PEFT task types (adapter_config.json) -> what the checkpoint is.
_ARCH_KINDS = (("ForSequenceClassification", CLASSIFIER), ("ForCausalLM", CAUSAL_LM), ("LMHeadModel", CAUSAL_LM))
_PEFT_KINDS = {"SEQ_CLS": CLASSIFIER, "CAUSAL_LM": CAUSAL_LM}
# The top-level modules transformers' sequence classifiers keep their head in: `score` (decoders), `classifier`
# (BERT, RoBERTa, DeBERTa...), `classification_head` (BART, T5). A LoRA adapter saves them under PEFT_PREFIX.
HEAD_NAMES = ("score", "classifier", "classification_head")
PEFT_PREFIX = "base_model.model."
SCORER = (
    "a sequence classifier whose trained head is in its checkpoint: a reward model from `rlhf rm` (stage:rm) "
    "or another trained classifier"
)


@dataclass(frozen=True)
class Checkpoint:
    """kind: CAUSAL_LM, CLASSIFIER or None (cannot tell); architecture: e.g. LlamaForCausalLM; head: the classifier
    head's weights are in the checkpoint (None: cannot tell, e.g. .bin weights, or an unusual head name)."""

    kind: str | None
    architecture: str | None
    head: bool | None

    @property
    def scores_with_random_head(self) -> bool:
        """Loaded as a classifier, it would score with a new random head (False where that cannot be told)."""
        return (self.kind == CAUSAL_LM and self.head is not True) or (self.kind == CLASSIFIER and self.head is False)

    def describe(self) -> str:
        if self.kind == CAUSAL_LM:
            return f"a causal language model ({self.architecture})" + (", no score head" if not self.head else "")
        if self.kind == CLASSIFIER:
            return f"a sequence classifier ({self.architecture})" + (
                ", its head missing from the checkpoint" if self.head is False else ""
            )
        return f"a {self.architecture or 'checkpoint without architectures in its config.json'}"


def inspect_checkpoint(name: str, check_files: bool = False) -> tuple[str, Checkpoint | None]:
    """(the folder read, what it holds) of the model `name` (a run-dir stage folder is read at its final/);
    (name, None) for a hub id. `check_files`: a cut or missing weight file is reported first (`check_weight_files`'
    UserError), as loading would: whatever the folder is meant to be, its files must be replaced."""
    if is_builtin(name):
        return name, Checkpoint(CAUSAL_LM, "the built-in tiny Llama", False)
    source, local = resolve_source(name)
    if local and check_files:
        check_weight_files(Path(source))
    return source, inspect_folder(Path(source)) if local else None


def inspect_folder(folder: Path) -> Checkpoint:
    adapter = read_json_table(folder / "adapter_config.json")
    if adapter and not (folder / "config.json").is_file():
        return _inspect_adapter(folder, adapter)
    archs = read_json_table(folder / "config.json").get("architectures") or []
    for arch in archs:
        for suffix, kind in _ARCH_KINDS:
            if arch.endswith(suffix):
                return Checkpoint(kind, arch, _head_in(_tensor_names(folder)))
    return Checkpoint(None, archs[0] if archs else None, _head_in(_tensor_names(folder)))


def _inspect_adapter(folder: Path, adapter: dict) -> Checkpoint:
    """A LoRA adapter folder: its task type, and the head saved with it (peft's `modules_to_save`) or, failing
    that, in its base model when that is a local folder (adapters trained on top of a reward model)."""
    task = adapter.get("task_type")
    kind, what = _PEFT_KINDS.get(task), f"a {task} LoRA adapter"
    head = _head_in(_tensor_names(folder))
    base = adapter.get("base_model_name_or_path")
    if head is False and kind == CLASSIFIER and isinstance(base, str) and Path(base).expanduser().is_dir():
        head = inspect_folder(Path(base).expanduser()).head  # the base's own head, or a random one
    return Checkpoint(kind, what, head)


def _head_in(names: set[str] | None) -> bool | None:
    """True: a classifier head is among the tensor `names`; False: they are a backbone alone, with or without an LM
    head (one top-level module besides `lm_head`); None: cannot tell (no names, or other top-level modules, such
    as a head under a name not in HEAD_NAMES: loading will tell)."""
    if names is None:
        return None
    tops = {n.removeprefix(PEFT_PREFIX).split(".", 1)[0] for n in names}
    if tops & set(HEAD_NAMES):
        return True
    return False if len(tops - {"lm_head"}) <= 1 else None


def _tensor_names(folder: Path) -> set[str] | None:
    """The tensor names of the folder's weights, from safetensors headers (the index's shards included); None where
    a weight file is not safetensors, or is missing or unreadable (`check_weight_files` and the loader report that:
    here only the kind is asked, e.g. by `rlhf eval` looking for the run's policies)."""
    names: set[str] = set()
    try:
        files = weight_files(folder)
    except UserError:
        return None
    for path in files:
        header = _safetensors_header(path) if path.suffix == ".safetensors" else None
        if header is None:
            return None
        names |= {key for key in header if key != "__metadata__"}
    return names if files else None


def _safetensors_header(path: Path) -> dict | None:
    """The JSON header of a safetensors file (8-byte little-endian length, then the header): no tensor is read."""
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if length > path.stat().st_size:  # not a safetensors header: check_weight_files says what is wrong
                return None
            header = json.loads(fh.read(length))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def read_json_table(path: Path) -> dict:
    """A JSON object file as a dict; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _named(setting: str | None, source: str) -> str:
    """`stage.reward.model=stage:sft (runs/x/sft/final)`: the setting and the folder it resolved to (the folder
    alone where no setting is known: `load_classifier` called without one)."""
    if not setting:
        return source
    return setting if setting.endswith(f"={source}") else f"{setting} ({source})"


def not_a_scorer(setting: str | None, source: str, what: str, hint: str = "") -> UserError:
    return UserError(
        f"{_named(setting, source)} is {what}: loaded as a classifier it would score with a randomly "
        f"initialised head. Expected {SCORER}{hint}"
    )


def check_scorer(name: str, setting: str | None, causal_hint: str = "") -> None:
    """Refuse, before loading it, a local model to score with (`setting` names it, e.g. `stage.reward.model=...`)
    that is a causal LM (`causal_hint` is added to the message then) or a classifier saved without its head. Hub
    ids pass (`check_loaded_head` judges them)."""
    source, found = inspect_checkpoint(name, check_files=True)
    if found is not None and found.scores_with_random_head:
        hint = causal_hint if found.kind == CAUSAL_LM else ""
        raise not_a_scorer(setting, source, found.describe(), hint)


def check_loaded_head(name: str, model: Any, info: dict, setting: str | None) -> None:
    """Refuse a classifier loaded from `name` (`from_pretrained(..., output_loading_info=True)`: `model`, `info`)
    whose head-side weights (outside the backbone) were not in the checkpoint, i.e. were initialised randomly."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    new = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(prefix))
    if not new:
        return
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    kind = next((k for suffix, k in _ARCH_KINDS if arch.endswith(suffix)), None)
    what = Checkpoint(kind, arch, False).describe() if kind else f"a {arch} checkpoint, no classifier head"
    raise not_a_scorer(setting, name, f"{what} (missing: {', '.join(new[:4])})")


def check_policy(name: str, setting: str, role: str = "a policy") -> None:
    """Refuse, before loading it, a local policy (`setting` names it) that is a sequence classifier."""
    source, found = inspect_checkpoint(name, check_files=True)
    if found is not None and found.kind == CLASSIFIER:
        raise UserError(
            f"{_named(setting, source)} is {found.describe()}, a model that scores "
            f"responses: {role} must be a causal language model (e.g. stage:sft); a reward model goes in "
            "stage.reward.model or a gold setting"
        )


def check_reward_sources(st: Any, run: Any, gold_key: str = "stage.gold_reward", reward: bool = True) -> None:
    """The reward model (`stage.reward.model`, unless `reward` is false or a reward function is named, which wins)
    and the gold model (`gold_key`, when it names a model) of stage config `st`, checked with `check_scorer` before
    any model loads. `run.resolve_source` turns `stage:<name>` into that stage's final/."""
    r = st.reward
    if reward and r.model and not (r.function or getattr(r, "functions", None)):
        check_scorer(run.resolve_source(r.model), f"stage.reward.model={r.model}")
    gold = getattr(st, gold_key.rpartition(".")[2], None)
    if gold and is_model_source(gold):
        check_scorer(run.resolve_source(gold), f"{gold_key}={gold}")
