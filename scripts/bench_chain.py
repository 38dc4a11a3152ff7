"""Learning benchmark of the whole chain (`make bench-learning`): `rlhf pipeline pipeline=parity` per seed.

The parity task with a learned reward model (configs/pipeline/parity.yaml): sft, a reward model on preference pairs
of the task, PPO, best-of-N rejection sampling, GRPO and RLOO against that reward model, DPO on the same pairs, then
`rlhf eval`. Each seed's table gives the reward model's held-out pair accuracy, and for the SFT policy and each
aligned policy the gold accuracy of its greedy answers to the held-out parity prompts (the programmatic judge none of
them trained on), the proxy reward (the reward model's mean score), the win rate against the SFT answers under it,
the KL to the SFT policy (nats per response) and the stage's wall time. Then, over the seeds: each policy's gold gain
over SFT (mean, spread, worst seed) and its mean KL, and for the online stages the proxy-vs-gold curve of their
held-out evaluations during training (over-optimisation shows as the proxy climbing while the gold stalls).

Exit status 1 when a policy's mean gain is under the bar (--margin) or any seed's gain is under zero.
`--markdown FILE` writes the summary as a markdown table stamped with the date and commit, and `--doc` puts that
table between the `<!-- bench-learning:begin -->` / `<!-- bench-learning:end -->` markers of docs/benchmarks.md
(section "Does each stage help? The learning benchmark"; `--doc FILE` for another page with the markers, checked before
anything runs). `--readme FILE` is the option's former name (the table moved from the README to docs/benchmarks.md).
About 7 minutes per seed on 2 idle CPU cores.

Usage: python scripts/bench_chain.py [--seeds 1 2 3] [--threads 2] [--margin 0.1] [--out results.json]
[--keep DIR] [--markdown FILE] [--doc [FILE]]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = ("ppo", "dpo", "rejection_sampling", "grpo", "rloo")
ONLINE = ("ppo", "rejection_sampling", "grpo", "rloo")
PARITY = Path(__file__).resolve().parent.parent / "rlhf_cli" / "assets" / "parity.jsonl"
BEGIN, END = "<!-- bench-learning:begin -->", "<!-- bench-learning:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"  # the page whose markers hold the table


def run_chain(seed: int, threads: int, root: Path) -> dict:
    """One `rlhf pipeline pipeline=parity` under `root`: its eval.json results, the rm accuracy, the timings and the
    online stages' held-out evaluations during training ({stage: [{step, proxy, gold}]})."""
    name = f"parity-s{seed}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    args = [
        "pipeline",
        "pipeline=parity",
        f"run.root={root}",
        f"run.name={name}",
        f"seed={seed}",
        "logging.progress=false",
    ]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=root, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"rlhf {' '.join(args)} failed:\n{res.stderr[-3000:]}\n{res.stdout[-2000:]}")
    run_dir = root / name
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    results = json.loads((run_dir / "eval" / "eval.json").read_text())["results"]
    return {
        "seed": seed,
        "threads": threads,
        "seconds": time.perf_counter() - t0,
        "rm_eval_accuracy": stages["rm"]["metrics"].get("eval_accuracy"),
        "results": results,
        "stage_seconds": {s: r.get("summary", {}).get("stage_seconds") for s, r in stages.items()},
        "curves": {s: curve(run_dir / s / "metrics.jsonl") for s in ONLINE},
        "rm_on_prompts": rm_on_prompts(run_dir / "rm" / "final", root, env),
    }


