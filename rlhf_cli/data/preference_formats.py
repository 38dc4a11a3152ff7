"""Preference row formats: `PREFERENCE_FORMATS` maps `data.format` to a row adapter
`(row, location, data_cfg) -> (prompt, chosen, rejected)`; `adapt_preference_rows` adds what every format
shares: margins, the system prompt and the checks on the result. Tokenization is in preference.py."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from rlhf_cli.config.schema import PreferenceDataConfig
from rlhf_cli.data.adapters import Conversation, check_messages, with_system_prompt
from rlhf_cli.data.sft import DropExample
from rlhf_cli.data.sources import BadRow, Row
from rlhf_cli.errors import DataError

RowResult = tuple[Conversation, str, str]


@dataclass
class PreferencePair:
    location: str
    prompt: Conversation  # starts with a user/system message, ends with a user message
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass
class AdaptedPairs:
    pairs: list[PreferencePair] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # well-formed rows filtered out, per reason


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
    adapter = row_adapter(data_cfg.format)
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


def row_adapter(fmt: str) -> Callable[[dict, str, PreferenceDataConfig], RowResult]:
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
