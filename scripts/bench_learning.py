"""Learning benchmark: `rlhf sft` then `rlhf ppo +experiment=ppo_parity` for several seeds and thread counts, and the
held-out gold accuracy of the greedy policy at every evaluation (step 0 = the SFT policy), the final KL and the time.

The suite's learning test runs one seed; this is the long version that shows the spread (`make bench-learning`,
about 5 minutes per run on 2 CPU cores). Usage: python scripts/bench_learning.py [--seeds 1 2 3] [--threads 2]
[--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rlhf(args: list[str], threads: int, cwd: Path) -> float:
    """Run one `rlhf` command to completion with `threads` intra-op threads; returns its wall time in seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"rlhf {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def one_run(seed: int, threads: int, root: Path) -> dict:
    """sft + ppo_parity for one (seed, threads); the evaluations of the PPO stage and the timings."""
    name = f"parity-s{seed}-t{threads}"
    common = [f"run.root={root}", f"run.name={name}", f"seed={seed}", "logging.progress=false"]
    sft_seconds = rlhf(["sft", *common], threads, root)
    ppo_seconds = rlhf(["ppo", "+experiment=ppo_parity", "stage.save_every=0", *common], threads, root)
    rows = [json.loads(line) for line in (root / name / "ppo" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_score"] for r in rows if "eval_score" in r}
    kl = [r["kl"] for r in rows if "kl" in r]
    return {"seed": seed, "threads": threads, "accuracy": evals, "final_kl": kl[-1], "sft_seconds": sft_seconds,
            "ppo_seconds": ppo_seconds}  # fmt: skip


def report(results: list[dict]) -> None:
    steps = sorted({s for r in results for s in r["accuracy"]})
    print("seed threads " + " ".join(f"acc@{s:<3}" for s in steps) + "  final_kl  sft_s  ppo_s")
    for r in results:
        accs = " ".join(f"{r['accuracy'].get(s, float('nan')):7.3f}" for s in steps)
        print(f"{r['seed']:4d} {r['threads']:7d} {accs}  {r['final_kl']:8.2f}  {r['sft_seconds']:5.0f}  "
              f"{r['ppo_seconds']:5.0f}")  # fmt: skip
    first = [r["accuracy"][steps[0]] for r in results]
    last = [r["accuracy"][steps[-1]] for r in results]
    gains = [b - a for a, b in zip(first, last, strict=True)]
    print(f"start {min(first):.3f}-{max(first):.3f}, end {min(last):.3f}-{max(last):.3f} (median "
          f"{statistics.median(last):.3f}), gain {min(gains):+.3f} to {max(gains):+.3f} over {len(results)} run(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            for seed in args.seeds:
                results.append(one_run(seed, threads, Path(tmp)))
                print(json.dumps(results[-1]), flush=True)
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
