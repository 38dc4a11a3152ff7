"""SFT tokenization (labels, EOS, truncation of the response or of the prompt's oldest turns, drops), dataset building
(bad rows, eval split, drop and truncation counts), collation.

The tokenizer is a local WordLevel one: each word is one token and the chat markers are special tokens, so
the expected ids and labels below are written out token by token.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_cli.config.schema import DataConfig
from rlhf_cli.data import DataReport, DropExample, SFTExample, build_sft_datasets, collate_sft, tokenize_conversation
from rlhf_cli.data.sft import NO_ROOM, PROMPT_TRUNCATED, REPLY_CHANGED, TOO_LONG
from rlhf_cli.errors import DataError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "data"
DOLLY = FIXTURES / "dolly.jsonl"

SPECIAL = ["<|pad|>", "<|unk|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|eot|>"]
WORDS = [
    "hi",
    "hello",
    "world",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    "say",
    "it",
    "be",
    "brief",
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
]
VOCAB = {tok: i for i, tok in enumerate(SPECIAL + ["\n"] + WORDS + ["\n\n"])}
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
X = -100  # masked label


def make_tokenizer(
    template: str = TEMPLATE, eos: str = "<|end|>", pad: str = "<|pad|>", merge_newlines: bool = False
) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    # "\n" as its own token, so the separator after <|end|> is visible in the ids.
    tok.add_tokens([AddedToken("\n", normalized=False)])
    if merge_newlines:  # like BPE vocabularies with a "\n\n" token
        tok.add_tokens([AddedToken("\n\n", normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, unk_token="<|unk|>", chat_template=template
    )


def ids(text: str) -> list[int]:
    """Token ids of space-separated token strings; "NL" stands for the newline token."""
    return [VOCAB["\n" if t == "NL" else t] for t in text.split()]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SINGLE = [user("say hello"), assistant("hello world")]
MULTI = [
    {"role": "system", "content": "be brief"},
    user("hi"),
    assistant("hello"),
    user("how are you"),
    assistant("fine thanks"),
]
# 42 tokens: system 6, "hi" exchange 10, "how are you" exchange 13, "say it" 6, final header 2, reply "a b c" 5.
LONG = [*MULTI, user("say it"), assistant("a b c")]


# ---------------------------------------------------------------- tokenize_conversation


def test_single_turn_labels_only_the_response_and_its_eos(tok):
    ex = tokenize_conversation(tok, SINGLE, max_length=64)
    assert ex.input_ids == ids("<|user|> NL say hello <|end|> NL <|assistant|> NL hello world <|end|> NL")
    # Prompt and role header masked; response + EOS labelled; the newline after EOS is template glue.
    assert ex.labels == [X] * 8 + ids("hello world <|end|>") + [X]
    assert len(ex.labels) == len(ex.input_ids)  # unshifted: the loss shifts


def test_multi_turn_labels_every_assistant_turn(tok):
    ex = tokenize_conversation(tok, MULTI, max_length=64)
    assert ex.input_ids == ids(
        "<|system|> NL be brief <|end|> NL <|user|> NL hi <|end|> NL <|assistant|> NL hello <|end|> NL "
        "<|user|> NL how are you <|end|> NL <|assistant|> NL fine thanks <|end|> NL"
    )
    assert ex.labels == ([X] * 13 + ids("hello <|end|>") + [X] * 10 + ids("fine thanks <|end|>") + [X])


def test_eos_appended_and_labelled_when_template_ends_turns_otherwise():
    template = TEMPLATE.replace("<|end|>", "<|eot|>")  # end-of-turn marker that is not the EOS token
    ex = tokenize_conversation(make_tokenizer(template), SINGLE, max_length=64)
    assert ex.input_ids == ids("<|user|> NL say hello <|eot|> NL <|assistant|> NL hello world <|eot|> NL <|end|>")
    assert ex.labels == [X] * 8 + ids("hello world <|eot|> NL <|end|>")


def test_drop_policy_and_exact_fit(tok):
    n = len(tokenize_conversation(tok, SINGLE, max_length=64).input_ids)  # 12
    assert len(tokenize_conversation(tok, SINGLE, max_length=n).input_ids) == n
    with pytest.raises(DropExample) as err:
        tokenize_conversation(tok, SINGLE, max_length=n - 1, truncation="drop")
    assert err.value.reason == "too long"


def test_truncate_response_keeps_prompt_and_cuts_response(tok):
    ex = tokenize_conversation(tok, SINGLE, max_length=9, truncation="truncate_response")
    assert ex.input_ids == ids("<|user|> NL say hello <|end|> NL <|assistant|> NL hello")
    assert ex.labels == [X] * 8 + ids("hello")  # no EOS: the response really was cut
    with pytest.raises(DropExample) as err:
        tokenize_conversation(tok, SINGLE, max_length=9, truncation="truncate_response", min_response_tokens=2)
    assert err.value.reason == "response shorter than min_response_tokens after truncation"


@pytest.mark.parametrize("truncation", ["drop", "truncate_response"])
def test_prompt_filling_max_length_is_dropped_never_emitted_without_targets(tok, truncation):
    # The prompt (up to and including the assistant header) is 8 tokens: with max_length 8 a truncated
    # example would have zero labelled tokens, even with min_response_tokens=0.
    with pytest.raises(DropExample) as err:
        tokenize_conversation(tok, SINGLE, max_length=8, truncation=truncation, min_response_tokens=0)
    assert err.value.reason == "prompt leaves no room for the response"


def test_multi_turn_truncation_cuts_only_the_last_response(tok):
    # Prompt = 25 tokens (both earlier turns and the last header); the full example is 29.
    ex = tokenize_conversation(tok, MULTI, max_length=26, truncation="truncate_response")
    assert ex.labels == [X] * 13 + ids("hello <|end|>") + [X] * 10 + ids("fine")


def test_truncate_prompt_cuts_the_oldest_exchanges_and_keeps_the_reply(tok):
    full = tokenize_conversation(tok, LONG, max_length=64)
    assert len(full.input_ids) == 42 and not full.prompt_truncated
    reply_ids, reply_labels = ids("a b c <|end|> NL"), ids("a b c <|end|>") + [X]
    assert (full.input_ids[-5:], full.labels[-5:]) == (reply_ids, reply_labels)
    # 32 tokens: the oldest exchange ("hi"/"hello") goes, the system prompt and the later turns stay.
    ex = tokenize_conversation(tok, LONG, max_length=32, truncation="truncate_prompt")
    assert ex.input_ids == ids(
        "<|system|> NL be brief <|end|> NL <|user|> NL how are you <|end|> NL <|assistant|> NL fine thanks <|end|> NL "
        "<|user|> NL say it <|end|> NL <|assistant|> NL a b c <|end|> NL"
    )
    # The kept earlier reply is still trained; the final reply has exactly the ids and labels of the full rendering.
    assert ex.labels == [X] * 15 + ids("fine thanks <|end|>") + [X] * 9 + reply_labels
    assert (ex.input_ids[-5:], ex.labels[-5:]) == (reply_ids, reply_labels) and ex.prompt_truncated
    untruncated = tokenize_conversation(tok, [MULTI[0], *LONG[3:]], max_length=64)
    assert (ex.input_ids, ex.labels) == (untruncated.input_ids, untruncated.labels)
    # 31 tokens: both earlier exchanges go; the system prompt and the final user turn are never cut.
    ex = tokenize_conversation(tok, LONG, max_length=31, truncation="truncate_prompt")
    assert ex.input_ids == ids(
        "<|system|> NL be brief <|end|> NL <|user|> NL say it <|end|> NL <|assistant|> NL a b c <|end|> NL"
    )
    assert ex.labels == [X] * 14 + reply_labels
    # A conversation that fits is left alone and not counted as truncated.
    assert tokenize_conversation(tok, LONG, max_length=42, truncation="truncate_prompt") == full
    with pytest.raises(DropExample) as err:  # the 37-token prompt alone fills 32 tokens
        tokenize_conversation(tok, LONG, max_length=32, truncation="drop")
    assert err.value.reason == NO_ROOM


def test_truncate_prompt_drops_when_the_final_turn_leaves_no_room(tok):
    # System prompt + final user turn + header = 14 tokens, + the 5-token reply = 19.
    for max_length, reason in ((18, TOO_LONG), (14, NO_ROOM)):  # the reasons `drop` gives
        with pytest.raises(DropExample) as err:
            tokenize_conversation(tok, LONG, max_length=max_length, truncation="truncate_prompt")
        assert err.value.reason == reason
    assert len(tokenize_conversation(tok, LONG, max_length=19, truncation="truncate_prompt").input_ids) == 19


def test_truncate_prompt_drops_when_the_template_renders_the_reply_by_position():
    # A template that renders an assistant turn by its index: after the cut the reply would not be the same tokens.
    by_position = "{% if loop.index0 < 3 %}brief {% endif %}{{ m.content }}"
    tok = make_tokenizer(TEMPLATE.replace("{{ m.content }}", by_position))
    with pytest.raises(DropExample) as err:
        tokenize_conversation(tok, LONG, max_length=31, truncation="truncate_prompt")
    assert err.value.reason == REPLY_CHANGED


def test_special_token_text_in_a_message_is_dropped(tok):
    with pytest.raises(DropExample) as err:
        tokenize_conversation(tok, [user("hi"), assistant("fine <|end|> thanks")], max_length=64)
    assert err.value.reason == "text contains a special token"


def test_prefix_unstable_template_raises_data_error():
    # Like templates that strip earlier assistant turns (reasoning): history changes when a turn is added.
    template = (
        "{% for m in messages %}<|{{ m.role }}|>\n"
        "{% if m.role != 'assistant' or loop.last %}{{ m.content }}{% endif %}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    tok = make_tokenizer(template)
    assert tokenize_conversation(tok, SINGLE, max_length=64).labels[-4:] == ids("hello world <|end|>") + [X]
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize_conversation(tok, MULTI, max_length=64)


def test_tokens_merging_across_a_turn_boundary_drop_the_row():
    # Header "<|assistant|>\n" + content "\nhello": the two newlines become one token, so the rendered prompt is
    # no longer a token prefix although the text is. The row is dropped, the run goes on.
    tok = make_tokenizer(merge_newlines=True)
    with pytest.raises(DropExample) as err:
        tokenize_conversation(tok, [user("hi"), assistant("\nhello")], max_length=64)
    assert err.value.reason == "tokens merge across a turn boundary"
    assert tokenize_conversation(tok, SINGLE, max_length=64).labels[-4:] == ids("hello world <|end|>") + [X]


def test_template_exception_drops_the_row_with_its_message():
    template = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + TEMPLATE
    with pytest.raises(DropExample) as err:
        tokenize_conversation(make_tokenizer(template), MULTI, max_length=64)
    assert err.value.reason == "chat template rejected the conversation: no system role"


# ---------------------------------------------------------------- build_sft_datasets


def cfg(**kw) -> DataConfig:
    kw.setdefault("source", str(DOLLY))
    kw.setdefault("format", "dolly")
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(**kw)


def write_rows(path: Path, n: int) -> Path:
    letters = "abcdefgh"
    # Distinct in-vocabulary prompts, so examples can be told apart by their ids.
    lines = [
        f'{{"prompt": "say {letters[i % 8]} {letters[i // 8]}", "response": "it {letters[i % 8]}"}}' for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_skip_counts_and_samples(tok):
    data = build_sft_datasets(cfg(), tok, seed=0)
    r = data.report
    assert (r.rows_read, r.bad_rows, r.train_examples, r.eval_examples) == (7, 4, 3, 0)
    assert r.bad_row_samples[1:] == [
        f"{DOLLY}:4: missing field 'response'",
        f"{DOLLY}:5: field 'response' is empty",
        f"{DOLLY}:8: field 'instruction' must be a string, got int",
    ]
    assert r.bad_row_samples[0].startswith(f"{DOLLY}:3: not valid JSON")
    assert data.train[0].input_ids == ids("<|user|> NL say hello <|end|> NL <|assistant|> NL hello world <|end|> NL")


def test_bad_rows_fail_names_file_line_and_the_fix(tok):
    with pytest.raises(DataError) as err:
        build_sft_datasets(cfg(bad_rows="fail"), tok, seed=0)
    msg = str(err.value)
    assert f"bad row at {DOLLY}:3: not valid JSON" in msg
    assert "set data.bad_rows=skip to skip such rows" in msg


def test_drops_are_counted_per_reason(tok):
    # Token lengths of the three good rows: 12, 18 (prompt 14: "say it", blank line, context), 13.
    data = build_sft_datasets(cfg(max_length=15), tok, seed=0)
    assert data.report.dropped == {"too long": 1}
    assert data.report.train_examples == 2
    data = build_sft_datasets(cfg(max_length=15, truncation="truncate_response"), tok, seed=0)
    assert data.report.dropped == {}
    assert [len(ex.input_ids) for ex in data.train] == [12, 15, 13]
    assert data.report.truncated == {"response cut at data.max_length": 1}  # the 18-token row, kept with a cut
    data = build_sft_datasets(cfg(max_length=14, truncation="truncate_response"), tok, seed=0)
    assert data.report.dropped == {"prompt leaves no room for the response": 1}


def test_truncated_prompts_are_counted_in_the_report(tok, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": conv}) + "\n" for conv in (LONG, SINGLE)))
    config = cfg(source=str(path), format="jsonl", eval_split=str(path), max_length=32, truncation="truncate_prompt")
    data = build_sft_datasets(config, tok, seed=0)
    report = data.report
    assert [ex.prompt_truncated for ex in data.train] == [True, False] and report.dropped == {}
    assert report.truncated == report.eval_truncated == {PROMPT_TRUNCATED: 1}
    assert report.summary().endswith(
        "\ntruncated: prompt cut to its final turns x1, prompt cut to its final turns (eval) x1"
    )
    assert report.to_dict()["truncated"] == {PROMPT_TRUNCATED: 1}
    report = build_sft_datasets(replace(config, truncation="drop"), tok, seed=0).report
    assert (report.train_examples, report.dropped, report.truncated) == (1, {NO_ROOM: 1}, {})


def test_no_training_example_left_says_why(tok):
    with pytest.raises(DataError, match=r"no training example left(.|\n)*prompt leaves no room for the response x3"):
        build_sft_datasets(cfg(max_length=4), tok, seed=0)


def test_eval_fraction_is_seeded_and_deterministic(tok, tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", 20)
    config = cfg(source=str(path), format="jsonl", eval_fraction=0.25)
    first = build_sft_datasets(config, tok, seed=1)
    again = build_sft_datasets(config, tok, seed=1)
    other = build_sft_datasets(config, tok, seed=2)
    assert (first.report.train_examples, first.report.eval_examples) == (15, 5)
    assert first.eval == again.eval and first.train == again.train
    assert first.eval != other.eval
    held_out = {tuple(ex.input_ids) for ex in first.eval}
    assert not held_out & {tuple(ex.input_ids) for ex in first.train}  # disjoint (every row is distinct)


def test_eval_fraction_takes_at_least_one_of_two_rows(tok, tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", 2)
    data = build_sft_datasets(cfg(source=str(path), format="jsonl", eval_fraction=0.05), tok, seed=0)
    assert (len(data.train), len(data.eval)) == (1, 1)


def test_eval_split_and_max_samples(tok, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", 10)
    evals = write_rows(tmp_path / "eval.jsonl", 3)
    data = build_sft_datasets(
        cfg(source=str(train), format="jsonl", eval_split=str(evals), eval_fraction=0.5, max_samples=4), tok, 0
    )
    assert (data.report.rows_read, len(data.train), len(data.eval)) == (13, 4, 3)
    assert data.train[0].input_ids[2:4] == ids("say a")  # max_samples keeps the first rows in file order


def test_oasst1_end_to_end_with_language_filter(tok):
    data = build_sft_datasets(cfg(source=str(FIXTURES / "oasst1.jsonl"), format="oasst1", languages=["en"]), tok, 0)
    assert data.report.train_examples == 2
    assert data.report.bad_rows == 2
    assert data.report.dropped == {"prompt has no usable assistant reply": 1, "language not in data.languages": 1}


def test_report_summary_and_dict():
    report = DataReport(
        rows_read=10,
        bad_rows=1,
        bad_row_samples=["f.jsonl:3: not valid JSON"],
        dropped={"too long": 2},
        eval_dropped={"too long": 1},
        train_examples=6,
        eval_examples=1,
    )
    assert report.summary() == (
        "data: 10 rows read -> 6 train / 1 eval examples; 1 bad rows skipped (e.g. f.jsonl:3: not valid JSON)\n"
        "dropped: too long x2, too long (eval) x1"
    )
    assert report.to_dict()["dropped"] == {"too long": 2}
    assert DataReport(rows_read=2, train_examples=2).summary() == "data: 2 rows read -> 2 train / 0 eval examples"


def test_missing_chat_template_and_bad_policy_are_data_errors(tok):
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        build_sft_datasets(cfg(), bare, seed=0)
    with pytest.raises(DataError, match="data.truncation"):
        build_sft_datasets(cfg(truncation="cut"), tok, seed=0)


# ---------------------------------------------------------------- collate_sft


def test_collate_right_pads_by_length_even_when_pad_is_eos():
    eos = VOCAB["<|end|>"]
    short = SFTExample(input_ids=[9, eos], labels=[X, eos])
    long = SFTExample(input_ids=[9, 10, 11, eos], labels=[X, 10, 11, eos])
    batch = collate_sft([short, long], pad_token_id=eos)  # pad == eos, as in many user models
    assert batch["input_ids"].tolist() == [[9, eos, eos, eos], [9, 10, 11, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[X, eos, X, X], [X, 10, 11, eos]]  # the real EOS keeps its label
    assert all(t.dtype == torch.long for t in batch.values())
