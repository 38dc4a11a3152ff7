"""The README's demo numbers, measured (`make demo-numbers`): the demo chain from scratch, its table, the `rlhf score`
and `rlhf generate` examples, and its wall time, put into README.md between `<!-- demo:<part>:begin -->` and
`<!-- demo:<part>:end -->` markers with the date and commit they came from.

Parts: `table` (what `rlhf pipeline run.name=demo` prints at the end, with a line naming date, commit and time),
`score` (the `rlhf score` example and its output), `generate` (the `rlhf generate` example and its output),
`minutes` (the chain's wall time, in the quick start). Run it on an idle machine: the time is part of the result.

Usage: python scripts/demo_numbers.py [--readme README.md] [--root DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SCORE_ARGS = ["run.name=demo", 'prompt="What is 2 + 2?"', 'response="2 + 2 = 4."']
GENERATE_ARGS = ["run.name=demo", "stage=ppo", 'prompt="What is the capital of France?"']


def rlhf(args: list[str], root: Path, threads: int) -> str:
    """What `rlhf <args> run.root=<root>` printed: its stdout, or its stderr when the command prints its report there
    (the pipeline's summary) (quotes in `args` are for the README and stripped here)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    argv = [a.replace('"', "") for a in args] + [f"run.root={root}"]
    res = subprocess.run([sys.executable, "-m", "rlhf_cli", *argv], cwd=root, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"rlhf {' '.join(argv)} failed:\n{res.stderr[-3000:]}")
    return res.stdout if res.stdout.strip() else res.stderr


def chain_minutes(manifest: Path) -> float:
    """Wall time of the chain: from the first stage's start to the last stage's end, as the manifest recorded them
    (the same on a re-run that skips every stage)."""
    stages = json.loads(manifest.read_text())["stages"].values()
    start = min(datetime.datetime.fromisoformat(r["started_at"]) for r in stages)
    end = max(datetime.datetime.fromisoformat(r["ended_at"]) for r in stages)
    return (end - start).total_seconds() / 60


def measure(root: Path, threads: int) -> dict[str, str]:
    """Run the demo chain under `root` and the two examples; the README parts they give."""
    out = rlhf(["pipeline", "run.name=demo", "logging.progress=false"], root, threads)
    minutes = chain_minutes(root / "demo" / "manifest.json")
    table = out[out.index("pipeline summary:") :].strip().replace(str(root) + "/", "runs/")
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        or "unknown"
    )
    stamp = (
        f"Measured {datetime.date.today().isoformat()} at commit {commit} on {os.cpu_count()} CPU cores "
        f"({threads} threads): the chain took {minutes:.1f} min (`python scripts/demo_numbers.py`)."
    )
    score = rlhf(["score", *SCORE_ARGS], root, threads).strip().replace(str(root) + "/", "runs/")
    generated = rlhf(["generate", *GENERATE_ARGS], root, threads).strip()
    return {
        "table": f"{stamp}\n\n```\n{table}\n```\n",
        "score": f"```bash\nrlhf score {' '.join(SCORE_ARGS)}     # this run's rm/final\n# {score}\n```\n",
        "generate": f"```\n$ rlhf generate {' '.join(GENERATE_ARGS)}\n{generated}\n```\n",
        "minutes": f"{minutes:.0f}",
    }


def update(readme: Path, parts: dict[str, str]) -> None:
    """Put each part between its markers (inline for `minutes`); a marker pair missing is an error."""
    text = readme.read_text()
    for name, body in parts.items():
        begin, end = f"<!-- demo:{name}:begin -->", f"<!-- demo:{name}:end -->"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"{readme}: no {begin} ... {end} markers")
        replacement = begin + ("" if "\n" not in body else "\n") + body + end  # minutes: inline
        text = pattern.sub(lambda _, new=replacement: new, text)
    readme.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parent.parent / "README.md")
    parser.add_argument("--root", type=Path, default=None, help="run under this (new) folder and keep the run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        parts = measure(root.resolve(), args.threads)
    update(args.readme, parts)
    print(parts["table"] + parts["score"] + parts["generate"])


if __name__ == "__main__":
    main()