def curve(metrics: Path) -> list[dict]:
    """The held-out evaluations a stage logged while training: step, proxy (eval_score) and gold (eval_gold)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{"step": r["step"], "proxy": r["eval_score"], "gold": r["eval_gold"]} for r in rows if "eval_gold" in r]


def rm_on_prompts(model: Path, root: Path, env: dict) -> dict:
    """What the reward model makes of the parity prompts themselves (`rlhf score`), as the share of the 600 prompts on
    which it scores the right answer word above the wrong one: `accuracy` for replies that restate the prompt's number
    ("N is odd." vs "N is even."), `accuracy_other` for replies that name another number (42 and 17, both words:
    right or wrong by the prompt's number, as the gold judges). What optimising it can reach is bounded by these."""
    rows = []
    for prompt in (json.loads(line)["prompt"] for line in PARITY.read_text().splitlines()):
        n = int(prompt.split()[1])
        right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
        rows += [{"prompt": prompt, "response": f"{m} is {word}."} for m in (n, 42, 17) for word in (right, wrong)]
    (root / "rm_probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["score", f"model={model}", f"input={root / 'rm_probe.jsonl'}", f"output={root / 'rm_probe_scored.jsonl'}"]
    res = subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=root, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"rlhf {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    scores = [json.loads(line)["score"] for line in (root / "rm_probe_scored.jsonl").read_text().splitlines()]
    right_above = [scores[i] > scores[i + 1] for i in range(0, len(scores), 2)]  # (n, 42, 17) per prompt
    return {
        "accuracy": statistics.fmean(right_above[0::3]),
        "accuracy_other": statistics.fmean(right_above[1::3] + right_above[2::3]),
    }


def gains(runs: list[dict], name: str) -> list[float]:
    return [r["results"][name]["gold_mean"] - r["results"]["sft"]["gold_mean"] for r in runs]


def _cell(row: dict, key: str) -> str:
    return f"{row[key]:.3f} +- {row[key + '_se']:.3f}" if key in row else "-"


def print_seed(r: dict) -> None:
    print(
        f"\nseed {r['seed']}, {r['threads']} thread(s), {r['seconds'] / 60:.1f} min; reward model held-out pair "
        f"accuracy {r['rm_eval_accuracy']:.3f}; on the 600 parity prompts it prefers the right answer word "
        f"{r['rm_on_prompts']['accuracy']:.3f} of the time in replies restating the prompt's number, "
        f"{r['rm_on_prompts']['accuracy_other']:.3f} in replies naming another"
    )
    print(
        f"  {'policy':<19}{'gold accuracy':>17}{'proxy reward':>17}{'win vs sft':>17}{'KL to sft':>17}"
        f"{'stage time':>12}"
    )
    for name in ("sft", *POLICIES):
        row, seconds = r["results"][name], r["stage_seconds"].get(name)
        time_cell = f"{seconds / 60:.1f} min" if seconds else "-"
        print(
            f"  {name:<19}{_cell(row, 'gold_mean'):>17}{_cell(row, 'reward_mean'):>17}"
            f"{_cell(row, 'win_rate'):>17}{_cell(row, 'kl'):>17}{time_cell:>12}"
        )


def summary(runs: list[dict], margin: float) -> list[dict]:
    """Per policy over the seeds: gold gain mean / std / min, mean KL and proxy, and whether it passes."""
    out = []
    for name in POLICIES:
        g = gains(runs, name)
        spread = statistics.stdev(g) if len(g) > 1 else 0.0
        out.append(
            {
                "policy": name,
                "gains": g,
                "mean": statistics.fmean(g),
                "std": spread,
                "min": min(g),
                "kl": statistics.fmean(r["results"][name]["kl"] for r in runs),
                "proxy": statistics.fmean(r["results"][name]["reward_mean"] for r in runs),
                "ok": statistics.fmean(g) >= margin and min(g) >= 0.0,
            }
        )
    return out


def curve_cells(runs: list[dict], stage: str) -> list[str]:
    """ "step: proxy / gold" at each held-out evaluation of `stage`, averaged over the seeds."""
    cells = []
    for step in sorted({p["step"] for r in runs for p in r["curves"][stage]}):
        points = [p for r in runs for p in r["curves"][stage] if p["step"] == step]
        proxy, gold = (statistics.fmean(p[k] for p in points) for k in ("proxy", "gold"))
        cells.append(f"{step}: {proxy:.2f} / {gold:.3f}")
    return cells


def print_curves(runs: list[dict]) -> None:
    print("\nproxy (reward model) / gold at each held-out evaluation during training, mean over seeds:")
    for stage in ONLINE:
        print(f"  {stage:<19} " + "   ".join(curve_cells(runs, stage)))


def print_summary(rows: list[dict], runs: list[dict], margin: float) -> None:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    print(f"\ngold gain over the sft policy, seeds {seeds} (bar: mean >= +{margin:.2f} and no seed below 0):")
    for row in rows:
        per_seed = ", ".join(f"{g:+.3f}" for g in row["gains"])
        verdict = "ok" if row["ok"] else "FAIL"
        print(
            f"  {row['policy']:<19} mean {row['mean']:+.3f} +- {row['std']:.3f} (min {row['min']:+.3f}; "
            f"{per_seed})  KL {row['kl']:.1f}  proxy {row['proxy']:.2f}  {verdict}"
        )


def markdown(rows: list[dict], runs: list[dict], margin: float) -> str:
    """The summary as a markdown table with the date, the commit and the seeds it came from."""
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        or "unknown"
    )
    minutes = sum(r["seconds"] for r in runs) / 60
    sft = statistics.fmean(r["results"]["sft"]["gold_mean"] for r in runs)
    rm = statistics.fmean(r["rm_eval_accuracy"] for r in runs)
    probe = {k: statistics.fmean(r["rm_on_prompts"][k] for r in runs) for k in ("accuracy", "accuracy_other")}
    lines = [
        f"Measured {datetime.date.today().isoformat()} at commit {commit} (`scripts/bench_chain.py --seeds "
        f"{' '.join(str(r['seed']) for r in runs)}`, {runs[0]['threads']} threads, {minutes:.1f} min); sft gold "
        f"accuracy {sft:.3f}; the reward model: held-out pair accuracy {rm:.3f}, right answer word preferred "
        f"on the parity prompts {probe['accuracy']:.3f} (replies restating N), {probe['accuracy_other']:.3f} "
        f"(replies naming another number) (means over seeds).",
        "",
        "| policy | gold gain over sft, mean +- std | per seed | worst seed | KL to sft (nats) | proxy reward | "
        f"bar +{margin:.2f} |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        per_seed = " / ".join(f"{g:+.3f}" for g in row["gains"])
        lines.append(
            f"| {row['policy']} | {row['mean']:+.3f} +- {row['std']:.3f} | {per_seed} | {row['min']:+.3f} | "
            f"{row['kl']:.1f} | {row['proxy']:.2f} | {'ok' if row['ok'] else 'FAIL'} |"
        )
    lines += [
        "",
        "Proxy (reward-model score) / gold accuracy at each held-out evaluation during training (step: proxy "
        "/ gold, mean over seeds; rejection sampling's steps are its fine-tuning steps, one evaluation per "
        "round):",
        "",
    ]
    lines += [f"- {stage}: " + ", ".join(curve_cells(runs, stage)) for stage in ONLINE]
    return "\n".join(lines) + "\n"


def check_markers(doc: Path, begin: str = BEGIN, end: str = END) -> str:
    """The page's text; an error naming the page when it lacks the markers (before a run of many minutes)."""
    text = doc.read_text() if doc.is_file() else ""
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: no {begin} ... {end} markers to put the table between (they are in {DOC})")
    return text


def update_doc(doc: Path, table: str, begin: str = BEGIN, end: str = END) -> None:
    """Put `table` between the page's markers, leaving the rest of the page as it is (also scripts/bench_distill.py's
    table, with its own markers)."""
    head, rest = check_markers(doc, begin, end).split(begin, 1)
    doc.write_text(head + begin + "\n" + table + end + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--margin", type=float, default=0.1, help="mean gold gain every aligned policy must reach")
    parser.add_argument("--out", type=Path, default=None, help="every seed's results as JSON")
    parser.add_argument("--keep", type=Path, default=None, help="run under this (new) folder and keep the runs")
    parser.add_argument("--markdown", type=Path, default=None, help="write the summary table here")
    parser.add_argument(
        "--doc",
        "--readme",
        type=Path,
        nargs="?",
        const=DOC,
        default=None,
        metavar="FILE",
        help="put the table between this page's markers (default docs/benchmarks.md)",
    )
    args = parser.parse_args()
    if args.doc:
        check_markers(args.doc)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            root = (args.keep or Path(tmp)) / f"s{seed}"
            root.mkdir(parents=True)
            runs.append(run_chain(seed, args.threads, root))
            print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("results", "curves")}), flush=True)
    for r in runs:
        print_seed(r)
    rows = summary(runs, args.margin)
    print_curves(runs)
    print_summary(rows, runs, args.margin)
    if args.out:
        args.out.write_text(json.dumps(runs, indent=2) + "\n")
    table = markdown(rows, runs, args.margin)
    if args.markdown:
        args.markdown.write_text(table)
    if args.doc:
        update_doc(args.doc, table)
    sys.exit(0 if all(row["ok"] for row in rows) else 1)


if __name__ == "__main__":
    main()
