"""Write rlhf_cli/assets/sample_prompts.jsonl: the default PPO prompt set, drawn from the SFT sample's tasks.

Prompts come from the task families of make_sample_data.py (the SFT sample), each family drawn in proportion to
its quota there, with another seed, and none of them a prompt of the SFT sample: the policy meets familiar tasks
on new instances. A prompt is the instruction joined with its context exactly as the Dolly adapter joins them, in
the generic `jsonl` prompt format (`{"prompt": ...}`). Same seed -> byte-identical file.

    python scripts/make_sample_prompts.py                      # rewrites the shipped file
    python scripts/make_sample_prompts.py --out /tmp/p.jsonl --seed 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from rlhf_cli.data.adapters import dolly_row
from rlhf_cli.tasks import write_rows

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "rlhf_cli" / "assets" / "sample_prompts.jsonl"
DEFAULT_SEED = 2  # make_sample_data uses 0 and make_sample_preferences 1: other draws, mostly new prompts
TOTAL_PROMPTS = 500


sys.path.insert(0, str(HERE))  # scripts/ is not a package: import the sibling that holds the task families
import make_sample_data as SD  # noqa: E402


def dolly_prompt(instruction: str, context: str) -> str:
    """The user message the Dolly adapter makes of a row (the reply column is not part of it)."""
    return dolly_row({"instruction": instruction, "context": context, "response": "-"}, "generated")[0]["content"]


def build_rows(seed: int = DEFAULT_SEED, n: int = TOTAL_PROMPTS) -> list[dict[str, str]]:
    """n unique prompts, each from a family drawn with its SFT quota as weight; SFT-sample prompts are skipped.

    Small curated families run out of new prompts early; their draws are then retried, so they end up below
    their share and the generated families above it.
    """
    r = random.Random(seed)
    makers = [make for make, _, _ in SD.FAMILIES]
    weights = [quota for _, _, quota in SD.FAMILIES]
    seen = {dolly_prompt(row["instruction"], row["context"]) for row in _read_jsonl(SD.DEFAULT_OUT)}
    rows: list[dict[str, str]] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 100 * n:
            raise RuntimeError(f"only {len(rows)} new unique prompts of {n}")
        (make,) = r.choices(makers, weights)
        instruction, context, _ = make(r)
        prompt = dolly_prompt(instruction, context)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt})
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    write_rows(args.out, build_rows(args.seed))
    print(f"wrote {TOTAL_PROMPTS} prompts to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
