"""Learning benchmark of the whole chain (`make bench-learning`): `rlhf pipeline pipeline=parity` per seed, one table.

The parity task with a learned reward model (configs/pipeline/parity.yaml): sft, a reward model on preference pairs
of the task, PPO and best-of-N rejection sampling against that reward model, DPO on the same pairs, then `rlhf eval`.
Printed per seed: the reward model's held-out pair accuracy, and for the SFT policy and each aligned policy the gold
accuracy of its greedy answers to the held-out parity prompts (the programmatic judge none of them trained on), the
proxy reward (the reward model's mean score), the win rate against the SFT answers under it, the KL to the SFT policy
(nats per response), and the stage's wall time; then the gold gain of each policy over the SFT policy across seeds.
About 5 minutes per seed on 2 idle CPU cores.

Usage: python scripts/bench_chain.py [--seeds 1] [--threads 2] [--out results.json] [--keep DIR] [--margin 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = ("ppo", "dpo", "rejection_sampling")


def run_chain(seed: int, threads: int, root: Path) -> dict:
    """One `rlhf pipeline pipeline=parity` under `root`; its eval.json results, the rm accuracy and the timings."""
    name = f"parity-s{seed}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    args = ["pipeline", "pipeline=parity", f"run.root={root}", f"run.name={name}", f"seed={seed}",
            "logging.progress=false"]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=root, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"rlhf {' '.join(args)} failed:\n{res.stderr[-3000:]}\n{res.stdout[-2000:]}")
    run_dir = root / name
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    results = json.loads((run_dir / "eval" / "eval.json").read_text())["results"]
    return {"seed": seed, "threads": threads, "seconds": time.perf_counter() - t0,
            "rm_eval_accuracy": stages["rm"]["metrics"].get("eval_accuracy"), "results": results,
            "stage_seconds": {s: r.get("summary", {}).get("stage_seconds") for s, r in stages.items()}}  # fmt: skip


def _cell(row: dict, key: str) -> str:
    return f"{row[key]:.3f} +- {row[key + '_se']:.3f}" if key in row else "-"


def report(runs: list[dict], margin: float) -> bool:
    """Print the table; True when every aligned policy beat the SFT policy's gold accuracy by `margin` in every run."""
    ok = True
    for r in runs:
        print(f"\nseed {r['seed']}, {r['threads']} thread(s), {r['seconds'] / 60:.1f} min; reward model held-out pair "
              f"accuracy {r['rm_eval_accuracy']:.3f}")  # fmt: skip
        print(f"  {'policy':<19}{'gold accuracy':>17}{'proxy reward':>17}{'win vs sft':>17}{'KL to sft':>17}"
              f"{'stage time':>12}")  # fmt: skip
        sft = r["results"]["sft"]
        for name in ("sft", *POLICIES):
            row, seconds = r["results"][name], r["stage_seconds"].get(name)
            time_cell = f"{seconds / 60:.1f} min" if seconds else "-"
            print(f"  {name:<19}{_cell(row, 'gold_mean'):>17}{_cell(row, 'reward_mean'):>17}"
                  f"{_cell(row, 'win_rate'):>17}{_cell(row, 'kl'):>17}{time_cell:>12}")  # fmt: skip
            if name != "sft":
                ok = ok and row["gold_mean"] >= sft["gold_mean"] + margin
    print(f"\ngold gain over the sft policy (bar: +{margin:.2f}):")
    for name in POLICIES:
        gains = [r["results"][name]["gold_mean"] - r["results"]["sft"]["gold_mean"] for r in runs]
        print(f"  {name:<19} " + ", ".join(f"seed {r['seed']}: {g:+.3f}" for r, g in zip(runs, gains, strict=True)))
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--margin", type=float, default=0.1, help="gold gain every aligned policy must reach")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="run under this (new) folder and keep the runs")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            root = (args.keep or Path(tmp)) / f"s{seed}"
            root.mkdir(parents=True)
            runs.append(run_chain(seed, args.threads, root))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "results"}), flush=True)
    ok = report(runs, args.margin)
    if args.out:
        args.out.write_text(json.dumps(runs, indent=2) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
