"""Prompt data for PPO: every format from small files (bad rows with file:line under both policies), prompt ids
identical to the preference/SFT prompt ids, length drops or cuts of the oldest turns, system prompt, splits, left-padded
batches, and the built-in prompt sets.

Token-level expectations use the project's tiny tokenizer (pad 0, eos `<|end|>` = 1, template
`<|role|>\\ncontent<|end|>\\n`, generation prompt `<|assistant|>\\n`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import ASSETS, HH_REAL, REPO, assistant, system, user

from rlhf_cli.config.schema import PromptDataConfig
from rlhf_cli.data.adapters import dolly_row
from rlhf_cli.data.preference import tokenize_pair
from rlhf_cli.data.preference_formats import PreferencePair
from rlhf_cli.data.prompts import (
    PROMPT_FORMATS,
    PROMPT_TOO_LONG,
    PromptExample,
    build_prompt_datasets,
    collate_prompts,
    tokenize_prompt,
)
from rlhf_cli.data.sft import PROMPT_TRUNCATED, DropExample
from rlhf_cli.errors import DataError
from rlhf_cli.models.tiny import tiny_tokenizer
from rlhf_cli.tasks.word_order import expected_words

PAD = 0


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_lines(path: Path, rows: list) -> Path:
    """One JSON value per line; a str is written verbatim (for malformed lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def build(tok, path: Path, fmt: str, **cfg):
    cfg = {"eval_fraction": 0.0, **cfg}
    return build_prompt_datasets(PromptDataConfig(source=str(path), format=fmt, **cfg), tok, seed=0)


def bad_lines(report, path: Path) -> dict[int, str]:
    """The report's bad-row samples as {line number: reason}, checking each names `path:LINE`."""
    out = {}
    for sample in report.bad_row_samples:
        where, reason = sample.split(": ", 1)
        file, line = where.rsplit(":", 1)
        assert file == str(path)
        out[int(line)] = reason
    return out


# ---------------------------------------------------------------- formats

JSONL_ROWS = [
    {"prompt": "  What is 2 plus 2?  "},
    {"messages": [system("Be brief."), user("Hi."), assistant("Hello."), user("Name a planet."), assistant("Mars.")]},
    {"messages": [user("Say hi.")], "response": "ignored"},
    {"prompt": [system("Be kind."), user("Tell me a joke.")]},
    {"messages": [assistant("I speak first."), user("Why?")]},
    {"messages": [user("Hi."), assistant("Hello."), assistant("Anyone there?")]},
    {"completion": "no prompt"},
    "{not json",
    {"prompt": ""},
    {"messages": "Hi."},
]


def test_jsonl_prompts_messages_and_bad_rows(tok, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", JSONL_ROWS)
    data = build(tok, path, "jsonl")
    assert [ex.messages for ex in data.train] == [
        [user("What is 2 plus 2?")],  # a string field is stripped, as in SFT
        [system("Be brief."), user("Hi."), assistant("Hello."), user("Name a planet.")],  # final reply dropped
        [user("Say hi.")],
        [system("Be kind."), user("Tell me a joke.")],
    ]
    assert [ex.text for ex in data.train] == ["What is 2 plus 2?", "Name a planet.", "Say hi.", "Tell me a joke."]
    assert data.report.rows_read == 10 and data.report.bad_rows == 6
    assert bad_lines(data.report, path) == {
        5: "'messages' must start with a user or system message",
        6: "'messages' must end with a user message (after dropping a final assistant reply)",
        7: "expected a 'prompt' or a 'messages' field",
        8: "not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        9: "field 'prompt' is empty",
        10: "'messages' must be a non-empty list of messages",
    }
    assert "6 bad rows skipped" in data.report.summary()


def test_bad_rows_fail_policy_names_file_and_line(tok, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", JSONL_ROWS)
    with pytest.raises(DataError, match=rf"bad row at {path}:5: .*must start with a user.*data.bad_rows=skip"):
        build(tok, path, "jsonl", bad_rows="fail")


def test_dolly_and_alpaca_join_like_the_sft_adapters_without_needing_a_reply(tok, tmp_path):
    dolly = write_lines(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Summarize.", "context": " A long text. ", "response": "Short."},
            {"instruction": "What is the capital of France?", "context": ""},
            {"instruction": "Name a color.", "context": None, "category": "open_qa"},
            {"context": "orphan context"},
        ],
    )
    data = build(tok, dolly, "dolly")
    row = {"instruction": "Summarize.", "context": " A long text. ", "response": "Short."}
    assert data.train[0].messages == dolly_row(row, "x")[:1]  # the SFT dolly adapter's user message
    assert [ex.text for ex in data.train] == [
        "Summarize.\n\nA long text.",
        "What is the capital of France?",
        "Name a color.",
    ]
    assert bad_lines(data.report, dolly) == {4: "missing field 'instruction'"}
    alpaca = write_lines(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Translate to French.", "input": "Good morning.", "output": "Bonjour."},
            {"instruction": "", "input": "Only an input."},
            {"instruction": " ", "input": ""},
        ],
    )
    data = build(tok, alpaca, "alpaca")
    assert [ex.text for ex in data.train] == ["Translate to French.\n\nGood morning.", "Only an input."]
    assert bad_lines(data.report, alpaca) == {3: "empty prompt: 'instruction' and 'input' are both empty"}


def test_dialogsum_asks_for_a_summary_of_the_dialogue_column(tok, tmp_path):
    rows = [
        {"id": "train_0", "dialogue": "#Person1#: Hi.\n#Person2#: Hello!", "summary": "They greet.", "topic": "x"},
        {"id": "train_1", "summary": "no dialogue"},
    ]
    path = write_lines(tmp_path / "d.jsonl", rows)
    data = build(tok, path, "dialogsum")
    assert [ex.text for ex in data.train] == ["Summarize the following dialogue.\n\n#Person1#: Hi.\n#Person2#: Hello!"]
    assert bad_lines(data.report, path) == {2: "missing field 'dialogue'"}


def test_preference_formats_give_each_pairs_prompt_once(tok, tmp_path):
    hh = write_lines(
        tmp_path / "hh.jsonl",
        [
            {
                "chosen": "\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: Boil an egg?\n\nAssistant: Nine minutes.",
                "rejected": "\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: Boil an egg?\n\nAssistant: No.",
            },
            {"chosen": "\n\nHuman: Hi.\n\nAssistant: A.", "rejected": "\n\nHuman: Bye.\n\nAssistant: B."},
        ],
    )
    data = build(tok, hh, "hh_rlhf")
    assert [ex.messages for ex in data.train] == [[user("Hi."), assistant("Hello!"), user("Boil an egg?")]]
    assert bad_lines(data.report, hh) == {2: "'chosen' and 'rejected' differ before the final assistant reply"}

    post = {"history": "Best way to learn chess?", "human_ref_A": "Play.", "human_ref_B": "Study.", "labels": 1}
    shp = write_lines(
        tmp_path / "shp.jsonl",
        [
            {**post, "score_A": 15, "score_B": 10},  # a score ratio SHP's pair filter drops: the prompt is kept
            {**post, "human_ref_B": "Read.", "score_A": 30, "score_B": 10},  # a second pair on the same post
            {"history": "Why is the sky blue?", "human_ref_A": "x", "human_ref_B": "y", "labels": 0, "score_A": 1},
        ],
    )
    data = build(tok, shp, "shp")
    assert [ex.text for ex in data.train] == ["Best way to learn chess?"]
    assert data.report.dropped == {"duplicate prompt": 1}
    assert bad_lines(data.report, shp) == {3: "missing field 'score_B'"}

    uf = write_lines(
        tmp_path / "uf.jsonl",
        [
            {
                "prompt": "Say hello.",
                "chosen": [system("Translate."), user("Say hello."), assistant("Bonjour.")],
                "rejected": [system("Translate."), user("Say hello."), assistant("Hola.")],
            },
            {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."},
        ],
    )
    data = build(tok, uf, "ultrafeedback")
    assert [ex.messages for ex in data.train] == [[system("Translate."), user("Say hello.")], [user("What is 2 + 2?")]]


def test_unknown_format_and_bad_settings_raise_naming_the_key(tok, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "Hi."}])
    with pytest.raises(DataError, match="data.format: unknown prompt format 'oasst1'") as err:
        build(tok, path, "oasst1")
    assert ", ".join(PROMPT_FORMATS) in str(err.value)
    assert PROMPT_FORMATS == ("jsonl", "dolly", "alpaca", "dialogsum", "hh_rlhf", "shp", "ultrafeedback")
    for cfg, key in [
        ({"bad_rows": "ignore"}, "data.bad_rows"),
        ({"eval_fraction": 1.0}, "data.eval_fraction"),
        ({"max_prompt_length": 0}, "data.max_prompt_length"),
        ({"max_prompt_length": 12.5}, "data.max_prompt_length"),
        ({"max_samples": 0}, "data.max_samples"),
        ({"truncation": "cut"}, "data.truncation: 'cut' is not one of drop, truncate_prompt"),
    ]:
        with pytest.raises(DataError, match=key):
            build(tok, path, "jsonl", **cfg)


