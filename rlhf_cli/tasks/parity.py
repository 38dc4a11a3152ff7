"""The parity task: "Is N even or odd?" (1 <= N <= 999), with a programmatic gold reward.

The phrasing is the SFT sample's (scripts/make_sample_data.py, `classification`), so a policy fine-tuned on that sample
answers in the right shape ("N is even.") but, having seen only a handful of such rows, is right about half the time.
The rule it has to find is simple and general (the last digit decides), so online RL can learn it from the reward
alone and the gain carries over to numbers it never saw: the project's learning test for PPO.

    python -m rlhf_cli.tasks.parity --out rlhf_cli/assets/parity.jsonl     # rewrites the shipped prompts
    python -m rlhf_cli.tasks.parity --pairs                                 # rewrites parity_pairs.jsonl

Standard library only, so reward functions stay cheap to import.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

from rlhf_cli.tasks import prompts_main, write_rows
from rlhf_cli.tasks.word_order import SFT_SAMPLE, response_words, sft_sample_prompts

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "parity.jsonl"
DEFAULT_PAIRS_OUT = DEFAULT_OUT.with_name("parity_pairs.jsonl")
DEFAULT_SEED = 5
DEFAULT_N = 600
_PROMPT = re.compile(r"Is (\d+) even or odd\?")


def make_prompt(n: int) -> str:
    return f"Is {n} even or odd?"


def number_of(prompt: str) -> int:
    """N of a parity prompt; ValueError (quoting the prompt) for anything else."""
    found = _PROMPT.search(prompt)
    if not found:
        raise ValueError(f"not a parity prompt ('Is N even or odd?'): {prompt!r}")
    return int(found.group(1))


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the reply names exactly one of "even" / "odd" and it is N's parity, else 0.0.

    Only the answer word is judged: a reply that restates another number ("4 is even." for 462) is still a correct
    answer to the question asked. `prompts` are the final user messages (PromptExample.text)."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(responses)} responses")
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        want = "even" if number_of(prompt) % 2 == 0 else "odd"
        named = {w for w in response_words(response) if w in ("even", "odd")}
        scores.append(1.0 if named == {want} else 0.0)
    return scores


def format_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the reply names exactly one of "even" / "odd" (right or wrong), else 0.0: a shaping term to weigh
    next to `gold_reward` (stage.reward.functions), as format rewards are next to accuracy rewards."""
    return [1.0 if len({w for w in response_words(r) if w in ("even", "odd")}) == 1 else 0.0 for r in responses]


def build_rows(n: int = DEFAULT_N, seed: int = DEFAULT_SEED, sft_sample: Path = SFT_SAMPLE) -> list[dict[str, str]]:
    """`n` prompts for distinct numbers in a seeded order, leaving out the numbers the SFT sample asks about."""
    taken = sft_sample_prompts(sft_sample)
    numbers = [k for k in range(1, 1000) if make_prompt(k) not in taken]
    random.Random(seed).shuffle(numbers)
    if n > len(numbers):
        raise ValueError(f"only {len(numbers)} numbers are free for parity prompts, asked for {n}")
    return [{"prompt": make_prompt(k), "answer": "even" if k % 2 == 0 else "odd"} for k in numbers[:n]]


def build_pairs(seed: int = DEFAULT_SEED, sft_sample: Path = SFT_SAMPLE) -> list[dict[str, str]]:
    """Preference pairs for the numbers neither the SFT sample nor the prompts (`build_rows`) ask about, in a seeded
    order: chosen the right answer word ("... is odd." for an odd N), rejected the wrong one. A reward model trained on
    them has to learn parity from the pairs, and the online stages' prompts and held-out numbers stay unseen by it:
    the learned, imperfect reward of `configs/pipeline/parity.yaml`, judged by `gold_reward`.

    Each reply names the prompt's number N or, as often, another number M (any parity), as a labeller would see
    among the SFT policy's samples (at temperature 1 about 99% of them name another number): "M is odd." is right for
    an odd N whatever M is, since `gold_reward` judges the answer word alone. With every reply restating N, the
    reward model could learn "the reply agrees with itself" instead of reading the prompt, and PPO found "42 is
    even." for every N (reward-model score 7-8, gold 0.50 on one seed)."""
    taken = sft_sample_prompts(sft_sample) | {row["prompt"] for row in build_rows(DEFAULT_N, DEFAULT_SEED, sft_sample)}
    numbers = [k for k in range(1, 1000) if make_prompt(k) not in taken]
    rng = random.Random(seed)
    rng.shuffle(numbers)
    rows = []
    for k in numbers:
        right, wrong = ("even", "odd") if k % 2 == 0 else ("odd", "even")
        named = [k if rng.random() < 0.5 else rng.randrange(1, 1000) for _ in range(2)]
        rows.append(
            {"prompt": make_prompt(k), "chosen": f"{named[0]} is {right}.", "rejected": f"{named[1]} is {wrong}."}
        )
    return rows


def main(argv: list[str] | None = None) -> Path:
    """Write the prompts; with --pairs, the preference pairs (parity_pairs.jsonl) instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--pairs" in args:
        args.remove("--pairs")
        out = Path(args[args.index("--out") + 1]) if "--out" in args else DEFAULT_PAIRS_OUT
        rows = build_pairs()
        write_rows(out, rows)
        print(f"wrote {len(rows)} pairs to {out}")
        return out
    return prompts_main(__doc__, DEFAULT_OUT, DEFAULT_N, DEFAULT_SEED, build_rows, args)


if __name__ == "__main__":
    main()
