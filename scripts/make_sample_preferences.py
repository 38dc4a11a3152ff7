"""Write rlhf_cli/assets/sample_preferences.jsonl: seeded synthetic preference pairs on the sample_dolly tasks.

Prompts come from the task families of make_sample_data.py (the SFT sample), so a model fine-tuned on that
sample meets familiar prompts in the reward-model and DPO stages. In every pair, `chosen` is the correct,
polite, complete answer and `rejected` the same answer spoiled in one of five ways (`kind` names it): a wrong
fact or number, a rude or dismissive tone, an answer to another question, an unfinished answer, or a stutter
of repeated words. Cuts and additions balance out, so length alone does not tell chosen from rejected.
Same seed -> byte-identical file.

    python scripts/make_sample_preferences.py                      # rewrites the shipped file
    python scripts/make_sample_preferences.py --out /tmp/p.jsonl --seed 0
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "rlhf_cli" / "assets" / "sample_preferences.jsonl"
DEFAULT_SEED = 1  # not make_sample_data's 0: the arithmetic and other generated prompts differ from the SFT rows
TOTAL_PAIRS = 594  # each family of the SFT sample at 1.5x its quota, rounded down


def _load_sample_data():
    # scripts/ is not a package; load the sibling by path so this works however the script is started.
    spec = importlib.util.spec_from_file_location("make_sample_data", HERE / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SD = _load_sample_data()

# Weights of the corruption kinds; a kind that does not apply to an answer falls back to the next one.
KINDS = {"wrong_fact": 0.3, "off_topic": 0.2, "rude": 0.2, "truncated": 0.15, "repetition": 0.15}
RUDE_PREFIXES = ["Ugh, fine.", "Obviously.", "Seriously? Fine.", "What a silly question.", "Whatever."]
RUDE_SUFFIXES = ["Now stop bothering me.", "Even a child knows that.", "Think for yourself next time.", "Duh."]
DISMISSALS = [
    "I am not going to answer that, look it up yourself.",
    "That is a boring question and I have better things to do.",
    "Figure it out on your own.",
    "Why would I waste my time on this?",
    "Ask someone else, I do not care.",
    "Stop asking me such basic things.",
]
NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]


def _swap_table() -> dict[str, list[str]]:
    """Entity -> wrong replacements: another member of the same set (a brainstorm item: one of another topic)."""
    groups = [
        [city for _, city in SD.CAPITALS],
        [country for country, _ in SD.CAPITALS],
        SD.DAYS,
        SD.MONTHS,
        SD.CITIES,
        SD.JOBS,
        SD.HOBBIES,
        ["even", "odd"],
        ["fruit", "vegetable"],
        sorted(SD.ANIMALS),
        ["larger", "smaller"],
        NUMBER_WORDS,
        PLANETS,
        [f"'{b}'" for _, b in SD.ANTONYMS],
        [f"'{many}'" for _, many in SD.PLURALS],
    ]
    table: dict[str, list[str]] = {}
    for group in groups:
        for entry in group:
            table.setdefault(entry, [other for other in dict.fromkeys(group) if other != entry])
    for topic, items in SD.BRAINSTORM.items():
        others = [x for t, xs in sorted(SD.BRAINSTORM.items()) if t != topic for x in xs]
        for item in items:
            table.setdefault(item, others)
    return table


SWAPS = _swap_table()
# Longest first, so "Mexico City" wins over "Mexico" and "New Delhi" is one entity.
SWAP_RE = re.compile(
    r"(?<![\w'])(" + "|".join(re.escape(k) for k in sorted(SWAPS, key=len, reverse=True)) + r")(?![\w'])"
)
NUMBER_RE = re.compile(r"\d+")


def wrong_fact(r: random.Random, prompt: str, answer: str, pool: list[str]) -> str | None:
    """The answer with one fact changed: a list out of order, a derived number, or a swapped entity."""
    items = answer.split(", ")
    if len(items) >= 3 and all(re.fullmatch(r"[a-z]+", item) for item in items):  # reverse / sort tasks
        wrong = items[:]
        while wrong == items:
            r.shuffle(wrong)
        return ", ".join(wrong)
    derived = [m.group() for m in NUMBER_RE.finditer(answer) if not re.search(rf"\b{m.group()}\b", prompt)]
    if derived:  # a number the answer computed (not copied from the prompt): change it everywhere
        return _fix_times(re.sub(rf"\b{derived[0]}\b", str(_other_number(r, int(derived[0]))), answer))
    entities = list(SWAP_RE.finditer(answer))
    if entities:  # the last entity is usually the answer ("The capital of France is Paris.")
        m = entities[-1]
        return answer[: m.start()] + r.choice(SWAPS[m.group()]) + answer[m.end() :]
    return None


def _other_number(r: random.Random, n: int) -> int:
    step = max(1, n // 10) * r.choice([-3, -2, -1, 1, 2, 3])
    return n + step if n + step >= 0 else n + abs(step)


def _fix_times(text: str) -> str:
    # Keep "1 time" / "2 times" grammatical, so the grammar is no cue that a count is wrong.
    text = re.sub(r"\b1 times\b", "1 time", text)
    return re.sub(r"\b(\d*[02-9]|\d{2,}) time\b", r"\1 times", text)


def rude(r: random.Random, prompt: str, answer: str, pool: list[str]) -> str:
    form = r.randrange(3)
    if form == 0:
        return f"{r.choice(RUDE_PREFIXES)} {answer}"
    if form == 1:
        return f"{answer} {r.choice(RUDE_SUFFIXES)}"
    return r.choice(DISMISSALS)


def off_topic(r: random.Random, prompt: str, answer: str, pool: list[str]) -> str:
    """A correct answer, but to another family's question."""
    return r.choice(pool)


