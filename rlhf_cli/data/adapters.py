"""Turning raw rows into conversations.

A conversation is `list[{"role": "system"|"user"|"assistant", "content": str}]` that ends with an assistant
message; the last assistant message is the response the SFT loss trains on (earlier ones too, see sft.py).

`FORMATS` maps `data.format` to a table adapter `(rows, data_cfg) -> Adapted`. Most formats map one row to one
conversation (`_rowwise`); OASST1 is a flat message table whose conversations are paths through reply trees,
so its adapter sees the whole table.

Text fields (instruction, response, oasst text...) lose surrounding whitespace, which in these datasets is
stray formatting that would otherwise be trained before the end-of-turn token; `messages` lists are taken
verbatim, since whoever wrote them chose every character.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rlhf_cli.config.schema import DataConfig
from rlhf_cli.data.sources import BadRow, Row
from rlhf_cli.errors import DataError

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")


@dataclass
class Adapted:
    """What an adapter made of a table: conversations with their source location, and the rejects."""

    conversations: list[tuple[str, Conversation]] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    # Well-formed data that is deliberately not used (e.g. another language), counted per reason.
    skipped: dict[str, int] = field(default_factory=dict)


def adapt_rows(rows: list[tuple[str, Row]], data_cfg: DataConfig) -> Adapted:
    """Apply the `data.format` adapter to (location, row) pairs, then prepend `data.system_prompt`."""
    adapter = FORMATS.get(data_cfg.format)
    if adapter is None:
        raise DataError(f"data.format: unknown format '{data_cfg.format}'. Choose one of: {', '.join(FORMATS)}.")
    adapted = adapter(rows, data_cfg)
    if data_cfg.system_prompt:
        adapted.conversations = [
            (loc, with_system_prompt(conv, data_cfg.system_prompt)) for loc, conv in adapted.conversations
        ]
    return adapted


def with_system_prompt(conv: Conversation, system_prompt: str) -> Conversation:
    """Prepend a system message, unless the row brings its own (the row's is more specific)."""
    if conv and conv[0]["role"] == "system":
        return conv
    return [{"role": "system", "content": system_prompt}, *conv]


# ---------------------------------------------------------------- row-wise formats


def dolly_row(row: dict, location: str) -> Conversation:
    """databricks-dolly-15k: instruction, optional context, response."""
    instruction = _text(row, "instruction", location)
    context = _text(row, "context", location, required=False)
    response = _text(row, "response", location)
    return _prompt_response(_join(instruction, context), response)


def alpaca_row(row: dict, location: str) -> Conversation:
    """Stanford Alpaca: instruction, optional input, output."""
    instruction = _text(row, "instruction", location, required=False)
    extra = _text(row, "input", location, required=False)
    output = _text(row, "output", location)
    prompt = _join(instruction, extra)
    if not prompt:
        raise BadRow(location, "empty prompt: 'instruction' and 'input' are both empty")
    return _prompt_response(prompt, output)


def jsonl_row(row: dict, location: str) -> Conversation:
    """Generic rows: `messages` (a full conversation), or `prompt` + `response` (alias `completion`).

    `prompt` may be a string or a list of messages; `response` a string or a list of assistant messages.
    """
    if "messages" in row:
        conv = check_messages(row["messages"], location, "messages")
    else:
        conv = _prompt_response_messages(row, location)
    if conv[0]["role"] == "assistant":
        raise BadRow(location, "the conversation must start with a user or system message")
    return conv


def _prompt_response_messages(row: dict, location: str) -> Conversation:
    if "prompt" not in row:
        raise BadRow(location, "expected a 'messages' field or 'prompt' and 'response' fields")
    response_key = "response" if "response" in row or "completion" not in row else "completion"
    prompt, response = row["prompt"], row.get(response_key)
    if isinstance(prompt, list):
        prompt_msgs = check_messages(prompt, location, "prompt", final_assistant=False)
    else:
        prompt_msgs = [{"role": "user", "content": _text(row, "prompt", location)}]
    if isinstance(response, list):
        response_msgs = check_messages(response, location, response_key)
    else:
        response_msgs = [{"role": "assistant", "content": _text(row, response_key, location)}]
    return prompt_msgs + response_msgs


def check_messages(value: object, location: str, name: str, final_assistant: bool = True) -> Conversation:
    """Validate a role/content message list; keep only those two keys so templates see clean input."""
    if not isinstance(value, list) or not value:
        raise BadRow(location, f"'{name}' must be a non-empty list of messages")
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise BadRow(location, f"'{name}[{i}]' needs a 'role' of {'/'.join(ROLES)}")
        content = msg.get("content")
        if not isinstance(content, str):
            raise BadRow(location, f"'{name}[{i}].content' must be a string, got {type(content).__name__}")
        if not content.strip():
            raise BadRow(location, f"'{name}[{i}]' is an empty {msg['role']} message")
        messages.append({"role": msg["role"], "content": content})
    if final_assistant and messages[-1]["role"] != "assistant":
        raise BadRow(location, f"'{name}' must end with an assistant message")
    return messages


def _text(row: dict, key: str, location: str, required: bool = True) -> str:
    """A string field, stripped; optional fields may be missing or null (then empty)."""
    value = row.get(key)
    if value is None and not required:
        return ""
    if key not in row:
        raise BadRow(location, f"missing field '{key}'")
    if not isinstance(value, str):
        raise BadRow(location, f"field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise BadRow(location, f"field '{key}' is empty")
    return value.strip()


def _join(instruction: str, extra: str) -> str:
    # The extra context goes after the instruction, separated by a blank line (Dolly/Alpaca convention).
    return f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra


def _prompt_response(prompt: str, response: str) -> Conversation:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _rowwise(fn: Callable[[dict, str], Conversation]) -> Callable[[list[tuple[str, Row]], DataConfig], Adapted]:
    """Lift a one-row adapter to a table adapter that collects BadRows instead of stopping."""

    def adapt(rows: list[tuple[str, Row]], data_cfg: DataConfig) -> Adapted:
        out = Adapted()
        for location, row in rows:
            try:
                if isinstance(row, BadRow):
                    raise row
                out.conversations.append((location, fn(row, location)))
            except BadRow as bad:
                out.bad_rows.append(bad)
        return out

    adapt.__doc__ = fn.__doc__
    return adapt


# ---------------------------------------------------------------- OASST1 message trees


@dataclass
class _Message:
    location: str
    order: int  # position in the table; breaks rank ties
    message_id: str
    parent_id: str | None
    role: str  # "prompter" | "assistant"
    text: str
    rank: float | None
    lang: str | None
    usable: bool  # False when deleted or rejected in review: the message and its subtree are not used


def oasst1_table(rows: list[tuple[str, Row]], data_cfg: DataConfig) -> Adapted:
    """OpenAssistant/oasst1: one thread per root prompt, following the best-ranked replies.

    From each root prompter message: take its best assistant reply (lowest rank; unranked last; ties by table
    order), then that reply's best prompter follow-up, and so on; the thread ends on an assistant message.
    Threads whose root language is not in `data.languages` (when non-empty) are skipped.
    """
    out = Adapted()
    messages: dict[str, _Message] = {}
    for order, (location, row) in enumerate(rows):
        try:
            msg = _oasst_message(row, location, order)
            if msg.message_id in messages:
                raise BadRow(location, f"duplicate message_id '{msg.message_id}'")
            messages[msg.message_id] = msg
        except BadRow as bad:
            out.bad_rows.append(bad)
    children: dict[str, list[_Message]] = {}
    for msg in messages.values():
        if msg.parent_id is None:
            continue
        if msg.parent_id not in messages:
            out.bad_rows.append(BadRow(msg.location, f"parent message '{msg.parent_id}' not found"))
            continue
        children.setdefault(msg.parent_id, []).append(msg)
    languages = set(data_cfg.languages)
    for root in messages.values():
        if root.parent_id is not None:
            continue
        reason = _skip_reason(root, languages)
        thread = [] if reason else _thread(root, children)
        if not reason and not thread:
            reason = "prompt has no usable assistant reply"
        if reason:
            out.skipped[reason] = out.skipped.get(reason, 0) + 1
        else:
            out.conversations.append((root.location, thread))
    return out


def _oasst_message(row: Row, location: str, order: int) -> _Message:
    if isinstance(row, BadRow):
        raise row
    for key in ("message_id", "text"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise BadRow(location, f"field '{key}' must be a non-empty string")
    parent_id, rank, lang = row.get("parent_id"), row.get("rank"), row.get("lang")
    if parent_id is not None and not isinstance(parent_id, str):
        raise BadRow(location, f"field 'parent_id' must be a string or null, got {type(parent_id).__name__}")
    role = row.get("role")
    if role not in ("prompter", "assistant"):
        raise BadRow(location, f"field 'role' must be 'prompter' or 'assistant', got {role!r}")
    if parent_id is None and role != "prompter":
        raise BadRow(location, "a root message (no parent_id) must have role 'prompter'")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
        raise BadRow(location, f"field 'rank' must be a number or null, got {type(rank).__name__}")
    usable = row.get("deleted") is not True and row.get("review_result") is not False
    return _Message(location, order, row["message_id"], parent_id, role, row["text"].strip(), rank, lang, usable)


def _skip_reason(root: _Message, languages: set[str]) -> str | None:
    if not root.usable:
        return "prompt deleted or rejected in review"
    if languages and root.lang not in languages:
        return "language not in data.languages"
    return None


def _thread(root: _Message, children: dict[str, list[_Message]]) -> Conversation:
    """The best-ranked path below `root`, cut after its last assistant message ([] if it has none)."""
    path = [root]
    wanted = "assistant"
    while True:
        candidates = [c for c in children.get(path[-1].message_id, []) if c.role == wanted and c.usable]
        if not candidates:
            break
        # Lowest rank wins; unranked replies come after ranked ones; table order breaks ties.
        path.append(min(candidates, key=lambda m: (m.rank is None, m.rank or 0, m.order)))
        wanted = "prompter" if wanted == "assistant" else "assistant"
    while path and path[-1].role != "assistant":
        path.pop()
    return [{"role": "user" if m.role == "prompter" else "assistant", "content": m.text} for m in path]


FORMATS: dict[str, Callable[[list[tuple[str, Row]], DataConfig], Adapted]] = {
    "dolly": _rowwise(dolly_row),
    "alpaca": _rowwise(alpaca_row),
    "jsonl": _rowwise(jsonl_row),
    "oasst1": oasst1_table,
}