def test_truncate_response_is_refused_for_prompt_data(tok, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "Hi."}])
    with pytest.raises(DataError) as err:
        build(tok, path, "jsonl", truncation="truncate_response")
    assert str(err.value).startswith("data.truncation: truncate_response does not apply to prompt data")
    assert "drop" in str(err.value) and "truncate_prompt" in str(err.value)


# ---------------------------------------------------------------- tokenization


def test_prompt_ids_equal_the_preference_and_sft_prompt_ids(tok, tmp_path):
    conversations = [
        [user("What is 2 plus 2?")],
        [system("Be brief."), user("Hi."), assistant("Hello."), user("Name a planet.")],
    ]
    path = write_lines(tmp_path / "p.jsonl", [{"messages": conv} for conv in conversations])
    data = build(tok, path, "jsonl")
    for ex, conv in zip(data.train, conversations, strict=True):
        pair = tokenize_pair(tok, PreferencePair("x:1", conv, "Yes.", "No."), max_length=512)
        assert ex.input_ids == pair.prompt_ids
        assert tok.decode(ex.input_ids).endswith(f"{conv[-1]['content']}<|end|>\n<|assistant|>\n")


def test_system_prompt_is_prepended_unless_the_row_has_one(tok, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "Hi."}, {"prompt": [system("Be brief."), user("Hey.")]}])
    data = build(tok, path, "jsonl", system_prompt="Answer kindly.")
    assert [ex.messages for ex in data.train] == [
        [system("Answer kindly."), user("Hi.")],
        [system("Be brief."), user("Hey.")],
    ]
    assert (
        tok.decode(data.train[0].input_ids)
        == "<|system|>\nAnswer kindly.<|end|>\n<|user|>\nHi.<|end|>\n<|assistant|>\n"
    )
    assert data.train[0].text == "Hi."


