"""Learning benchmark: the parity task's learning stages after one `rlhf sft` per seed, with the spread over seeds.

For each (seed, threads): `rlhf sft`, then each stage on its own copy of that run, and the held-out gold accuracy of
the greedy policy at every evaluation (the first = the SFT policy):
- ppo: `rlhf ppo +experiment=ppo_parity` (60 iterations, `eval_score` every 15), the final KL and the time;
- rejection_sampling: `rlhf rejection_sampling +experiment=rs_parity` (2 rounds of best-of-8, `eval_gold` before
  round 1 and after each round), the mean score of all / the selected candidates per round and the time;
- grpo, rloo, reinforce_pp (only when asked for): `+experiment=grpo_parity` (40 iterations, `eval_gold` every 10;
  rloo at kl_coef 0.01), the final KL and the time.

tests/integration/test_learning_stages.py runs a short version of ppo, rejection sampling and grpo (30 PPO
iterations, one round, 20 GRPO iterations) for seed 42 (and seed 2); this is the full-length check that shows the
spread (about 6 minutes per seed on 2 CPU cores: sft about 2, ppo 2-2.5, rejection sampling 1-1.5; each critic-free
stage 4-5 more).

Usage: python scripts/bench_learning.py [--seeds 1 2 3] [--threads 2] [--stages ppo rejection_sampling]
[--out results.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = {
    "ppo": ["ppo", "+experiment=ppo_parity", "stage.save_every=0"],
    "rejection_sampling": ["rejection_sampling", "+experiment=rs_parity"],
    "grpo": ["grpo", "+experiment=grpo_parity", "stage.save_every=0"],
    "rloo": ["rloo", "+experiment=grpo_parity", "stage.kl_coef=0.01", "stage.save_every=0"],
    "reinforce_pp": ["reinforce_pp", "+experiment=grpo_parity", "stage.save_every=0"],
}
DEFAULT_STAGES = ["ppo", "rejection_sampling"]


def rlhf(args: list[str], threads: int, cwd: Path) -> float:
    """Run one `rlhf` command to completion with `threads` intra-op threads; returns its wall time in seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"rlhf {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def rows(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def iteration_result(log: list[dict], key: str) -> dict:
    """Held-out accuracy (`key`) by iteration (0 = the SFT policy), the EOS fraction of the last evaluation, the final
    KL (nan when the stage logs none)."""
    evals = [r for r in log if key in r]
    kl = [r["kl"] for r in log if "kl" in r]
    return {
        "accuracy": {r["step"]: r[key] for r in evals},
        "eos": evals[-1]["eval_eos_fraction"],
        "final_kl": kl[-1] if kl else float("nan"),
    }


def rs_result(log: list[dict]) -> dict:
    """Held-out accuracy by round (0 = the SFT policy), the EOS fraction of the last evaluation, and per round the
    mean score of all candidates and of the selected ones."""
    evals = [r for r in log if "eval_gold" in r]  # before round 1, then after each round (the last without "round")
    picks = [r for r in log if "selected_score_mean" in r]
    return {
        "accuracy": dict(enumerate(r["eval_gold"] for r in evals)),
        "eos": evals[-1]["eval_eos_fraction"],
        "candidate_score_mean": {r["round"]: r["candidate_score_mean"] for r in picks},
        "selected_score_mean": {r["round"]: r["selected_score_mean"] for r in picks},
    }


RESULTS = {
    "ppo": lambda log: iteration_result(log, "eval_score"),
    "rejection_sampling": rs_result,
    **{stage: lambda log: iteration_result(log, "eval_gold") for stage in ("grpo", "rloo", "reinforce_pp")},
}


def one_run(seed: int, threads: int, root: Path, stages: list[str]) -> dict:
    """sft once for (seed, threads), then each stage on its own copy of that run; evaluations and timings."""
    name = f"parity-s{seed}-t{threads}"
    common = [f"run.name={name}", f"seed={seed}", "logging.progress=false"]
    sft_root = root / "sft"
    result = {"seed": seed, "threads": threads}
    result["sft_seconds"] = rlhf(["sft", f"run.root={sft_root}", *common], threads, root)
    for stage in stages:
        stage_root = root / stage
        shutil.copytree(sft_root / name, stage_root / name, ignore=shutil.ignore_patterns(".lock"))
        seconds = rlhf([*STAGES[stage], f"run.root={stage_root}", *common], threads, root)
        result[stage] = {**RESULTS[stage](rows(stage_root / name, stage)), "seconds": seconds}
    return result


def spread(label: str, values: list[float]) -> str:
    return f"{label} {min(values):.3f}-{max(values):.3f} (median {statistics.median(values):.3f})"


def report(results: list[dict], stage: str) -> None:
    """One table per stage: a row per (seed, threads), then per evaluation the range over runs and the gain over the
    SFT policy."""
    done = [r for r in results if stage in r]
    if not done:
        return
    points = sorted({p for r in done for p in r[stage]["accuracy"]})
    tag = "r" if stage == "rejection_sampling" else ""  # rejection sampling evaluates per round, PPO per iteration
    rounds = sorted({p for r in done for p in r[stage].get("candidate_score_mean", {})})
    head = " ".join(f"{'acc@' + tag + str(p):>7}" for p in points)
    extra = "  final_kl" if not tag else "".join(f"  cand@r{p}  sel@r{p}" for p in rounds)
    print(f"\n{stage}\nseed threads {head}  eos{extra}  sft_s  stage_s")
    for r in done:
        s = r[stage]
        accs = " ".join(f"{s['accuracy'].get(p, float('nan')):7.3f}" for p in points)
        if not tag:
            extra = f"  {s['final_kl']:8.2f}"
        else:
            extra = "".join(
                f"  {s['candidate_score_mean'].get(p, float('nan')):7.3f}  "
                f"{s['selected_score_mean'].get(p, float('nan')):6.3f}"
                for p in rounds
            )
        print(
            f"{r['seed']:4d} {r['threads']:6d} {accs}  {s['eos']:.2f}{extra}  {r['sft_seconds']:5.0f}  "
            f"{s['seconds']:7.0f}"
        )
    start = [r[stage]["accuracy"][points[0]] for r in done]
    lines = [spread("start (the SFT policy): accuracy", start)]
    for p in points[1:]:
        acc = [r[stage]["accuracy"].get(p, float("nan")) for r in done]
        gains = [b - a for a, b in zip(start, acc, strict=True)]
        where = f"after round {p}" if tag else f"at {p} iterations"
        lines.append(f"{spread(where + ': accuracy', acc)}, gain {min(gains):+.3f} to {max(gains):+.3f}")
    print("\n".join(lines) + f"\nover {len(done)} run(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=DEFAULT_STAGES)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="run under this (new) folder and keep the runs")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            for seed in args.seeds:
                root = (args.keep or Path(tmp)) / f"s{seed}-t{threads}"
                root.mkdir(parents=True)
                results.append(one_run(seed, threads, root, args.stages))
                print(json.dumps(results[-1]), flush=True)
    for stage in args.stages:
        report(results, stage)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
