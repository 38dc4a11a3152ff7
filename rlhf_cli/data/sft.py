"""SFT data: conversations -> token ids with assistant-only labels -> right-padded batches.

Labels are *not* shifted here: `labels[t]` is the target for position t, the same length as `input_ids`, and
the loss shifts logits/labels (docs/algorithms.md section 1.2). -100 marks tokens without loss: system/user turns, the
template's role headers, separators after an end-of-turn token, and padding.

Examples longer than `data.max_length` are dropped (`drop`), have their last response cut (`truncate_response`),
or lose the oldest exchanges of their prompt (`truncate_prompt`, `cut_oldest_turns`: whole turns, re-rendered,
never raw tokens, so the template's BOS/system header and the final assistant header stay in place).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2

from rlhf_cli.config.schema import DataConfig
from rlhf_cli.data.adapters import Conversation, adapt_rows
from rlhf_cli.data.report import (  # noqa: F401 (the names the other data modules and the tests read from here)
    BOUNDARY_MERGE,
    EMPTY_TURN,
    MAX_BAD_ROW_SAMPLES,
    NO_ROOM,
    NO_TARGETS,
    PROMPT_TRUNCATED,
    REPLY_CHANGED,
    RESPONSE_TRUNCATED,
    SHORT_AFTER_TRUNCATION,
    SPECIAL_TEXT,
    TOO_LONG,
    DataReport,
    DropExample,
)
from rlhf_cli.data.sources import load_rows
from rlhf_cli.errors import DataError

IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("drop", "truncate_response", "truncate_prompt")
BAD_ROW_POLICIES = ("skip", "fail")

if TYPE_CHECKING:  # torch loads with the first batch, so `explain` and config checks stay light
    import torch


@dataclass
class SFTExample:
    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,), IGNORE_INDEX where no loss; unshifted
    prompt_truncated: bool = False  # oldest exchanges cut (data.truncation=truncate_prompt)
    response_truncated: bool = False  # the reply cut at max_length, its EOS lost (data.truncation=truncate_response)


@dataclass
class SFTData:
    train: list[SFTExample]
    eval: list[SFTExample]
    report: DataReport


# ---------------------------------------------------------------- one conversation


def tokenize_conversation(
    tokenizer, messages: Conversation, max_length: int, truncation: str = "drop", min_response_tokens: int = 1
) -> SFTExample:
    """Render `messages` with the tokenizer's chat template; label every assistant turn, mask the rest.

    Longer than `max_length`: `truncate_prompt` cuts the oldest exchanges before the last reply (`recent_turns`);
    that reply keeps exactly the ids and labels it has after the whole conversation, so it is never cut.
    Raises DropExample(reason) when the example must be left out, DataError when the template cannot be used.
    """
    if not messages or messages[-1]["role"] != "assistant" or messages[0]["role"] == "assistant":
        raise ValueError("a conversation must start with a user/system message and end with an assistant message")
    _reject_special_text(tokenizer, messages)
    ids, labels, prompt_len = _render_with_labels(tokenizer, messages)
    truncated = truncation == "truncate_prompt" and len(ids) > max_length
    if truncated:
        reply = (ids[prompt_len:], labels[prompt_len:])
        kept = recent_turns(tokenizer, messages[:-1], len(reply[0]), max_length)
        ids, labels, prompt_len = _render_with_labels(tokenizer, [*kept, messages[-1]])
        if (ids[prompt_len:], labels[prompt_len:]) != reply:
            raise DropExample(REPLY_CHANGED)  # a template that renders the reply after its history differently
    cut = len(ids) > max_length
    ids, labels = _fit(ids, labels, prompt_len, max_length, truncation, min_response_tokens)
    if all(label == IGNORE_INDEX for label in labels):
        raise DropExample(NO_TARGETS)  # an example without targets adds nothing but a 0/0 to the loss
    return SFTExample(ids, labels, truncated, response_truncated=cut)


def _render_with_labels(tokenizer, messages: Conversation) -> tuple[list[int], list[int], int]:
    """Token ids, labels, and where the last assistant turn starts (everything before it is the prompt).

    Each assistant turn is found by prefix difference: the tokens that rendering messages[:i+1] adds to
    rendering messages[:i] with the generation prompt (so the role header stays in the masked prefix).
    """
    ids: list[int] = []
    labels: list[int] = []
    prompt_len = 0
    previous = (messages[:0], False)  # what `ids` is the rendering of
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        _require_prefix(tokenizer, ids, prefix, previous, (messages[:i], True))
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        _require_prefix(tokenizer, prefix, full, (messages[:i], True), (messages[: i + 1], False))
        if len(full) == len(prefix):
            raise DropExample(EMPTY_TURN)
        labels += [IGNORE_INDEX] * (len(prefix) - len(ids)) + _turn_labels(full[len(prefix) :], tokenizer.eos_token_id)
        ids, prompt_len, previous = full, len(prefix), (messages[: i + 1], False)
    if tokenizer.eos_token_id not in ids[prompt_len:]:
        # The template ends the turn with something other than EOS (or nothing): the model must still learn
        # to stop, so EOS is appended and trained (docs/algorithms.md section 1.5, "EOS is trained").
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token, and the chat template does not end turns with one.")
        ids = ids + [tokenizer.eos_token_id]
        labels = labels + [tokenizer.eos_token_id]
    return ids, labels, prompt_len


def _turn_labels(turn: list[int], eos_id: int | None) -> list[int]:
    """Labels of one assistant turn: all of it up to and including its last EOS; separators after it masked."""
    if eos_id is None or eos_id not in turn:
        return list(turn)
    end = len(turn) - turn[::-1].index(eos_id)
    return list(turn[:end]) + [IGNORE_INDEX] * (len(turn) - end)


def _fit(ids, labels, prompt_len, max_length, truncation, min_response_tokens) -> tuple[list[int], list[int]]:
    """Apply `data.max_length` with the `data.truncation` policy (`truncate_prompt` has already cut the prompt)."""
    if prompt_len >= max_length:
        raise DropExample(NO_ROOM)
    if len(ids) <= max_length:
        return ids, labels
    if truncation != "truncate_response":
        raise DropExample(TOO_LONG)
    # truncate_response: keep the whole prompt, cut the last response (it then has no EOS, as in generation).
    ids, labels = ids[:max_length], labels[:max_length]
    if sum(label != IGNORE_INDEX for label in labels[prompt_len:]) < min_response_tokens:
        raise DropExample(SHORT_AFTER_TRUNCATION)
    return ids, labels


def recent_turns(tokenizer, prompt: Conversation, reply_len: int, max_length: int) -> Conversation:
    """`prompt` with its oldest exchanges cut (`cut_oldest_turns`) so that it and a reply of `reply_len` tokens fit
    `max_length` tokens. When the system prompt and the final user turn alone do not leave room, the example is
    dropped with the reason `drop` gives: DropExample(NO_ROOM) if they fill max_length, else DropExample(TOO_LONG)."""
    kept, ids = cut_oldest_turns(tokenizer, prompt, max_length - reply_len)
    if len(ids) + reply_len > max_length:
        raise DropExample(NO_ROOM if len(ids) >= max_length else TOO_LONG)
    return kept


def cut_oldest_turns(tokenizer, prompt: Conversation, budget: int) -> tuple[Conversation, list[int]]:
    """The longest tail of `prompt` whose rendering with the generation prompt has at most `budget` ids.

    prompt: messages ending with the user turn a reply answers. Returns (kept messages, their ids (P,)). A leading
    system message is always kept; after it a tail starts at a user message, so each cut removes the oldest whole
    exchange (a user message and the replies to it) and the result is a well-formed chat that still ends with the
    assistant header. Whole turns are cut and the tail is rendered again, never raw tokens from the left, which
    would take the template's BOS/system header with them. The final user message is never shortened: it is the
    question the reply answers (and the text a reward function reads), and a reply to half a question is a wrong
    label. When even the system prompt and that final turn exceed `budget`, that shortest tail is returned, longer
    than `budget`, for the caller to drop the example with its reason.
    """
    head = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    # Oldest first: the first tail that fits keeps the most context (each later tail renders shorter).
    starts = [i for i in range(len(head), len(prompt)) if prompt[i]["role"] == "user"] or [len(head)]
    for start in starts:
        kept = head + prompt[start:]
        ids = _render(tokenizer, kept, add_generation_prompt=True)
        if len(ids) <= budget:
            break
    return kept, ids


def _render(tokenizer, messages: Conversation, add_generation_prompt: bool, tokenize: bool = True) -> Any:
    """Token ids (list[int]) of the chat-template rendering, or its text when tokenize=False."""
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    except jinja2.TemplateError as err:
        # Templates call raise_exception() for conversations they refuse (roles not alternating, system role
        # unsupported...): a property of the row (or of every row, which the final report then shows).
        raise DropExample(f"chat template rejected the conversation: {err}") from err
    if not tokenize:
        return out
    if isinstance(out, Mapping):  # transformers 5 returns a BatchEncoding unless return_dict=False is honoured
        out = out["input_ids"]
    return list(out)


def _require_prefix(tokenizer, shorter: list[int], longer: list[int], short_spec: tuple, long_spec: tuple) -> None:
    """Check the prefix-difference premise: rendering more messages only appends tokens.

    `short_spec` / `long_spec` are the (messages, add_generation_prompt) that gave `shorter` / `longer`; they are
    rendered as text only on failure, to tell a template that rewrites history from a tokenizer merge.
    """
    if longer[: len(shorter)] == shorter:
        return
    text_short = _render(tokenizer, *short_spec, tokenize=False) if short_spec[0] else ""
    text_long = _render(tokenizer, *long_spec, tokenize=False)
    if text_long.startswith(text_short):
        # Same text, different tokens: the tokenizer merged characters across the turn boundary (e.g. two
        # newlines). Specific to this row's text, so drop it rather than stop the run.
        raise DropExample(BOUNDARY_MERGE)
    raise DataError(
        "the chat template is not prefix-stable: rendering a conversation with one more turn changes the "
        f"earlier turns (at {len(long_spec[0])} messages), so assistant tokens cannot be located for the loss mask. "
        "Templates that rewrite history (e.g. strip earlier reasoning) are not supported for SFT; set "
        "model.chat_template to a template that renders each turn the same way whatever follows it."
    )


def _reject_special_text(tokenizer, messages: Conversation) -> None:
    # Text such as "<|end|>" inside a message would be encoded as the control token itself, teaching the model
    # to stop mid-answer (or breaking the turn structure).
    specials = set(tokenizer.all_special_tokens)
    specials.update(tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special)
    specials.discard("")
    if any(s in msg["content"] for msg in messages for s in specials):
        raise DropExample(SPECIAL_TEXT)


# ---------------------------------------------------------------- datasets


def build_sft_datasets(data_cfg: DataConfig, tokenizer, seed: int) -> SFTData:
    """Read, adapt, split and tokenize the SFT data described by `data_cfg`; report what was left out."""
    _check_config(data_cfg, tokenizer)
    train, evals, report = build_splits(
        data_cfg,
        seed,
        lambda split, report, dropped: _read_conversations(data_cfg, split, report, dropped),
        split_eval,
        lambda items, dropped: _tokenize_all(tokenizer, items, data_cfg, dropped),
        "no training example left",
        "data.format, data.max_length / data.truncation",
    )
    return SFTData(train, evals, report)


def build_splits(
    data_cfg: Any,
    seed: int,
    read: Callable[[str, DataReport, dict], list],
    split: Callable[[list, float, int], tuple],
    tokenize: Callable[[list, dict], list],
    nothing_left: str,
    check: str,
) -> tuple[list, list, DataReport]:
    """The shape every data builder shares: `read(split, report, dropped)` the train split, then the eval split or a
    seeded held-out fraction (`split(items, fraction, seed)`), cap the training items at data.max_samples,
    `tokenize(items, dropped)` both; drops are counted per reason in the report, and so are the examples kept with
    their prompt or response cut (`prompt_truncated`, `response_truncated`). DataError when no training example is
    left (`nothing_left` says what, `check` which settings to look at)."""
    report = DataReport()
    items = read(data_cfg.split, report, report.dropped)
    if data_cfg.eval_split:
        train_items, eval_items = items, read(data_cfg.eval_split, report, report.eval_dropped)
    else:
        train_items, eval_items = split(items, data_cfg.eval_fraction, seed)
    if data_cfg.max_samples is not None:
        train_items = train_items[: data_cfg.max_samples]
    train, evals = tokenize(train_items, report.dropped), tokenize(eval_items, report.eval_dropped)
    report.train_examples, report.eval_examples = len(train), len(evals)
    for examples, truncated in ((train, report.truncated), (evals, report.eval_truncated)):
        for what, n_cut in (
            (PROMPT_TRUNCATED, sum(ex.prompt_truncated for ex in examples)),
            (RESPONSE_TRUNCATED, sum(getattr(ex, "response_truncated", False) for ex in examples)),
        ):
            if n_cut:
                truncated[what] = n_cut
    if not train:
        raise DataError(
            f"{nothing_left} from data.source={data_cfg.source} (split {data_cfg.split}).\n{report.summary()}\n"
            f"Check {check}, and the rows themselves."
        )
    return train, evals, report


def _check_config(data_cfg: DataConfig, tokenizer) -> None:
    if data_cfg.truncation not in TRUNCATION_POLICIES:
        raise DataError(f"data.truncation: '{data_cfg.truncation}' is not one of {', '.join(TRUNCATION_POLICIES)}.")
    if data_cfg.bad_rows not in BAD_ROW_POLICIES:
        raise DataError(f"data.bad_rows: '{data_cfg.bad_rows}' is not one of {', '.join(BAD_ROW_POLICIES)}.")
    if not 0.0 <= data_cfg.eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction: {data_cfg.eval_fraction} must be in [0, 1).")
    if data_cfg.max_length < 2:
        raise DataError(f"data.max_length: {data_cfg.max_length} leaves no room for a prompt and a response.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template; set model.chat_template to a Jinja chat template.")


def _read_conversations(
    data_cfg: DataConfig, split: str, report: DataReport, dropped: dict[str, int]
) -> list[tuple[str, Conversation]]:
    return read_split(data_cfg, split, report, dropped, adapt_rows).conversations


def read_split(data_cfg: Any, split: str, report: DataReport, dropped: dict[str, int], adapt: Callable) -> Any:
    """Load one split, `adapt(rows, data_cfg)` its rows and apply the `data.bad_rows` policy; rows the format
    filtered out are counted in `dropped`. Returns what the adapter made (conversations or pairs, and the rejects)."""
    rows = load_rows(data_cfg.source, split, data_cfg.subset)
    report.rows_read += len(rows)
    adapted = adapt(rows, data_cfg)
    apply_bad_row_policy(adapted.bad_rows, adapted.skipped, data_cfg.bad_rows, report, dropped)
    return adapted


def apply_bad_row_policy(
    bad_rows: list, skipped: dict[str, int], policy: str, report: DataReport, dropped: dict[str, int]
) -> None:
    """`fail`: raise on the first bad row, naming its location; `skip`: count them (and keep a few samples
    for the report). Well-formed rows a format filtered out (`skipped`) are counted in `dropped`."""
    if bad_rows and policy == "fail":
        first = bad_rows[0]
        raise DataError(
            f"bad row at {first.location}: {first.reason} ({len(bad_rows)} bad rows in this split). "
            "Fix the row, or set data.bad_rows=skip to skip such rows."
        )
    report.bad_rows += len(bad_rows)
    room = MAX_BAD_ROW_SAMPLES - len(report.bad_row_samples)
    report.bad_row_samples += [str(bad) for bad in bad_rows[: max(room, 0)]]
    for reason, n in skipped.items():
        dropped[reason] = dropped.get(reason, 0) + n


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(fraction * n) items (at least 1 when fraction > 0 and n >= 2, never all) with a seeded RNG.

    Both parts keep the input order; the same seed and input give the same split.
    """
    n = len(items)
    if fraction <= 0 or n < 2:
        return list(items), []
    n_eval = min(n - 1, max(1, round(n * fraction)))
    held_out = set(random.Random(seed).sample(range(n), n_eval))
    train = [item for i, item in enumerate(items) if i not in held_out]
    evals = [item for i, item in enumerate(items) if i in held_out]
    return train, evals


def _tokenize_all(
    tokenizer, conversations: list[tuple[str, Conversation]], data_cfg: DataConfig, dropped: dict[str, int]
) -> list[SFTExample]:
    examples = []
    for _, conv in conversations:
        try:
            examples.append(
                tokenize_conversation(
                    tokenizer, conv, data_cfg.max_length, data_cfg.truncation, data_cfg.min_response_tokens
                )
            )
        except DropExample as drop:
            dropped[drop.reason] = dropped.get(drop.reason, 0) + 1
    return examples


# ---------------------------------------------------------------- batching


def collate_sft(examples: list[SFTExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (B, T) with pad_token_id, attention_mask (B, T), labels (B, T) with -100.

    T is the longest example. Padding is placed by length, never found by comparing ids with pad_token_id,
    because pad may equal EOS, and EOS must keep its label (docs/algorithms.md section 1.5).
    """
    import torch

    if not examples:
        raise ValueError("collate_sft needs at least one example")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
