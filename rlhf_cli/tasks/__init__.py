"""Synthetic verifiable tasks: seeded prompts with a programmatic gold reward, for testing that RL stages learn.

A task module exposes `gold_reward(prompts, responses) -> list[float]`, which users name as `module:function`
(e.g. `rlhf_cli.tasks.word_order:gold_reward`). Task modules import only the standard library, so the data
scripts that share their tables stay light.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


def write_rows(path: Path | str, rows: list[dict[str, str]]) -> Path:
    """Rows as JSON lines (UTF-8, '\\n' endings), so the same rows give byte-identical files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


def prompts_main(
    doc: str, default_out: Path, n: int, seed: int, build_rows: Callable[[int, int], list], argv: list[str] | None
) -> Path:
    """`python -m rlhf_cli.tasks.<task> [--out F] [--n N] [--seed S]`: write the task's prompt file."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--seed", type=int, default=seed)
    args = parser.parse_args(argv)
    out = write_rows(args.out, build_rows(args.n, args.seed))
    print(f"wrote {args.n} prompts to {out}")
    return out
