"""Parameter shapes of a model without importing torch or transformers, for `rlhf explain`.

Importing torch and transformers takes 3-4 s on a 2-core machine, so building a model on the meta device to count
its parameters made `explain` take over 4 s. The shapes come instead from the safetensors headers of a local
checkpoint (any architecture: a JSON header per file) or, for the built-in tiny Llama, from its config and the
shipped tokenizer's size. `fast_shapes` returns None where neither applies (a hub id, `.bin` weights, LoRA, another
tokenizer for the built-in model): the caller then builds the model on the meta device, which stays the reference
that tests/unit/test_shapes.py compares these shapes with.
"""

from __future__ import annotations

import functools
import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

Shapes = dict[str, tuple[int, ...]]
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TINY = "builtin:tiny-llama"  # models/tiny.py's BUILTIN_TINY (that module imports torch)


def fast_shapes(model_cfg: Any, scalar_head: bool) -> Shapes | None:
    """{parameter name: shape} of the model `model_cfg` loads (with `scalar_head`: the one-label sequence classifier
    a reward model or critic is), or None when they cannot be known without building it."""
    name = str(model_cfg.name_or_path)
    if model_cfg.lora.enabled:
        return None  # peft's adapters and modules_to_save copies: counted on the meta model
    if name.startswith("builtin:"):
        if name != _TINY or (model_cfg.tokenizer and model_cfg.tokenizer != _TINY):
            return None  # an unknown builtin is refused by the meta path; another tokenizer changes the vocabulary
        shapes = tiny_llama_shapes(model_cfg.tiny, tiny_vocab_size())
        config = {"hidden_size": model_cfg.tiny.hidden_size}
    else:
        folder = Path(name)
        if not (folder / "config.json").is_file():
            return None
        config = json.loads((folder / "config.json").read_text())
        shapes = checkpoint_shapes(folder)
        if shapes is None:
            return None
        if config.get("tie_word_embeddings") and "lm_head.weight" in shapes:
            del shapes["lm_head.weight"]  # one tensor, two names: the meta model counts it once
    return _with_head(shapes, config, scalar_head)


def tiny_llama_shapes(tiny: Any, vocab: int) -> Shapes:
    """The parameters of LlamaForCausalLM as models/tiny.py builds it: untied embeddings, no biases,
    head_dim = hidden / heads."""
    h, inter, heads, kv = tiny.hidden_size, tiny.intermediate_size, tiny.num_attention_heads, tiny.num_key_value_heads
    head_dim = h // heads
    shapes: Shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(tiny.num_hidden_layers):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.self_attn.q_proj.weight": (heads * head_dim, h),
            f"{layer}.self_attn.k_proj.weight": (kv * head_dim, h),
            f"{layer}.self_attn.v_proj.weight": (kv * head_dim, h),
            f"{layer}.self_attn.o_proj.weight": (h, heads * head_dim),
            f"{layer}.mlp.gate_proj.weight": (inter, h),
            f"{layer}.mlp.up_proj.weight": (inter, h),
            f"{layer}.mlp.down_proj.weight": (h, inter),
            f"{layer}.input_layernorm.weight": (h,),
            f"{layer}.post_attention_layernorm.weight": (h,),
        }
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}


@functools.lru_cache
def tiny_vocab_size() -> int:
    """len(tokenizer) of the shipped tiny tokenizer: its vocabulary and added tokens (the embedding rows)."""
    from importlib import resources

    spec = json.loads(resources.files("rlhf_cli.assets").joinpath("tiny_tokenizer/tokenizer.json").read_text())
    return len(set(spec["model"]["vocab"].values()) | {t["id"] for t in spec.get("added_tokens", [])})


def checkpoint_shapes(folder: Path) -> Shapes | None:
    """Shapes from the safetensors header(s) of `folder` (one file, or the shards its index names); None without
    safetensors weights or with an unreadable header."""
    index = folder / _SAFETENSORS_INDEX
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            return None
        shapes: Shapes = {}
        for file in files:
            shapes.update(safetensors_header_shapes(folder / file))
        return shapes
    except (OSError, ValueError, KeyError, struct.error):
        return None


def safetensors_header_shapes(path: Path) -> Shapes:
    """The tensors a safetensors file declares: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _with_head(shapes: Shapes, config: dict[str, Any], scalar_head: bool) -> Shapes | None:
    """A causal LM's shapes with its LM head swapped for the (1, hidden) score head when a scalar head is asked for;
    None for a classifier checkpoint loaded as a causal LM (not a case `explain` meets)."""
    archs = config.get("architectures") or []
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    if not scalar_head:
        return None if classifier else shapes
    if classifier:
        return shapes
    hidden = config.get("hidden_size")
    if not hidden:
        return None
    out = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    out["score.weight"] = (1, int(hidden))
    return out


def counts(shapes: Shapes) -> tuple[int, int, int]:
    """(all, trainable, largest module's own) parameter counts; without LoRA every parameter is trained."""
    per_module: dict[str, int] = defaultdict(int)
    total = 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        total += n
        per_module[name.rsplit(".", 1)[0]] += n
    return total, total, max(per_module.values(), default=0)
