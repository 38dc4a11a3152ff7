"""The word-order task: reverse or alphabetically sort a short word list, scored exactly by `gold_reward`.

Both families, and their phrasings, are the ones the SFT sample (rlhf_cli/assets/sample_dolly.jsonl, written by
scripts/make_sample_data.py from this module's WORDS) teaches, so an SFT'd policy starts above zero reward and PPO
has something to sharpen. Each family has an inline variant ("Reverse the order of these words: a, b, c.") and a
context variant (an instruction, a blank line, then the list: how the Dolly adapter joins instruction and context).

    python -m rlhf_cli.tasks.word_order --out rlhf_cli/assets/word_order.jsonl   # 600 prompts, byte-identical

Standard library only: scripts/make_sample_data.py imports WORDS from here.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from pathlib import Path

from rlhf_cli.tasks import prompts_main

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_OUT = ASSETS / "word_order.jsonl"
SFT_SAMPLE = ASSETS / "sample_dolly.jsonl"
DEFAULT_N = 600
DEFAULT_SEED = 3  # make_sample_data uses 0, make_sample_preferences 1, make_sample_prompts 2

WORDS = [
    "cat",
    "dog",
    "sun",
    "tree",
    "book",
    "lamp",
    "river",
    "apple",
    "chair",
    "cloud",
    "house",
    "bread",
    "stone",
    "music",
    "garden",
    "window",
    "pencil",
    "table",
    "yellow",
    "rabbit",
    "moon",
    "road",
    "ship",
    "kite",
    "orange",
    "zebra",
    "violin",
    "forest",
    "candle",
    "bridge",
    "lemon",
    "mirror",
    "planet",
    "honey",
]

# family -> (inline prefix, context-variant instruction, answer from the listed words). The inline prompt is
# f"{prefix} {a, b, c}."; the context prompt is f"{instruction}\n\n{a, b, c}".
FAMILIES: dict[str, tuple[str, str, Callable[[list[str]], list[str]]]] = {
    "reverse": (
        "Reverse the order of these words:",
        "Write the words in the list in reverse order.",
        lambda words: words[::-1],
    ),
    "sort": ("Sort these words alphabetically:", "Put the words in the list in alphabetical order.", sorted),
}


def make_prompt(r: random.Random) -> tuple[str, list[str]]:
    """A random prompt of either family and variant (3-5 distinct WORDS), and the expected answer words in order."""
    family = "reverse" if r.random() < 0.5 else "sort"
    prefix, instruction, answer = FAMILIES[family]
    words = r.sample(WORDS, r.randint(3, 5))
    listed = ", ".join(words)
    text = f"{prefix} {listed}." if r.random() < 0.5 else f"{instruction}\n\n{listed}"
    return text, list(answer(words))


def expected_words(prompt: str) -> list[str]:
    """The answer words, in order, for a prompt of either family (inline or context variant).

    Raises ValueError (quoting the prompt) for any other text.
    """
    text = prompt.strip()
    for prefix, instruction, answer in FAMILIES.values():
        if text.startswith(prefix + " ") and text.endswith("."):
            listed = text[len(prefix) + 1 : -1]
        elif text.startswith(instruction + "\n\n"):
            listed = text[len(instruction) + 2 :]
        else:
            continue
        words = [w.strip() for w in listed.split(",")]
        if len(words) >= 2 and all(re.fullmatch(r"[A-Za-z]+", w) for w in words):
            return list(answer(words))
    raise ValueError(f"not a word_order prompt (reverse or sort a comma-separated word list): {prompt!r}")


def response_words(response: str) -> list[str]:
    """Words of a reply: split on commas and whitespace, surrounding punctuation stripped, lowercased."""
    words = (w.strip(string.punctuation).lower() for w in re.split(r"[,\s]+", response))
    return [w for w in words if w]


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Per reply: (positions i where reply word i == expected word i) / max(len(expected), len(reply words)).

    1.0 only for the exact list; a missing or extra word costs like a wrong one; an empty reply scores 0.0.
    `prompts` are the final user messages (PromptExample.text); a prompt outside the task raises ValueError.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(responses)} responses")
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        expected = [w.lower() for w in expected_words(prompt)]
        got = response_words(response)
        if not got:
            scores.append(0.0)
            continue
        hits = sum(a == b for a, b in zip(got, expected, strict=False))
        scores.append(hits / max(len(expected), len(got)))
    return scores


def sft_sample_prompts(path: Path = SFT_SAMPLE) -> set[str]:
    """The user messages of the SFT sample: instruction, or instruction + blank line + context (Dolly adapter)."""
    prompts = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                instruction, context = row["instruction"].strip(), row["context"].strip()
                prompts.add(f"{instruction}\n\n{context}" if context else instruction)
    return prompts


def build_rows(n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """n unique `{"prompt", "answer"}` rows, none of them a prompt of the SFT sample; same seed, same rows."""
    r = random.Random(seed)
    excluded = sft_sample_prompts()
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 100 * n:  # cannot happen for n in the thousands: there are >10^6 distinct prompts
            raise RuntimeError(f"only {len(rows)} unique word_order prompts of {n}")
        prompt, answer = make_prompt(r)
        if prompt in seen or prompt in excluded:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": ", ".join(answer)})
    return rows


def main(argv: list[str] | None = None) -> Path:
    return prompts_main(__doc__, DEFAULT_OUT, DEFAULT_N, DEFAULT_SEED, build_rows, argv)


if __name__ == "__main__":
    main()
