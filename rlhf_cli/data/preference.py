"""Preference data: rows -> (prompt, chosen, rejected) pairs -> shared-prompt token ids -> stacked batches.

The prompt is rendered once with the chat template (generation prompt included); each reply is the tokens that
follow it in the rendering of prompt + reply, found with SFT's prefix-difference method (`tokenize_conversation`),
so chosen and rejected carry byte-identical prompt ids, end with the trained EOS, and match what SFT trains
(docs/algorithms.md section 3.3, section 9 items 5 and 11).

`PREFERENCE_FORMATS` maps `data.format` to a row adapter `(row, location, data_cfg) -> (prompt, chosen, rejected)`;
`adapt_preference_rows` adds what every format shares: margins, the system prompt and the checks on the result.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_cli.config.schema import PreferenceDataConfig
from rlhf_cli.data.adapters import Conversation
from rlhf_cli.data.preference_formats import PreferencePair, adapt_preference_rows, row_adapter
from rlhf_cli.data.sft import (
    BOUNDARY_MERGE,
    EMPTY_TURN,
    IGNORE_INDEX,
    NO_ROOM,
    REPLY_CHANGED,
    SHORT_AFTER_TRUNCATION,
    TOO_LONG,
    DataReport,
    DropExample,
    build_splits,
    read_split,
    recent_turns,
    split_eval,
    tokenize_conversation,
)
from rlhf_cli.data.sft import _check_config as check_sft_config
from rlhf_cli.errors import DataError

if TYPE_CHECKING:  # torch loads with the first batch, so `explain` and config checks stay light
    import torch

IDENTICAL_AFTER_TRUNCATION = "chosen and rejected identical after truncation"


@dataclass
class PreferenceExample:
    prompt_ids: list[int]  # (P,), the same ids for both replies
    chosen_ids: list[int]  # (Lc,), ends with EOS unless truncated
    rejected_ids: list[int]  # (Lr,)
    margin: float = 0.0
    prompt_truncated: bool = False  # oldest exchanges cut (data.truncation=truncate_prompt)
    response_truncated: bool = False  # a reply cut to the room left (data.truncation=truncate_response)


@dataclass
class PreferenceData:
    train: list[PreferenceExample]
    eval: list[PreferenceExample]
    report: DataReport


# ---------------------------------------------------------------- one pair


def tokenize_pair(
    tokenizer, pair: PreferencePair, max_length: int, truncation: str = "drop", min_response_tokens: int = 1
) -> PreferenceExample:
    """Token ids of the shared prompt and of each reply (EOS included); raises DropExample(reason) to leave it out.

    `truncate_response` keeps the whole prompt and cuts each reply to the room left: a cut reply loses its EOS,
    so a reward model scores it where it was cut (the caller may count such pairs: `ids[-1] != eos`).
    `truncate_prompt` cuts the oldest exchanges of the prompt (`recent_turns`) until it and the longer reply fit;
    both replies share that one cut prompt and keep exactly the ids they have after the whole prompt.
    """
    prompt_ids, chosen_ids, rejected_ids = _pair_ids(tokenizer, pair.prompt, pair)
    longer = max(len(chosen_ids), len(rejected_ids))
    truncated = truncation == "truncate_prompt" and len(prompt_ids) + longer > max_length
    if truncated:
        prompt_ids, *replies = _pair_ids(tokenizer, recent_turns(tokenizer, pair.prompt, longer, max_length), pair)
        if replies != [chosen_ids, rejected_ids]:
            raise DropExample(REPLY_CHANGED)  # a template that renders a reply after its history differently
    cut = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_length
    chosen_ids, rejected_ids = _fit_pair(
        len(prompt_ids), chosen_ids, rejected_ids, max_length, truncation, min_response_tokens
    )
    margin = 0.0 if pair.margin is None else pair.margin
    return PreferenceExample(prompt_ids, chosen_ids, rejected_ids, margin, truncated, response_truncated=cut)


def _pair_ids(tokenizer, prompt: Conversation, pair: PreferencePair) -> tuple[list[int], list[int], list[int]]:
    """Ids of `prompt` (P,) with the generation prompt, and of each reply after it (Lc,), (Lr,), through EOS."""
    chosen = _reply_ids(tokenizer, prompt, pair.chosen)
    rejected = _reply_ids(tokenizer, prompt, pair.rejected)
    prompt_ids = _render_prompt(tokenizer, prompt)
    for full, _ in (chosen, rejected):
        if full[: len(prompt_ids)] != prompt_ids:
            # SFT already checks this for its own rendering; this guards the one the pair's ids come from.
            raise DropExample(BOUNDARY_MERGE)
    chosen_ids, rejected_ids = (full[len(prompt_ids) : end] for full, end in (chosen, rejected))
    if not chosen_ids or not rejected_ids:
        raise DropExample(EMPTY_TURN)
    return prompt_ids, chosen_ids, rejected_ids


def _reply_ids(tokenizer, prompt: Conversation, reply: str) -> tuple[list[int], int]:
    """Ids of prompt + reply as SFT renders them, and where the reply's trained span (through EOS) ends.

    Template glue after the EOS (a newline) is not part of the reply, so the last real token is the EOS:
    where the reward model reads its score and where the DPO log-prob sum stops.
    """
    ex = tokenize_conversation(tokenizer, [*prompt, {"role": "assistant", "content": reply}], max_length=sys.maxsize)
    end = max(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX) + 1
    return ex.input_ids, end


def _render_prompt(tokenizer, prompt: Conversation) -> list[int]:
    # The full renderings above succeeded, and SFT rendered this same prefix inside them, so the template accepts it.
    out = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
    if isinstance(out, Mapping):  # transformers 5 may hand back a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _fit_pair(
    prompt_len: int, chosen: list[int], rejected: list[int], max_length: int, truncation: str, min_response_tokens: int
) -> tuple[list[int], list[int]]:
    """Apply `data.max_length` (prompt + the longer reply) with the `data.truncation` policy (`truncate_prompt` has
    already cut the prompt)."""
    if prompt_len >= max_length:
        raise DropExample(NO_ROOM)
    room = max_length - prompt_len
    if max(len(chosen), len(rejected)) <= room:
        return chosen, rejected
    if truncation != "truncate_response":
        raise DropExample(TOO_LONG)
    chosen, rejected = chosen[:room], rejected[:room]
    if min(len(chosen), len(rejected)) < min_response_tokens:
        raise DropExample(SHORT_AFTER_TRUNCATION)
    if chosen == rejected:
        raise DropExample(IDENTICAL_AFTER_TRUNCATION)  # replies that differ only past the cut teach nothing
    return chosen, rejected


# ---------------------------------------------------------------- datasets


def build_preference_datasets(data_cfg: PreferenceDataConfig, tokenizer, seed: int) -> PreferenceData:
    """Read, adapt, split and tokenize the preference pairs of `data_cfg`; report what was left out.

    Without `data.eval_split`, the held-out fraction is taken over distinct prompts, so several pairs on one
    prompt (SHP posts, multi-reply data) never straddle train and eval and inflate eval accuracy.
    """
    _check_config(data_cfg, tokenizer)
    train, evals, report = build_splits(
        data_cfg,
        seed,
        lambda split, report, dropped: _read_pairs(data_cfg, split, report, dropped),
        _split_by_prompt,
        lambda items, dropped: _tokenize_all(tokenizer, items, data_cfg, dropped),
        "no preference pair left",
        "data.format, data.max_length / data.truncation",
    )
    return PreferenceData(train, evals, report)


def _check_config(data_cfg: PreferenceDataConfig, tokenizer) -> None:
    row_adapter(data_cfg.format)  # an unknown format fails before any download
    check_sft_config(data_cfg, tokenizer)  # truncation, bad_rows, eval_fraction, max_length, chat template
    if data_cfg.margin_column and data_cfg.strength_column:
        raise DataError("data.margin_column and data.strength_column are both set; a margin comes from one of them.")
    if data_cfg.strength_column and not data_cfg.margin_map:
        raise DataError("data.strength_column is set but data.margin_map is empty; map each label to a margin.")
    for label, value in data_cfg.margin_map.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"data.margin_map.{label}: {value!r} is not a number.")


def _read_pairs(
    data_cfg: PreferenceDataConfig, split: str, report: DataReport, dropped: dict[str, int]
) -> list[PreferencePair]:
    return read_split(data_cfg, split, report, dropped, adapt_preference_rows).pairs


def _split_by_prompt(
    pairs: list[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """`split_eval` over distinct prompts; both parts keep file order."""
    keys = list(dict.fromkeys(json.dumps(p.prompt, sort_keys=True) for p in pairs))
    _, eval_keys = split_eval(keys, fraction, seed)
    held_out = set(eval_keys)
    train = [p for p in pairs if json.dumps(p.prompt, sort_keys=True) not in held_out]
    return train, [p for p in pairs if json.dumps(p.prompt, sort_keys=True) in held_out]


def _tokenize_all(
    tokenizer, pairs: list[PreferencePair], data_cfg: PreferenceDataConfig, dropped: dict[str, int]
) -> list[PreferenceExample]:
    examples = []
    for pair in pairs:
        try:
            examples.append(
                tokenize_pair(tokenizer, pair, data_cfg.max_length, data_cfg.truncation, data_cfg.min_response_tokens)
            )
        except DropExample as drop:
            dropped[drop.reason] = dropped.get(drop.reason, 0) + 1
    return examples


# ---------------------------------------------------------------- batching


def collate_preference(examples: list[PreferenceExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of B pairs as 2B rows, chosen first: [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}].

    input_ids (2B, T) padded with pad_token_id, attention_mask (2B, T), labels (2B, T) = the reply ids (EOS
    included) with IGNORE_INDEX on prompt and pad (unshifted, for DPO), margin (B,) float32, prompt_lengths (2B,).
    The mask is built from lengths, never from `ids != pad`, since pad may equal EOS (docs/algorithms.md section 1.5).
    """
    import torch

    if not examples:
        raise ValueError("collate_preference needs at least one pair")
    rows = [(ex.prompt_ids, ex.chosen_ids) for ex in examples] + [(ex.prompt_ids, ex.rejected_ids) for ex in examples]
    width = max(len(prompt) + len(reply) for prompt, reply in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        input_ids[i, :n] = torch.tensor(prompt + reply, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(reply, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "margin": torch.tensor([ex.margin for ex in examples], dtype=torch.float32),
        "prompt_lengths": torch.tensor([len(prompt) for prompt, _ in rows], dtype=torch.long),
    }
