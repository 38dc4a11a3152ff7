"""Preference data: rows -> (prompt, chosen, rejected) pairs -> shared-prompt token ids -> stacked batches.

The prompt is rendered once with the chat template (generation prompt included); each reply is the tokens that
follow it in the rendering of prompt + reply, found with SFT's prefix-difference method (`tokenize_conversation`),
so chosen and rejected carry byte-identical prompt ids, end with the trained EOS, and match what SFT trains
(ALGORITHMS.md §3 "shared prompt tokenization", §9 items 5 and 11).

`PREFERENCE_FORMATS` maps `data.format` to a row adapter `(row, location, data_cfg) -> (prompt, chosen, rejected)`;
`adapt_preference_rows` adds what every format shares: margins, the system prompt and the checks on the result.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from rlhf_cli.config.schema import PreferenceDataConfig
from rlhf_cli.data.adapters import Conversation, check_messages, with_system_prompt
from rlhf_cli.data.sft import (
    BAD_ROW_POLICIES,
    BOUNDARY_MERGE,
    EMPTY_TURN,
    IGNORE_INDEX,
    MAX_BAD_ROW_SAMPLES,
    NO_ROOM,
    SHORT_AFTER_TRUNCATION,
    TOO_LONG,
    TRUNCATION_POLICIES,
    DataReport,
    DropExample,
    split_eval,
    tokenize_conversation,
)
from rlhf_cli.data.sources import BadRow, Row, load_rows
from rlhf_cli.errors import DataError

IDENTICAL_AFTER_TRUNCATION = "chosen and rejected identical after truncation"


@dataclass
class PreferencePair:
    location: str
    prompt: Conversation  # starts with a user/system message, ends with a user message
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass
class PreferenceExample:
    prompt_ids: list[int]  # (P,), the same ids for both replies
    chosen_ids: list[int]  # (Lc,), ends with EOS unless truncated
    rejected_ids: list[int]  # (Lr,)
    margin: float = 0.0


@dataclass
class AdaptedPairs:
    pairs: list[PreferencePair] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # well-formed rows filtered out, per reason


@dataclass
class PreferenceData:
    train: list[PreferenceExample]
    eval: list[PreferenceExample]
    report: DataReport


RowResult = tuple[Conversation, str, str]

# ---------------------------------------------------------------- formats

# A turn marker at the start of the transcript or after a blank line. "Human:" elsewhere (the real data has
# assistant replies that begin "Human: ...") is text, since splitting there would invent turns.
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def hh_rlhf_row(row: dict, location: str, data_cfg: PreferenceDataConfig) -> RowResult:
    """Anthropic HH-RLHF: two full transcripts; the shared turns are the prompt, the final replies differ."""
    chosen = _hh_turns(_string(row, "chosen", location, strip=False), location, "chosen")
    rejected = _hh_turns(_string(row, "rejected", location, strip=False), location, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise BadRow(location, "'chosen' and 'rejected' differ before the final assistant reply")
    prompt = [{"role": "user" if role == "Human" else "assistant", "content": text} for role, text in chosen[:-1]]
    return prompt, chosen[-1][1], rejected[-1][1]


def _hh_turns(text: str, location: str, name: str) -> list[tuple[str, str]]:
    """(role, text) turns, stripped; empty history turns dropped, consecutive turns of one role joined."""
    parts = _HH_MARKER.split(text.lstrip())
    if parts[0].strip():
        raise BadRow(location, f"'{name}' has text before its first 'Human:' turn")
    turns = [(role, content.strip()) for role, content in zip(parts[1::2], parts[2::2], strict=True)]
    if not turns or turns[-1][0] != "Assistant":
        raise BadRow(location, f"'{name}' does not end with an 'Assistant:' reply")
    if not turns[-1][1]:
        raise BadRow(location, f"'{name}' ends with an empty 'Assistant:' reply")
    merged: list[tuple[str, str]] = []
    for role, content in turns:
        if not content:
            continue
        if merged and merged[-1][0] == role:
            # Chat templates want alternating roles; the transcript's two turns were one speaker anyway.
            merged[-1] = (role, f"{merged[-1][1]}\n\n{content}")
        else:
            merged.append((role, content))
    if merged[0][0] != "Human":
        raise BadRow(location, f"'{name}' does not start with a 'Human:' turn")
    return merged


def shp_row(row: dict, location: str, data_cfg: PreferenceDataConfig) -> RowResult:
    """Stanford SHP: `history`, two comments, `labels` (1 = A preferred), their scores (ratio filter)."""
    history = _string(row, "history", location)
    ref_a, ref_b = _string(row, "human_ref_A", location), _string(row, "human_ref_B", location)
    label = row.get("labels")
    if label not in (0, 1) or isinstance(label, float):
        raise BadRow(location, f"field 'labels' must be 0 or 1, got {label!r}")
    score_a, score_b = _number(row, "score_A", location), _number(row, "score_B", location)
    (chosen, s_chosen), (rejected, s_rejected) = ((ref_a, score_a), (ref_b, score_b))[:: 1 if label else -1]
    ratio = s_chosen / s_rejected if s_rejected > 0 else math.inf
    if ratio < data_cfg.shp_min_score_ratio:
        # Filtered, not malformed: counted under this reason like SFT's drops.
        raise DropExample(f"SHP score ratio below data.shp_min_score_ratio={data_cfg.shp_min_score_ratio:g}")
    return [{"role": "user", "content": history}], chosen, rejected


def ultrafeedback_row(row: dict, location: str, data_cfg: PreferenceDataConfig) -> RowResult:
    """UltraFeedback binarized: `chosen` / `rejected` conversations sharing all but the final assistant reply."""
    history, chosen, rejected = _replies(row, location)
    # Conversations holding only the reply fall back to the `prompt` column.
    return history or [{"role": "user", "content": _string(row, "prompt", location)}], chosen, rejected


def jsonl_pair_row(row: dict, location: str, data_cfg: PreferenceDataConfig) -> RowResult:
    """Generic: `prompt` (string or messages), `chosen` / `rejected` (strings or messages ending in the reply).

    `prompt` may be left out when both replies are conversations that hold it (the implicit-prompt layout);
    when given, conversation replies may repeat it (UltraFeedback style) but not contradict it.
    """
    history, chosen, rejected = _replies(row, location)
    if row.get("prompt") is None:
        if not history:
            raise BadRow(location, "missing field 'prompt' (needed unless 'chosen' and 'rejected' hold it)")
        return history, chosen, rejected
    if isinstance(row["prompt"], list):
        prompt = check_messages(row["prompt"], location, "prompt", final_assistant=False)
    else:
        prompt = [{"role": "user", "content": _string(row, "prompt", location)}]
    if history and _bare(history) != _bare(prompt):
        raise BadRow(location, "'chosen' holds a conversation that differs from 'prompt'")
    return prompt, chosen, rejected


def _bare(messages: Conversation) -> list[tuple[str, str]]:
    return [(m["role"], m["content"].strip()) for m in messages]


def _replies(row: dict, location: str) -> RowResult:
    """(shared earlier messages, chosen text, rejected text) from two strings or two message lists."""
    (c_history, chosen), (r_history, rejected) = _reply(row, "chosen", location), _reply(row, "rejected", location)
    if c_history != r_history:
        raise BadRow(location, "'chosen' and 'rejected' differ before the final assistant reply")
    return c_history, chosen, rejected


def _reply(row: dict, key: str, location: str) -> tuple[Conversation, str]:
    """(earlier messages, final reply text) of a string or a message list ending with an assistant message."""
    if key not in row:
        raise BadRow(location, f"missing field '{key}'")
    if isinstance(row[key], list):
        messages = check_messages(row[key], location, key)
        return messages[:-1], messages[-1]["content"]
    return [], _string(row, key, location)


def _string(row: dict, key: str, location: str, strip: bool = True) -> str:
    # Stripped like SFT text fields: surrounding whitespace is formatting that would be trained before EOS.
    if key not in row:
        raise BadRow(location, f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(location, f"field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(location, f"field '{key}' is empty")
    return value.strip() if strip else value


def _number(row: dict, key: str, location: str) -> float:
    if key not in row:
        raise BadRow(location, f"missing field '{key}'")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow(location, f"field '{key}' must be a finite number, got {value!r}")
    return float(value)


PREFERENCE_FORMATS: dict[str, Callable[[dict, str, PreferenceDataConfig], RowResult]] = {
    "hh_rlhf": hh_rlhf_row,
    "shp": shp_row,
    "ultrafeedback": ultrafeedback_row,
    "jsonl": jsonl_pair_row,
}


def adapt_preference_rows(rows: list[tuple[str, Row]], data_cfg: PreferenceDataConfig) -> AdaptedPairs:
    """Apply the `data.format` adapter, read margins, prepend `data.system_prompt`; collect bad and skipped rows."""
    adapter = _adapter(data_cfg.format)
    out = AdaptedPairs()
    for location, row in rows:
        try:
            if isinstance(row, BadRow):
                raise row
            prompt, chosen, rejected = adapter(row, location, data_cfg)
            _check_pair(prompt, chosen, rejected, location)
            if data_cfg.system_prompt:
                prompt = with_system_prompt(prompt, data_cfg.system_prompt)
            out.pairs.append(PreferencePair(location, prompt, chosen, rejected, _margin(row, location, data_cfg)))
        except BadRow as bad:
            out.bad_rows.append(bad)
        except DropExample as skip:
            out.skipped[skip.reason] = out.skipped.get(skip.reason, 0) + 1
    return out


def _adapter(fmt: str) -> Callable[[dict, str, PreferenceDataConfig], RowResult]:
    if fmt not in PREFERENCE_FORMATS:
        raise DataError(
            f"data.format: unknown preference format '{fmt}'. Choose one of: {', '.join(PREFERENCE_FORMATS)}."
        )
    return PREFERENCE_FORMATS[fmt]


def _check_pair(prompt: Conversation, chosen: str, rejected: str, location: str) -> None:
    if not prompt or prompt[0]["role"] == "assistant":
        raise BadRow(location, "the prompt must start with a user or system message")
    if prompt[-1]["role"] != "user":
        raise BadRow(location, "the prompt must end with a user message")
    if chosen == rejected:
        # Identical inputs score identically: the pair's loss is a constant, with nothing to learn.
        raise BadRow(location, "'chosen' and 'rejected' replies are identical")


def _margin(row: dict, location: str, data_cfg: PreferenceDataConfig) -> float | None:
    """Llama 2-style margin: a number from `margin_column`, or a `strength_column` label through `margin_map`."""
    if data_cfg.margin_column:
        return _number(row, data_cfg.margin_column, location)
    if not data_cfg.strength_column:
        return None
    column = data_cfg.strength_column
    if column not in row:
        raise BadRow(location, f"missing field '{column}' (data.strength_column)")
    # Labels are compared as text: YAML map keys and JSON labels disagree on 1 vs "1".
    margins = {str(k): v for k, v in data_cfg.margin_map.items()}
    label = str(row[column])
    if label not in margins:
        known = ", ".join(margins)
        raise BadRow(
            location, f"unknown preference strength {row[column]!r} in field '{column}'; data.margin_map has: {known}"
        )
    return float(margins[label])


# ---------------------------------------------------------------- one pair


def tokenize_pair(
    tokenizer, pair: PreferencePair, max_length: int, truncation: str = "drop", min_response_tokens: int = 1
) -> PreferenceExample:
    """Token ids of the shared prompt and of each reply (EOS included); raises DropExample(reason) to leave it out.

    `truncate_response` keeps the whole prompt and cuts each reply to the room left: a cut reply loses its EOS,
    so a reward model scores it where it was cut (the caller may count such pairs: `ids[-1] != eos`).
    """
    chosen = _reply_ids(tokenizer, pair.prompt, pair.chosen)
    rejected = _reply_ids(tokenizer, pair.prompt, pair.rejected)
    prompt_ids = _render_prompt(tokenizer, pair.prompt)
    for full, _ in (chosen, rejected):
        if full[: len(prompt_ids)] != prompt_ids:
            # SFT already checks this for its own rendering; this guards the one the pair's ids come from.
            raise DropExample(BOUNDARY_MERGE)
    chosen_ids, rejected_ids = (full[len(prompt_ids) : end] for full, end in (chosen, rejected))
    if not chosen_ids or not rejected_ids:
        raise DropExample(EMPTY_TURN)
    chosen_ids, rejected_ids = _fit_pair(
        len(prompt_ids), chosen_ids, rejected_ids, max_length, truncation, min_response_tokens
    )
    return PreferenceExample(prompt_ids, chosen_ids, rejected_ids, 0.0 if pair.margin is None else pair.margin)


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
    """Apply `data.max_length` (prompt + the longer reply) with the `data.truncation` policy."""
    if prompt_len >= max_length:
        raise DropExample(NO_ROOM)
    room = max_length - prompt_len
    if max(len(chosen), len(rejected)) <= room:
        return chosen, rejected
    if truncation == "drop":
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
    report = DataReport()
    pairs = _read_pairs(data_cfg, data_cfg.split, report, report.dropped)
    if data_cfg.eval_split:
        train_pairs, eval_pairs = pairs, _read_pairs(data_cfg, data_cfg.eval_split, report, report.eval_dropped)
    else:
        train_pairs, eval_pairs = _split_by_prompt(pairs, data_cfg.eval_fraction, seed)
    if data_cfg.max_samples is not None:
        train_pairs = train_pairs[: data_cfg.max_samples]
    train = _tokenize_all(tokenizer, train_pairs, data_cfg, report.dropped)
    evals = _tokenize_all(tokenizer, eval_pairs, data_cfg, report.eval_dropped)
    report.train_examples, report.eval_examples = len(train), len(evals)
    if not train:
        raise DataError(
            f"no preference pair left from data.source={data_cfg.source} (split {data_cfg.split}).\n"
            f"{report.summary()}\n"
            "Check data.format, data.max_length / data.truncation, and the rows themselves."
        )
    return PreferenceData(train, evals, report)


def _check_config(data_cfg: PreferenceDataConfig, tokenizer) -> None:
    _adapter(data_cfg.format)  # an unknown format fails before any download
    if data_cfg.truncation not in TRUNCATION_POLICIES:
        raise DataError(f"data.truncation: '{data_cfg.truncation}' is not one of {', '.join(TRUNCATION_POLICIES)}.")
    if data_cfg.bad_rows not in BAD_ROW_POLICIES:
        raise DataError(f"data.bad_rows: '{data_cfg.bad_rows}' is not one of {', '.join(BAD_ROW_POLICIES)}.")
    if not 0.0 <= data_cfg.eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction: {data_cfg.eval_fraction} must be in [0, 1).")
    if data_cfg.max_length < 2:
        raise DataError(f"data.max_length: {data_cfg.max_length} leaves no room for a prompt and a reply.")
    if data_cfg.margin_column and data_cfg.strength_column:
        raise DataError("data.margin_column and data.strength_column are both set; a margin comes from one of them.")
    if data_cfg.strength_column and not data_cfg.margin_map:
        raise DataError("data.strength_column is set but data.margin_map is empty; map each label to a margin.")
    for label, value in data_cfg.margin_map.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"data.margin_map.{label}: {value!r} is not a number.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template; set model.chat_template to a Jinja chat template.")


def _read_pairs(
    data_cfg: PreferenceDataConfig, split: str, report: DataReport, dropped: dict[str, int]
) -> list[PreferencePair]:
    """Load and adapt one split under the `data.bad_rows` policy; filtered rows are counted in `dropped`."""
    rows = load_rows(data_cfg.source, split, data_cfg.subset)
    report.rows_read += len(rows)
    adapted = adapt_preference_rows(rows, data_cfg)
    if adapted.bad_rows and data_cfg.bad_rows == "fail":
        first = adapted.bad_rows[0]
        raise DataError(
            f"bad row at {first.location}: {first.reason} ({len(adapted.bad_rows)} bad rows in this split). "
            "Fix the row, or set data.bad_rows=skip to skip such rows."
        )
    report.bad_rows += len(adapted.bad_rows)
    room = MAX_BAD_ROW_SAMPLES - len(report.bad_row_samples)
    report.bad_row_samples += [str(bad) for bad in adapted.bad_rows[: max(room, 0)]]
    for reason, n in adapted.skipped.items():
        dropped[reason] = dropped.get(reason, 0) + n
    return adapted.pairs


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
    The mask is built from lengths, never from `ids != pad`, since pad may equal EOS (ALGORITHMS.md §1).
    """
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
