"""Models: the built-in tiny Llama, loading from local folders / run-dir stages / the hub, LoRA, export."""

from rlhf_cli.models.load import (
    apply_lora,
    disable_dropout,
    enable_gradient_checkpointing,
    ensure_distinct_pad,
    is_builtin,
    load_causal_lm,
    load_pretrained,
    load_tokenizer,
    merged_for_export,
    resize_for_tokenizer,
    resolve_source,
    sync_special_ids,
)
from rlhf_cli.models.tiny import BUILTIN_TINY, build_tiny_llama, tiny_tokenizer, tiny_tokenizer_path

__all__ = [
    "BUILTIN_TINY",
    "apply_lora",
    "build_tiny_llama",
    "disable_dropout",
    "enable_gradient_checkpointing",
    "ensure_distinct_pad",
    "is_builtin",
    "load_causal_lm",
    "load_pretrained",
    "load_tokenizer",
    "merged_for_export",
    "resize_for_tokenizer",
    "resolve_source",
    "sync_special_ids",
    "tiny_tokenizer",
    "tiny_tokenizer_path",
]