def test_too_long_prompts_are_dropped_and_counted(tok, tmp_path):
    rows = [{"prompt": "Hi."}, {"prompt": "word " * 40}, {"prompt": "Say <|end|> now."}]
    path = write_lines(tmp_path / "p.jsonl", rows)
    limit = len(tok.apply_chat_template([user("Hi.")], add_generation_prompt=True, return_dict=False))
    data = build(tok, path, "jsonl", max_prompt_length=limit)  # a prompt of exactly the limit is kept
    assert [ex.text for ex in data.train] == ["Hi."] and len(data.train[0].input_ids) == limit
    assert data.report.dropped == {"prompt longer than data.max_prompt_length": 1, "text contains a special token": 1}
    assert "prompt longer than data.max_prompt_length x1" in data.report.summary()
    with pytest.raises(DataError, match=r"(?s)no training prompt left .*data.max_prompt_length"):
        build(tok, path, "jsonl", max_prompt_length=limit - 1)


CHAT = [
    user("Hi."),
    assistant("Hello."),
    user("Tell me about space."),
    assistant("Space is big."),
    user("Name a planet."),
]


def test_truncate_prompt_keeps_the_final_turns(tok):
    def render(conv):
        return tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=False)

    limit = len(render(CHAT[2:]))
    ex = tokenize_prompt(tok, CHAT, limit, truncation="truncate_prompt")
    assert ex == PromptExample(render(CHAT[2:]), "Name a planet.", CHAT[2:], prompt_truncated=True)
    assert tok.decode(ex.input_ids) == (
        "<|user|>\nTell me about space.<|end|>\n<|assistant|>\nSpace is big.<|end|>\n"
        "<|user|>\nName a planet.<|end|>\n<|assistant|>\n"
    )
    # The ids are those a preference pair on the same conversation gets under the same cut, so PPO generates
    # after exactly the prompt the reward model was trained on.
    pair = PreferencePair("x", CHAT, "Mars.", "A fish.")
    whole = tokenize_pair(tok, pair, max_length=512)
    longer = max(len(whole.chosen_ids), len(whole.rejected_ids))
    assert tokenize_pair(tok, pair, max_length=limit + longer, truncation="truncate_prompt").prompt_ids == ex.input_ids
    assert tokenize_prompt(tok, CHAT, limit - 1, truncation="truncate_prompt").messages == CHAT[-1:]
    for max_prompt_length, truncation in ((len(render(CHAT[-1:])) - 1, "truncate_prompt"), (limit, "drop")):
        with pytest.raises(DropExample) as err:  # the final user message is never shortened
            tokenize_prompt(tok, CHAT, max_prompt_length, truncation)
        assert err.value.reason == PROMPT_TOO_LONG


def test_truncated_prompts_are_counted_in_the_report(tok, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"messages": CHAT}, {"prompt": "Hi."}])
    limit = len(tok.apply_chat_template(CHAT[2:], add_generation_prompt=True, return_dict=False))
    data = build(tok, path, "jsonl", max_prompt_length=limit, truncation="truncate_prompt")
    assert [(ex.messages, ex.prompt_truncated) for ex in data.train] == [(CHAT[2:], True), ([user("Hi.")], False)]
    assert data.report.dropped == {} and data.report.truncated == {PROMPT_TRUNCATED: 1}
    assert "\ntruncated: prompt cut to its final turns x1" in data.report.summary()
    data = build(tok, path, "jsonl", max_prompt_length=limit)  # drop, the default
    assert (data.report.dropped, data.report.truncated) == ({PROMPT_TOO_LONG: 1}, {})