def truncated(r: random.Random, prompt: str, answer: str, pool: list[str]) -> str | None:
    words = answer.split()
    if len(words) < 4:
        return None
    keep = r.randint(max(2, round(0.4 * len(words))), max(2, round(0.7 * len(words))))
    return " ".join(words[:keep]).rstrip(",.;:")


def repetition(r: random.Random, prompt: str, answer: str, pool: list[str]) -> str | None:
    """A span of one to three words said two or three times, the way a degenerate model loops."""
    words = answer.split()
    if len(words) < 3:
        return None
    size = r.randint(1, min(3, len(words) - 1))
    start = r.randrange(len(words) - size)
    span = words[start : start + size]
    return " ".join(words[: start + size] + span * r.randint(1, 2) + words[start + size :])


CORRUPT = {
    "wrong_fact": wrong_fact,
    "off_topic": off_topic,
    "rude": rude,
    "truncated": truncated,
    "repetition": repetition,
}


def build_pairs(seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """TOTAL_PAIRS pairs, unique by (prompt, rejected), families at 1.5x their SFT quota, shuffled together."""
    r = random.Random(seed)
    quotas = [(make, 3 * n // 2) for make, _, n in SD.FAMILIES]
    assert sum(n for _, n in quotas) == TOTAL_PAIRS
    pairs: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for make, quota in quotas:
        # Off-topic answers come from the other families, so they never answer a near-identical question.
        pool = [other(r)[2] for other, _, _ in SD.FAMILIES if other is not make for _ in range(5)]
        made, tries = 0, 0
        while made < quota:
            tries += 1
            if tries > 100 * quota:
                raise RuntimeError(f"{make.__name__}: only {made} unique pairs of {quota}")
            instruction, context, answer = make(r)
            prompt = _join(instruction, context)
            kind, rejected = _corrupt(r, prompt, answer, pool)
            if (prompt, rejected) in seen or rejected == answer:
                continue
            seen.add((prompt, rejected))
            pairs.append({"prompt": prompt, "chosen": answer, "rejected": rejected, "kind": kind})
            made += 1
    r.shuffle(pairs)
    return pairs


def _join(instruction: str, context: str) -> str:
    # The Dolly adapter's layout (rlhf_cli/data/adapters.py): the context after a blank line.
    return f"{instruction}\n\n{context}" if context else instruction


def _corrupt(r: random.Random, prompt: str, answer: str, pool: list[str]) -> tuple[str, str]:
    kinds = list(KINDS)
    first = r.choices(kinds, weights=list(KINDS.values()))[0]
    order = kinds[kinds.index(first) :] + kinds[: kinds.index(first)]
    for kind in order:
        rejected = CORRUPT[kind](r, prompt, answer, pool)
        if rejected is not None and rejected != answer:
            return kind, rejected
    raise RuntimeError(f"no corruption applies to {answer!r}")  # rude always applies


def stats(pairs: list[dict[str, str]]) -> str:
    n = len(pairs)
    chosen = sum(len(p["chosen"]) for p in pairs) / n
    rejected = sum(len(p["rejected"]) for p in pairs) / n
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(Counter(p["kind"] for p in pairs).items()))
    return f"{n} pairs; mean characters chosen {chosen:.1f} / rejected {rejected:.1f}; kinds: {kinds}"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    pairs = build_pairs(args.seed)
    SD.write_jsonl(pairs, args.out)
    print(f"wrote {args.out}: {stats(pairs)}")
    return args.out


if __name__ == "__main__":
    main()
