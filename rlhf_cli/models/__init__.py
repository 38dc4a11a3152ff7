"""Models: the built-in tiny Llama, loading from local folders / run-dir stages / the hub, LoRA, export.

The names below are imported on first use (PEP 562), so importing one submodule (`models.weights` for a
checkpoint check) does not load torch and transformers through this package.
"""

import importlib

_EXPORTS = {
    "rlhf_cli.models.load": (
        "apply_lora",
        "disable_dropout",
        "enable_gradient_checkpointing",
        "is_peft_model",
        "load_causal_lm",
        "merged_for_export",
        "resize_for_tokenizer",
        "sync_special_ids",
    ),
    "rlhf_cli.models.source": ("BUILTIN_TINY", "is_builtin", "load_pretrained", "resolve_source"),
    "rlhf_cli.models.tokenizer": ("ensure_distinct_pad", "load_tokenizer", "tiny_tokenizer", "tiny_tokenizer_path"),
    "rlhf_cli.models.tiny": ("build_tiny_llama",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
