"""Which attention implementations and model families packing supports (rlhf_cli/data/packing.py), without torch:
`rlhf explain` (stages/plan.py) states them, and the data and stage modules check them."""

from __future__ import annotations

# Attention implementations that keep packed sequences apart through position ids (transformers 5 masking_utils and
# modeling_flash_attention_utils); flash attention detects packing only in a single row, so its forwards are
# flattened.
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
FLAT_ATTENTION = ("flash_attention_2", "flash_attention_3")
# A pair's prompt computed once (`data.share_prompt`) needs an explicit 4-D mask, which only these take.
SHARED_PROMPT_ATTENTION = ("sdpa", "eager")
# Decoder families whose transformers forward passes position_ids to the mask factory and the rotary embedding, with
# nothing else depending on the row layout. tests/unit/test_packing.py checks every one (packed == separate logits),
# so a transformers upgrade that breaks one fails there.
PACKED_MODEL_TYPES = frozenset(
    [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "phi3",
        "olmo2",
        "smollm3",
        "starcoder2",
        "glm4",
        "granite",
        "cohere",
        "stablelm",
    ]
)
