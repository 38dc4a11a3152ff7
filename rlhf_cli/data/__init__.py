"""Data: sources -> adapters (rows to conversations) -> tokenization, labels and batching per stage."""

from rlhf_cli.data.adapters import FORMATS, Adapted, Conversation, adapt_rows, with_system_prompt
from rlhf_cli.data.preference import (
    PreferenceData,
    PreferenceExample,
    build_preference_datasets,
    collate_preference,
    tokenize_pair,
)
from rlhf_cli.data.preference_formats import PREFERENCE_FORMATS, PreferencePair, adapt_preference_rows
from rlhf_cli.data.prompts import PROMPT_FORMATS, PromptData, PromptExample, build_prompt_datasets, collate_prompts
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
    "PREFERENCE_FORMATS",
    "PROMPT_FORMATS",
    "Adapted",
    "BadRow",
    "Conversation",
    "DataReport",
    "DropExample",
    "PreferenceData",
    "PreferenceExample",
    "PreferencePair",
    "PromptData",
    "PromptExample",
    "SFTData",
    "SFTExample",
    "adapt_preference_rows",
    "adapt_rows",
    "build_preference_datasets",
    "build_prompt_datasets",
    "build_sft_datasets",
    "collate_preference",
    "collate_prompts",
    "collate_sft",
    "load_rows",
    "split_eval",
    "tokenize_conversation",
    "tokenize_pair",
    "with_system_prompt",
]
