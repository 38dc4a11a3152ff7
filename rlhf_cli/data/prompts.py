"""Prompt data for the online stages (PPO): rows -> prompt conversations -> chat-template ids -> left-padded batches.

A prompt is the conversation up to the reply the policy will write: it ends with a user message and is rendered
with the generation prompt, so its ids are exactly the prompt ids SFT and the preference data put before a reply
(the policy generates where it was trained to answer). `text` is the final user message, the "prompt" a Python
reward function such as `rlhf_cli.tasks.word_order:gold_reward` receives.

`PROMPT_FORMATS` lists `data.format` values: the SFT formats read only their prompt columns (a reply column may be
there or not), the preference formats give the prompt of each pair. Identical prompts are kept once: preference
data repeats a prompt for every pair on it (SHP posts), and a repeat would otherwise straddle train and eval.

A prompt longer than `data.max_prompt_length` is dropped (`data.truncation=drop`) or loses its oldest exchanges
(`truncate_prompt`, SFT's `cut_oldest_turns`); `truncate_response` has no meaning here, the reply is generated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_cli.config.schema import DataConfig, PreferenceDataConfig, PromptDataConfig
from rlhf_cli.data.adapters import Adapted, Conversation, _join, _rowwise, _text, check_messages, with_system_prompt
from rlhf_cli.data.preference_formats import PREFERENCE_FORMATS, adapt_preference_rows
from rlhf_cli.data.sft import (
    DataReport,
    DropExample,
    _check_config,
    _reject_special_text,
    _render,
    build_splits,
    cut_oldest_turns,
    read_split,
    split_eval,
)
from rlhf_cli.data.sources import BadRow, Row
from rlhf_cli.errors import DataError

if TYPE_CHECKING:  # torch loads with the first batch, so `explain` and config checks stay light
    import torch

# Drop reasons (keys of DataReport.dropped / eval_dropped).
PROMPT_TOO_LONG = "prompt longer than data.max_prompt_length"
DUPLICATE_PROMPT = "duplicate prompt"

PROMPT_TRUNCATION_POLICIES = ("drop", "truncate_prompt")


@dataclass(frozen=True)
class PromptExample:
    input_ids: list[int]  # (P,) chat template with the generation prompt: what the policy continues
    text: str  # content of the final user message (the prompt a reward function sees)
    messages: list[dict]  # the conversation, ending with that user message (after any cut: what input_ids render)
    prompt_truncated: bool = False  # oldest exchanges cut (data.truncation=truncate_prompt)


@dataclass
class PromptData:
    train: list[PromptExample]
    eval: list[PromptExample]
    report: DataReport


# ---------------------------------------------------------------- formats


def jsonl_prompt(row: dict, location: str) -> Conversation:
    """Generic rows: `prompt` (a string or a message list) or `messages` (a final assistant message is dropped)."""
    key = "messages" if "messages" in row else "prompt"
    if key not in row:
        raise BadRow(location, "expected a 'prompt' or a 'messages' field")
    if key == "messages" or isinstance(row[key], list):
        conv = check_messages(row[key], location, key, final_assistant=False)
        if conv[-1]["role"] == "assistant":
            conv = conv[:-1]  # the reply to a full conversation is what the policy writes instead
    else:
        conv = [{"role": "user", "content": _text(row, key, location)}]
    if not conv or conv[0]["role"] == "assistant":
        raise BadRow(location, f"'{key}' must start with a user or system message")
    if conv[-1]["role"] != "user":
        raise BadRow(location, f"'{key}' must end with a user message (after dropping a final assistant reply)")
    return conv


def dolly_prompt(row: dict, location: str) -> Conversation:
    """databricks-dolly-15k: instruction + optional context, joined as the SFT dolly adapter joins them."""
    prompt = _join(_text(row, "instruction", location), _text(row, "context", location, required=False))
    return [{"role": "user", "content": prompt}]


def alpaca_prompt(row: dict, location: str) -> Conversation:
    """Stanford Alpaca: instruction + optional input, joined as the SFT alpaca adapter joins them."""
    prompt = _join(_text(row, "instruction", location, required=False), _text(row, "input", location, required=False))
    if not prompt:
        raise BadRow(location, "empty prompt: 'instruction' and 'input' are both empty")
    return [{"role": "user", "content": prompt}]


def dialogsum_prompt(row: dict, location: str) -> Conversation:
    """Dialogue-summarisation sets (knkarthick/dialogsum, SAMSum): a request to summarise the `dialogue` column, the
    classic prompt source of detoxification runs (ppo_detox): everyday conversations that a policy continues."""
    return [{"role": "user", "content": "Summarize the following dialogue.\n\n" + _text(row, "dialogue", location)}]


# Table adapters `(rows, data_cfg) -> Adapted`, collecting bad rows with their locations as SFT's do.
_ROW_FORMATS: dict[str, Callable[[list[tuple[str, Row]], PromptDataConfig], Adapted]] = {
    "jsonl": _rowwise(jsonl_prompt),
    "dolly": _rowwise(dolly_prompt),
    "alpaca": _rowwise(alpaca_prompt),
    "dialogsum": _rowwise(dialogsum_prompt),
}
_PAIR_FORMATS = tuple(f for f in PREFERENCE_FORMATS if f != "jsonl")  # generic pairs: use a `prompt` column
PROMPT_FORMATS: tuple[str, ...] = (*_ROW_FORMATS, *_PAIR_FORMATS)


def _adapt_rows(rows: list[tuple[str, Row]], data_cfg: PromptDataConfig) -> Adapted:
    if data_cfg.format not in _PAIR_FORMATS:
        return _ROW_FORMATS[data_cfg.format](rows, data_cfg)
    # The preference adapters with neutral settings: no score filter (every SHP post is a prompt), no margins, and
    # the system prompt left to build_prompt_datasets so that all formats get it the same way.
    pairs = adapt_preference_rows(
        rows, PreferenceDataConfig(source=data_cfg.source, format=data_cfg.format, shp_min_score_ratio=0.0)
    )
    return Adapted([(p.location, p.prompt) for p in pairs.pairs], pairs.bad_rows, pairs.skipped)


# ---------------------------------------------------------------- datasets


def build_prompt_datasets(data_cfg: PromptDataConfig, tokenizer, seed: int) -> PromptData:
    """Read, adapt, split and tokenize the prompts of `data_cfg`; report what was left out.

    Without `data.eval_split`, `data.eval_fraction` of the (distinct) prompts is held out with `seed`;
    `data.max_samples` then caps the training prompts. Raises DataError when no training prompt is left.
    """
    _check_prompt_config(data_cfg, tokenizer)
    train, evals, report = build_splits(
        data_cfg,
        seed,
        lambda split, report, dropped: _read_prompts(data_cfg, split, report, dropped),
        split_eval,
        lambda items, dropped: _tokenize_prompts(tokenizer, items, data_cfg, dropped),
        "no training prompt left",
        "data.format, data.max_prompt_length",
    )
    return PromptData(train, evals, report)


def _check_prompt_config(data_cfg: PromptDataConfig, tokenizer) -> None:
    if data_cfg.format not in PROMPT_FORMATS:  # fails before any download
        raise DataError(
            f"data.format: unknown prompt format '{data_cfg.format}'. Choose one of: {', '.join(PROMPT_FORMATS)}."
        )
    if isinstance(data_cfg.max_prompt_length, bool) or not isinstance(data_cfg.max_prompt_length, int):
        raise DataError(f"data.max_prompt_length: {data_cfg.max_prompt_length!r} must be a whole number of tokens.")
    if data_cfg.max_prompt_length < 1:
        raise DataError(f"data.max_prompt_length: {data_cfg.max_prompt_length} must be at least 1 token.")
    if data_cfg.max_samples is not None and data_cfg.max_samples < 1:
        raise DataError(f"data.max_samples: {data_cfg.max_samples} must be at least 1 (or null for all prompts).")
    if data_cfg.truncation == "truncate_response":
        raise DataError(
            "data.truncation: truncate_response does not apply to prompt data: a prompt has no response to cut (the "
            "policy writes it). Use drop (leave out prompts longer than data.max_prompt_length) or truncate_prompt "
            "(cut their oldest turns)."
        )
    if data_cfg.truncation not in PROMPT_TRUNCATION_POLICIES:
        raise DataError(
            f"data.truncation: '{data_cfg.truncation}' is not one of {', '.join(PROMPT_TRUNCATION_POLICIES)}."
        )
    # SFT's checks of data.bad_rows, data.eval_fraction and the chat template; its length settings do not apply.
    _check_config(DataConfig(bad_rows=data_cfg.bad_rows, eval_fraction=data_cfg.eval_fraction), tokenizer)


def _read_prompts(
    data_cfg: PromptDataConfig, split: str, report: DataReport, dropped: dict[str, int]
) -> list[tuple[str, Conversation]]:
    """Load and adapt one split under `data.bad_rows`, prepend `data.system_prompt`, keep each prompt once."""
    adapted = read_split(data_cfg, split, report, dropped, _adapt_rows)
    unique: dict[str, tuple[str, Conversation]] = {}
    for location, conv in adapted.conversations:
        if data_cfg.system_prompt:
            conv = with_system_prompt(conv, data_cfg.system_prompt)
        unique.setdefault(json.dumps(conv, sort_keys=True), (location, conv))
    if len(unique) < len(adapted.conversations):
        dropped[DUPLICATE_PROMPT] = dropped.get(DUPLICATE_PROMPT, 0) + len(adapted.conversations) - len(unique)
    return list(unique.values())


def tokenize_prompt(
    tokenizer, messages: Conversation, max_prompt_length: int, truncation: str = "drop"
) -> PromptExample:
    """Render `messages` (ending with a user message) with the generation prompt; DropExample(reason) to leave out.

    The ids equal the prompt ids of `tokenize_pair` / SFT for the same conversation, so generation continues
    exactly where those stages trained the reply. Longer than `max_prompt_length`: `truncate_prompt` cuts the
    oldest exchanges (`cut_oldest_turns`; the system prompt and the final user message stay whole), `drop` and a
    prompt whose system prompt and final user turn alone are too long give DropExample(PROMPT_TOO_LONG).
    """
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user message")
    _reject_special_text(tokenizer, messages)  # as SFT/RM: text like "<|end|>" would encode as the control token
    ids = _render(tokenizer, messages, add_generation_prompt=True)
    truncated = truncation == "truncate_prompt" and len(ids) > max_prompt_length
    if truncated:
        messages, ids = cut_oldest_turns(tokenizer, messages, max_prompt_length)
    if len(ids) > max_prompt_length:
        raise DropExample(PROMPT_TOO_LONG)
    return PromptExample(ids, messages[-1]["content"], messages, truncated)


def _tokenize_prompts(
    tokenizer, conversations: list[tuple[str, Conversation]], data_cfg: PromptDataConfig, dropped: dict[str, int]
) -> list[PromptExample]:
    examples = []
    for _, conv in conversations:
        try:
            examples.append(tokenize_prompt(tokenizer, conv, data_cfg.max_prompt_length, data_cfg.truncation))
        except DropExample as drop:
            dropped[drop.reason] = dropped.get(drop.reason, 0) + 1
    return examples


# ---------------------------------------------------------------- batching


def collate_prompts(examples: list[PromptExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch for generation: input_ids (B, P) with pad_token_id in front, attention_mask (B, P).

    P is the longest prompt. Left padding puts every prompt's last token in column P-1, so generated tokens start
    in the same column for all rows. The mask (0 on pads) is built from lengths, never from `ids != pad`, since
    pad may equal EOS or another real token.
    """
    import torch

    if not examples:
        raise ValueError("collate_prompts needs at least one prompt")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, width - n :] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, width - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
