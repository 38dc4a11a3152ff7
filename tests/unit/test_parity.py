"""The parity task: gold reward by hand, prompt parsing, the shipped prompt file regenerates byte-identically."""

import json

import pytest

from rlhf_cli.data.sources import ASSETS_DIR
from rlhf_cli.tasks import write_rows
from rlhf_cli.tasks.parity import DEFAULT_N, DEFAULT_SEED, build_pairs, build_rows, gold_reward, number_of
from rlhf_cli.tasks.word_order import sft_sample_prompts


@pytest.mark.parametrize(
    "prompt,response,score",
    [
        ("Is 462 even or odd?", "462 is even.", 1.0),
        ("Is 462 even or odd?", "4 is even.", 1.0),  # only the answer word is judged
        ("Is 462 even or odd?", "Even", 1.0),  # case and punctuation do not matter
        ("Is 462 even or odd?", "462 is odd.", 0.0),
        ("Is 7 even or odd?", "7 is odd.", 1.0),
        ("Is 7 even or odd?", "It is even or odd.", 0.0),  # naming both is no answer
        ("Is 7 even or odd?", "Seven.", 0.0),
        ("Is 7 even or odd?", "", 0.0),
        ("Is 7 even or odd?", "oddly, 7", 0.0),  # a word that merely contains the answer
    ],
)
def test_gold_reward_judges_the_answer_word(prompt, response, score):
    assert gold_reward([prompt], [response]) == [score]


def test_bad_prompts_and_lengths_raise():
    assert number_of("Is 918 even or odd?") == 918
    with pytest.raises(ValueError, match="not a parity prompt"):
        gold_reward(["What is 2 plus 2?"], ["4"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        gold_reward(["Is 1 even or odd?", "Is 2 even or odd?"], ["odd"])


def test_shipped_prompts_regenerate_and_avoid_the_sft_sample(tmp_path):
    shipped = ASSETS_DIR / "parity.jsonl"
    assert write_rows(tmp_path / "p.jsonl", build_rows(DEFAULT_N, DEFAULT_SEED)).read_bytes() == shipped.read_bytes()
    rows = [json.loads(line) for line in shipped.read_text().splitlines()]
    assert len(rows) == DEFAULT_N == len({r["prompt"] for r in rows})
    assert not {r["prompt"] for r in rows} & sft_sample_prompts()
    assert all(gold_reward([r["prompt"]], [r["answer"]]) == [1.0] for r in rows)


def test_format_reward_asks_for_one_answer_word_right_or_wrong():
    from rlhf_cli.tasks.parity import format_reward

    prompts = ["Is 4 even or odd?"] * 4
    assert format_reward(prompts, ["4 is odd.", "4 is even.", "even or odd", "four"]) == [1.0, 1.0, 0.0, 0.0]


def test_shipped_pairs_regenerate_and_share_no_number_with_the_prompts_or_the_sft_sample():
    pairs = build_pairs()
    shipped = [json.loads(line) for line in (ASSETS_DIR / "parity_pairs.jsonl").read_text().splitlines()]
    asked = {row["prompt"] for row in build_rows(DEFAULT_N, DEFAULT_SEED)} | sft_sample_prompts()
    parity_asked = {p for p in asked if p.endswith("even or odd?")}
    assert shipped == pairs and len(pairs) == 999 - len(parity_asked) == len({p["prompt"] for p in pairs})
    assert not asked & {p["prompt"] for p in pairs}
    prompts = [p["prompt"] for p in pairs]
    assert gold_reward(prompts, [p["chosen"] for p in pairs]) == [1.0] * len(pairs)
    assert gold_reward(prompts, [p["rejected"] for p in pairs]) == [0.0] * len(pairs)


def test_the_number_a_reply_names_says_nothing_about_which_reply_is_right():
    """Replies name the prompt's number or another one, of either parity, in chosen and rejected alike: a reward model
    that checked the reply against itself ("42 is even." agrees with itself) or looked for the prompt's number would
    be right by chance only; it has to read the prompt's parity."""
    pairs = build_pairs()
    for side in ("chosen", "rejected"):
        named = [(number_of(p["prompt"]), int(p[side].split()[0]), p[side].split()[-1].rstrip(".")) for p in pairs]
        assert 0.4 < sum(n == m for n, m, _ in named) / len(named) < 0.6
        others = [(m, word) for n, m, word in named if n != m]
        agrees = sum(word == ("even" if m % 2 == 0 else "odd") for m, word in others) / len(others)
        assert 0.4 < agrees < 0.6, (side, agrees)
