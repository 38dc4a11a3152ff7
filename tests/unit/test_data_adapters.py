"""Sources (locations, file kinds, errors) and format adapters (rows -> conversations, bad rows)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rlhf_cli.config.schema import DataConfig
from rlhf_cli.data import BadRow, adapt_rows, load_rows, sources
from rlhf_cli.errors import DataError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "data"
DOLLY = FIXTURES / "dolly.jsonl"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def adapt(path: Path, fmt: str, **cfg):
    return adapt_rows(load_rows(str(path), "train", None), DataConfig(source=str(path), format=fmt, **cfg))


# ---------------------------------------------------------------- sources


def test_jsonl_locations_are_file_and_1_based_line_skipping_blank_lines():
    rows = load_rows(str(DOLLY), "train", None)
    assert [loc for loc, _ in rows] == [f"{DOLLY}:{n}" for n in (1, 2, 3, 4, 5, 7, 8)]
    assert rows[0][1]["response"] == "hello world"
    bad = rows[2][1]
    assert isinstance(bad, BadRow)
    assert bad.location == f"{DOLLY}:3"
    assert bad.reason.startswith("not valid JSON")


def test_json_list_locations_are_0_based_rows():
    rows = load_rows(str(FIXTURES / "alpaca.json"), "train", None)
    assert [loc for loc, _ in rows] == [f"{FIXTURES / 'alpaca.json'}:row {i}" for i in range(4)]
    assert rows[1][1] == {"instruction": "repeat this", "input": "a b c", "output": "a b c"}


def test_gzipped_jsonl_and_non_object_lines(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    rows = load_rows(str(path), "train", None)
    assert rows[0] == (f"{path}:1", {"prompt": "a", "response": "b"})
    assert rows[1][1] == BadRow(f"{path}:2", "expected a JSON object, got list")


def test_json_file_holding_json_lines_is_read_line_by_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    assert [loc for loc, _ in load_rows(str(path), "train", None)] == [f"{path}:1", f"{path}:2"]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["a", "c"], "response": ["b", "d"]}), path)
    assert load_rows(str(path), "train", None) == [
        (f"{path}:row 0", {"prompt": "a", "response": "b"}),
        (f"{path}:row 1", {"prompt": "c", "response": "d"}),
    ]


def test_missing_file_names_the_path():
    with pytest.raises(DataError, match=r"file not found: data/nope\.jsonl"):
        load_rows("data/nope.jsonl", "train", None)


def test_builtin_reads_the_package_asset(tmp_path, monkeypatch):
    (tmp_path / "tiny.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    monkeypatch.setattr(sources, "ASSETS_DIR", tmp_path)
    assert load_rows("builtin:tiny", "train", None) == [
        (f"{tmp_path / 'tiny.jsonl'}:1", {"prompt": "a", "response": "b"})
    ]
    with pytest.raises(DataError, match=r"no built-in dataset 'builtin:nope'.*Available: builtin:tiny"):
        load_rows("builtin:nope", "train", None)


def test_single_file_other_split_must_be_a_file_path(tmp_path):
    with pytest.raises(DataError, match=r"only the 'train' split.*data.eval_split=null"):
        load_rows(str(DOLLY), "validation", None)
    other = tmp_path / "eval.jsonl"
    other.write_text('{"prompt": "a", "response": "b"}\n')
    assert load_rows(str(DOLLY), str(other), None) == [(f"{other}:1", {"prompt": "a", "response": "b"})]


# ---------------------------------------------------------------- row formats


def test_dolly_rows_and_bad_rows():
    out = adapt(DOLLY, "dolly")
    assert out.conversations == [
        (f"{DOLLY}:1", [user("say hello"), assistant("hello world")]),
        (f"{DOLLY}:2", [user("say it\n\nthe world is big"), assistant("big world")]),
        (f"{DOLLY}:7", [user("how are you"), assistant("fine thanks")]),
    ]
    assert [(b.location, b.reason) for b in out.bad_rows[1:]] == [
        (f"{DOLLY}:4", "missing field 'response'"),
        (f"{DOLLY}:5", "field 'response' is empty"),
        (f"{DOLLY}:8", "field 'instruction' must be a string, got int"),
    ]
    assert out.bad_rows[0].location == f"{DOLLY}:3"


def test_alpaca_rows_and_bad_rows():
    path = FIXTURES / "alpaca.json"
    out = adapt(path, "alpaca")
    assert [conv for _, conv in out.conversations] == [
        [user("say hello"), assistant("hello world")],
        [user("repeat this\n\na b c"), assistant("a b c")],
    ]
    assert [str(b) for b in out.bad_rows] == [
        f"{path}:row 2: field 'output' must be a string, got int",
        f"{path}:row 3: empty prompt: 'instruction' and 'input' are both empty",
    ]


def test_generic_jsonl_messages_and_prompt_response():
    path = FIXTURES / "messages.jsonl"
    out = adapt(path, "jsonl")
    assert [conv for _, conv in out.conversations] == [
        [
            {"role": "system", "content": "be brief"},
            user("hi"),
            assistant("hello"),
            user("how are you"),
            assistant("fine thanks"),
        ],
        [user("say hello"), assistant("hello world")],
        [user("say it"), assistant("it")],
    ]
    assert [str(b) for b in out.bad_rows] == [
        f"{path}:4: 'messages' must end with an assistant message",
        f"{path}:5: 'messages[0]' needs a 'role' of system/user/assistant",
        f"{path}:6: missing field 'response'",
    ]


def test_system_prompt_is_prepended_unless_the_row_has_one():
    out = adapt(FIXTURES / "messages.jsonl", "jsonl", system_prompt="you help")
    first, second = out.conversations[0][1], out.conversations[1][1]
    assert first[0] == {"role": "system", "content": "be brief"}
    assert second == [{"role": "system", "content": "you help"}, user("say hello"), assistant("hello world")]


def test_unknown_format_lists_the_choices():
    with pytest.raises(DataError, match=r"unknown format 'sharegpt'.*dolly, alpaca, jsonl, oasst1"):
        adapt(DOLLY, "sharegpt")


def test_messages_starting_with_assistant_is_a_bad_row():
    out = adapt_rows(
        [("x:1", {"messages": [assistant("hi"), user("yo"), assistant("ok")]})], DataConfig(format="jsonl")
    )
    assert out.bad_rows == [BadRow("x:1", "the conversation must start with a user or system message")]


# ---------------------------------------------------------------- OASST1 trees


OASST = FIXTURES / "oasst1.jsonl"
BEST_THREAD = [
    user("root question"),
    assistant("best answer"),  # rank 0 beats rank 1 and unranked; text stripped
    user("ranked follow up"),  # ranked prompter child beats the earlier unranked one
    assistant("first tied reply"),  # both unranked: table order decides
]  # ... and the unanswered follow-up after it is cut: a thread ends on an assistant message


def test_oasst1_follows_best_ranked_branch():
    out = adapt(OASST, "oasst1")
    assert out.conversations == [
        (f"{OASST}:1", BEST_THREAD),
        (f"{OASST}:11", [user("wie geht es"), assistant("gut danke")]),
        (f"{OASST}:14", [user("moderated question"), assistant("kept answer")]),  # deleted rank 0 skipped
    ]
    assert out.skipped == {"prompt has no usable assistant reply": 1}
    assert [str(b) for b in out.bad_rows] == [
        f"{OASST}:17: a root message (no parent_id) must have role 'prompter'",
        f"{OASST}:18: parent message 'missing' not found",
    ]


def test_oasst1_language_filter():
    out = adapt(OASST, "oasst1", languages=["en"])
    assert [loc for loc, _ in out.conversations] == [f"{OASST}:1", f"{OASST}:14"]
    assert out.skipped == {"prompt has no usable assistant reply": 1, "language not in data.languages": 1}
    out = adapt(OASST, "oasst1", languages=["de"])
    assert [conv for _, conv in out.conversations] == [[user("wie geht es"), assistant("gut danke")]]


def test_oasst1_rank_ties_and_bad_fields():
    rows = [
        ("t:1", {"message_id": "r", "parent_id": None, "role": "prompter", "text": "q", "rank": None}),
        ("t:2", {"message_id": "u", "parent_id": "r", "role": "assistant", "text": "unranked", "rank": None}),
        ("t:3", {"message_id": "s", "parent_id": "r", "role": "assistant", "text": "second", "rank": 2.0}),
        ("t:4", {"message_id": "b", "parent_id": "r", "role": "assistant", "text": "best", "rank": 1}),
        ("t:5", {"message_id": "b2", "parent_id": "r", "role": "assistant", "text": "tie later", "rank": 1}),
        ("t:6", {"message_id": "x", "parent_id": "r", "role": "bot", "text": "?"}),
        ("t:7", {"message_id": "b", "parent_id": "r", "role": "assistant", "text": "dup"}),
        ("t:8", BadRow("t:8", "not valid JSON")),
    ]
    out = adapt_rows(rows, DataConfig(format="oasst1"))
    assert out.conversations == [("t:1", [user("q"), assistant("best")])]
    assert [str(b) for b in out.bad_rows] == [
        "t:6: field 'role' must be 'prompter' or 'assistant', got 'bot'",
        "t:7: duplicate message_id 'b'",
        "t:8: not valid JSON",
    ]


def test_bad_row_str_and_equality():
    assert str(BadRow("f.jsonl:3", "x")) == "f.jsonl:3: x"
    assert BadRow("a", "b") == BadRow("a", "b")
    assert json.dumps({"r": str(BadRow("a", "b"))})  # what the report stores is plain text
