"""The word-order task: gold reward on hand-made replies, prompt parsing for both families and both phrasings,
agreement with the SFT sample it builds on, and the shipped prompt file."""

from __future__ import annotations

import json
import random

import pytest
from helpers import ASSETS

from rlhf_cli.data.adapters import dolly_row
from rlhf_cli.tasks import word_order, write_rows
from rlhf_cli.tasks.word_order import build_rows, expected_words, gold_reward, make_prompt

REVERSE = "Reverse the order of these words: cat, dog, sun."
SORT = "Sort these words alphabetically: tree, apple, moon."
REVERSE_CTX = "Write the words in the list in reverse order.\n\ncat, dog, sun, lamp"
SORT_CTX = "Put the words in the list in alphabetical order.\n\ntree, apple, moon"


def test_expected_words_for_both_families_and_both_phrasings():
    assert expected_words(REVERSE) == ["sun", "dog", "cat"]
    assert expected_words(SORT) == ["apple", "moon", "tree"]
    assert expected_words(REVERSE_CTX) == ["lamp", "sun", "dog", "cat"]
    assert expected_words(SORT_CTX) == ["apple", "moon", "tree"]
    assert expected_words(f"  {SORT}\n") == ["apple", "moon", "tree"]  # surrounding whitespace is formatting


@pytest.mark.parametrize(
    "prompt",
    [
        "What is the capital of France?",
        "Reverse the order of these words:",
        "Sort these words alphabetically: tree, 42, moon.",
        "Write the words in the list in reverse order.",
        "",
    ],
)
def test_expected_words_rejects_other_prompts_quoting_them(prompt):
    with pytest.raises(ValueError, match="not a word_order prompt") as err:
        expected_words(prompt)
    assert repr(prompt) in str(err.value)


@pytest.mark.parametrize(
    "response, score",
    [
        ("sun, dog, cat", 1.0),
        ("dog, sun, cat", 1 / 3),  # one swap in three words: only "cat" is in place
        ("sun, dog, cat, tree", 3 / 4),  # an extra word costs
        ("sun, dog", 2 / 3),  # a missing word costs
        ("cat, dog, sun", 1 / 3),  # the input order, not reversed
        ("Sun, DOG,cat.", 1.0),  # case, spacing and punctuation do not matter
        ("sun dog cat", 1.0),
        ("'sun', \"dog\", (cat)!", 1.0),
        ("", 0.0),
        ("  ,. ", 0.0),
        ("The answer is sun, dog, cat", 0.0),  # words are compared by position
    ],
)
def test_gold_reward_scores_by_position_over_the_longer_list(response, score):
    assert gold_reward([REVERSE], [response]) == [pytest.approx(score)]


def test_gold_reward_batches_and_checks_lengths():
    assert gold_reward([REVERSE, SORT_CTX], ["sun, dog, cat", "apple, tree, moon"]) == [1.0, pytest.approx(1 / 3)]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        gold_reward([REVERSE, SORT], ["sun"])
    with pytest.raises(ValueError, match="not a word_order prompt"):
        gold_reward(["What is 2 plus 2?"], ["4"])


def test_make_prompt_covers_all_variants_and_its_answer_parses_back():
    r = random.Random(0)
    starts = set()
    for _ in range(200):
        prompt, answer = make_prompt(r)
        assert expected_words(prompt) == answer and 3 <= len(answer) <= 5
        assert gold_reward([prompt], [", ".join(answer)]) == [1.0]
        starts.add(prompt.split()[0])
    assert starts == {"Reverse", "Sort", "Write", "Put"}


def test_context_variant_is_the_dolly_adapters_join():
    # The context variant must be exactly what a Dolly row with the list as context becomes.
    conv = dolly_row(
        {"instruction": REVERSE_CTX.split("\n\n")[0], "context": "cat, dog, sun, lamp", "response": "x"}, "t"
    )
    assert conv[0]["content"] == REVERSE_CTX


def test_sft_sample_word_order_rows_parse_to_their_responses():
    rows = [json.loads(line) for line in (ASSETS / "sample_dolly.jsonl").read_text().splitlines()]
    prompts = [dolly_row(row, "t")[0]["content"] for row in rows]
    assert word_order.sft_sample_prompts() == set(prompts)
    checked = 0
    for row, prompt in zip(rows, prompts, strict=True):
        try:
            answer = expected_words(prompt)
        except ValueError:
            continue
        assert ", ".join(answer) == row["response"]
        checked += 1
    assert checked == 50  # reverse_words 25 + sort_words 25 in the SFT sample


def test_shipped_prompts_regenerate_byte_identically_and_answers_match(tmp_path):
    shipped = ASSETS / "word_order.jsonl"
    out = write_rows(tmp_path / "w.jsonl", build_rows(600, word_order.DEFAULT_SEED))
    assert out.read_bytes() == shipped.read_bytes()
    assert word_order.main(["--out", str(tmp_path / "m.jsonl")]).read_bytes() == shipped.read_bytes()
    rows = [json.loads(line) for line in shipped.read_text().splitlines()]
    assert len(rows) == 600 and len({r["prompt"] for r in rows}) == 600
    assert all(set(r) == {"prompt", "answer"} for r in rows)
    assert all(r["answer"] == ", ".join(expected_words(r["prompt"])) for r in rows)
    assert not {r["prompt"] for r in rows} & word_order.sft_sample_prompts()
    assert write_rows(tmp_path / "other.jsonl", build_rows(600, 7)).read_bytes() != shipped.read_bytes()
