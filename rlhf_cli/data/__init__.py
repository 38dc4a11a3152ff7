"""Data: sources -> adapters (rows to conversations) -> tokenization, labels and batching per stage."""

from rlhf_cli.data.adapters import FORMATS, Adapted, Conversation, adapt_rows, with_system_prompt
from rlhf_cli.data.sft import (
    IGNORE_INDEX,
    DataReport,
    DropExample,
    SFTData,
    SFTExample,
    build_sft_datasets,
    collate_sft,
    split_eval,
    tokenize_conversation,
)
from rlhf_cli.data.sources import BadRow, load_rows

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "Adapted",
    "BadRow",
    "Conversation",
    "DataReport",
    "DropExample",
    "SFTData",
    "SFTExample",
    "adapt_rows",
    "build_sft_datasets",
    "collate_sft",
    "load_rows",
    "split_eval",
    "tokenize_conversation",
    "with_system_prompt",
]