def test_eval_fraction_eval_split_and_max_samples(tok, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": f"Question {i}?"} for i in range(20)])
    data = build(tok, path, "jsonl", eval_fraction=0.25)
    assert (len(data.train), len(data.eval)) == (15, 5)
    assert (data.report.train_examples, data.report.eval_examples) == (15, 5)
    assert not {ex.text for ex in data.train} & {ex.text for ex in data.eval}
    again = build(tok, path, "jsonl", eval_fraction=0.25)
    assert [ex.text for ex in again.eval] == [ex.text for ex in data.eval]  # seeded
    capped = build(tok, path, "jsonl", eval_fraction=0.25, max_samples=4)
    assert (len(capped.train), len(capped.eval)) == (4, 5)  # the cap applies to train only
    held = write_lines(tmp_path / "eval.jsonl", [{"prompt": "Held out?"}, {"prompt": "Also held out?"}])
    split = build(tok, path, "jsonl", eval_split=str(held), eval_fraction=0.25)
    assert (len(split.train), [ex.text for ex in split.eval]) == (20, ["Held out?", "Also held out?"])
    assert split.report.rows_read == 22


# ---------------------------------------------------------------- batching


def test_collate_left_pads_and_masks_from_lengths():
    examples = [
        PromptExample([5, 6, 7], "a", [user("a")]),
        PromptExample([8], "b", [user("b")]),
        PromptExample([PAD, 9], "c", [user("c")]),  # a real token equal to pad keeps mask 1
    ]
    batch = collate_prompts(examples, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8], [PAD, PAD, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert collate_prompts(examples[:1], pad_token_id=PAD)["input_ids"].shape == (1, 3)
    with pytest.raises(ValueError):
        collate_prompts([], pad_token_id=PAD)


# ---------------------------------------------------------------- built-in prompt sets


def test_builtin_sample_prompts_load_without_drops(tok):
    data = build_prompt_datasets(PromptDataConfig(), tok, seed=0)
    report = data.report
    assert report.rows_read == 500 and report.bad_rows == 0 and not report.dropped and not report.eval_dropped
    assert (report.train_examples, report.eval_examples) == (450, 50)
    batch = collate_prompts(data.train[:8], tok.pad_token_id)
    # Every row ends with the generation prompt "<|assistant|>\n", in the same columns.
    header = tok.encode("<|assistant|>\n", add_special_tokens=False)
    assert batch["input_ids"][:, -len(header) :].tolist() == [header] * 8
    assert batch["attention_mask"].sum(1).tolist() == [len(ex.input_ids) for ex in data.train[:8]]


def test_builtin_word_order_loads_and_every_prompt_parses(tok):
    data = build_prompt_datasets(PromptDataConfig(source="builtin:word_order"), tok, seed=0)
    assert (len(data.train), len(data.eval)) == (540, 60) and not data.report.dropped
    for ex in data.train + data.eval:
        assert len(expected_words(ex.text)) >= 3 and ex.messages == [user(ex.text)]


def test_sample_prompts_script_is_deterministic_and_avoids_sft_prompts(tmp_path):
    spec = importlib.util.spec_from_file_location("make_sample_prompts", REPO / "scripts" / "make_sample_prompts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.main(["--out", str(tmp_path / "p.jsonl")])
    assert out.read_bytes() == (ASSETS / "sample_prompts.jsonl").read_bytes()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 500 and all(set(r) == {"prompt"} for r in rows)
    prompts = {r["prompt"] for r in rows}
    sft = [json.loads(line) for line in (ASSETS / "sample_dolly.jsonl").read_text().splitlines()]
    assert len(prompts) == 500 and not prompts & {dolly_row(r, "x")[0]["content"] for r in sft}


@pytest.mark.skipif(not HH_REAL.is_file(), reason=f"real HH-RLHF test split not found at {HH_REAL}")
def test_hh_rlhf_real_file_gives_ppo_prompts(tok):
    """The prompts of the real HH-RLHF harmless-base test split: every pair's conversation up to its final reply,
    each once; the four rows with an empty final reply are reported, long prompts dropped and counted."""
    data = build(tok, HH_REAL, "hh_rlhf", max_prompt_length=512)
    assert data.report.rows_read == 2312 and data.report.bad_rows == 4
    assert data.report.dropped == {"duplicate prompt": 2, "prompt longer than data.max_prompt_length": 246}
    assert len(data.train) == 2312 - 4 - 2 - 246
    assert all(ex.messages[-1]["role"] == "user" and len(ex.input_ids) <= 512 for ex in data.train)
