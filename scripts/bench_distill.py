"""On-policy distillation benchmark: a smaller student learns the parity task from a teacher the chain made good at
it, against GRPO with the gold reward from the same start with the same number of sampled answers.

Per seed (each its own runs under one root):
- teacher: `rlhf sft` (the tiny default, 4 layers x 256) then `rlhf rejection_sampling +experiment=rs_parity`;
- student: `rlhf sft` of a smaller tiny model (2 layers x 128, about 4x fewer parameters; the same tokenizer);
- distill: a copy of the student's run, `rlhf distill +experiment=distill_parity stage.teacher=<the teacher's stage>`
  (no reward: the teacher's distributions are the whole signal);
- grpo: another copy, `rlhf grpo +experiment=grpo_parity` with as many iterations as give the distillation's number
  of sampled answers (16 prompts x 8 samples per iteration against 32 x 2: 20 iterations for distill's 40).

Reported per seed and as mean +- std over seeds: the student's held-out gold before / after distill / after GRPO,
the answers each sampled, the teacher's gold, the reverse KL to the teacher (per token and per answer, sampled
estimate, the last iteration's) and the student's greedy agreement with the teacher, and each part's time. Exits 1
when distillation's mean gain is under `--margin` or any seed's gain is <= 0.

tests/integration/test_learning_distill.py is the suite's short version (the teacher one round of rs_parity, the
students two smaller sft starts, 20 iterations). About 2.5 minutes per seed on 2 CPU cores (7.6 min for 3 seeds).

Usage: python scripts/bench_distill.py [--seeds 1 2 3] [--threads 2] [--margin 0.1] [--out results.json]
[--keep DIR] [--doc [FILE]]
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

from bench_chain import check_markers, update_doc  # scripts/: the same page, other markers

BEGIN, END = "<!-- bench-distill:begin -->", "<!-- bench-distill:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
# The student's shape: half the default's layers and width (configs/model/tiny_llama.yaml: 4 x 256, 688, 8 / 4 heads).
STUDENT = [
    "model.tiny.hidden_size=128",
    "model.tiny.intermediate_size=344",
    "model.tiny.num_hidden_layers=2",
    "model.tiny.num_attention_heads=4",
    "model.tiny.num_key_value_heads=2",
]
DISTILL_ITERATIONS = 40
DISTILL_ANSWERS = 32 * 2  # configs/experiment/distill_parity.yaml: rollout_batch_size x n_samples
GRPO_ANSWERS = 16 * 8  # configs/experiment/grpo_parity.yaml


def rlhf(args: list[str], threads: int, cwd: Path) -> float:
    """Run one `rlhf` command to completion with `threads` intra-op threads; its wall time in seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"rlhf {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def rows(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def gold_curve(log: list[dict]) -> dict[int, float]:
    """Held-out gold accuracy by iteration (0 = the start)."""
    return {r["step"]: r["eval_gold"] for r in log if "eval_gold" in r}


def answers(log: list[dict]) -> int:
    """The answers the stage sampled for training (all iterations)."""
    return int(sum(r.get("rollout_sequences", 0) for r in log))


def one_seed(seed: int, threads: int, root: Path) -> dict:
    """Teacher, student, then distill and GRPO on copies of the student's run; the numbers of the summary."""
    common = [f"seed={seed}", f"run.root={root}", "logging.progress=false", "logging.plots=false"]
    res: dict = {"seed": seed, "threads": threads, "seconds": {}}
    sec = res["seconds"]
    sec["teacher_sft"] = rlhf(["sft", "run.name=teacher", *common], threads, root)
    sec["teacher_rs"] = rlhf(
        ["rejection_sampling", "+experiment=rs_parity", "run.name=teacher", *common], threads, root
    )
    sec["student_sft"] = rlhf(["sft", "run.name=student", *STUDENT, *common], threads, root)
    for name in ("distill", "grpo"):
        shutil.copytree(root / "student", root / name, ignore=shutil.ignore_patterns(".lock"))
    teacher = root / "teacher" / "rejection_sampling"
    sec["distill"] = rlhf(
        ["distill", "+experiment=distill_parity", "run.name=distill", f"stage.teacher={teacher}", *common],
        threads,
        root,
    )
    grpo_iterations = DISTILL_ITERATIONS * DISTILL_ANSWERS // GRPO_ANSWERS
    sec["grpo"] = rlhf(
        ["grpo", "+experiment=grpo_parity", "run.name=grpo", f"stage.max_steps={grpo_iterations}", *common],
        threads,
        root,
    )
    dlog, glog = rows(root / "distill", "distill"), rows(root / "grpo", "grpo")
    dcurve, gcurve = gold_curve(dlog), gold_curve(glog)
    first = next(r for r in dlog if "teacher_eval_gold" in r)
    last_it = [r for r in dlog if "kl_teacher_token" in r][-1]
    last_eval = [r for r in dlog if "eval_teacher_agreement" in r]
    res.update(
        teacher_gold=first["teacher_eval_gold"],
        before=dcurve[0],
        grpo_before=gcurve[0],
        distill=dcurve[max(dcurve)],
        grpo=gcurve[max(gcurve)],
        distill_curve=dcurve,
        grpo_curve=gcurve,
        distill_answers=answers(dlog),
        grpo_answers=answers(glog),
        kl_token=last_it["kl_teacher_token"],
        kl_sequence=last_it["kl_teacher_sequence"],
        agreement_before=last_eval[0]["eval_teacher_agreement"],
        agreement_after=last_eval[-1]["eval_teacher_agreement"],
        distill_eos=last_eval[-1]["eval_eos_fraction"],
    )
    if abs(res["grpo_before"] - res["before"]) > 1e-9:  # the same start and held-out split: the same first evaluation
        raise SystemExit(f"seed {seed}: GRPO's start {res['grpo_before']} is not distill's {res['before']}")
    return res


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


COLUMNS = (
    ("teacher gold", "teacher_gold", "{:.3f}"),
    ("student before", "before", "{:.3f}"),
    ("after distill", "distill", "{:.3f}"),
    ("after GRPO", "grpo", "{:.3f}"),
    ("distill gain", "distill_gain", "{:+.3f}"),
    ("GRPO gain", "grpo_gain", "{:+.3f}"),
    ("answers distill / GRPO", "answers", "{}"),
    ("KL to teacher / token", "kl_token", "{:.3f}"),
    ("KL / answer", "kl_sequence", "{:.2f}"),
    ("greedy = teacher's", "agreement", "{}"),
    ("time distill / GRPO (s)", "time", "{}"),
)


def cells(r: dict) -> dict[str, str]:
    """One seed's row, formatted."""
    r = dict(r, distill_gain=r["distill"] - r["before"], grpo_gain=r["grpo"] - r["before"])
    r["answers"] = f"{r['distill_answers']} / {r['grpo_answers']}"
    r["agreement"] = f"{r['agreement_before']:.2f} -> {r['agreement_after']:.2f}"
    r["time"] = f"{r['seconds']['distill']:.0f} / {r['seconds']['grpo']:.0f}"
    return {key: fmt.format(r[key]) for _, key, fmt in COLUMNS}


NUMERIC = ("teacher_gold", "before", "distill", "grpo", "distill_gain", "grpo_gain", "kl_token", "kl_sequence")


def stats(results: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and std over the seeds of each number of the summary (gains, agreement, times included)."""
    values = {key: [r[key] for r in results if key in r] for key in NUMERIC}
    values["distill_gain"] = [r["distill"] - r["before"] for r in results]
    values["grpo_gain"] = [r["grpo"] - r["before"] for r in results]
    values["agreement_after"] = [r["agreement_after"] for r in results]
    values["distill_answers"] = [r["distill_answers"] for r in results]
    values["grpo_answers"] = [r["grpo_answers"] for r in results]
    for part in results[0]["seconds"]:
        values[f"{part}_seconds"] = [r["seconds"][part] for r in results]
    return {key: dict(zip(("mean", "std"), mean_std(v), strict=True)) for key, v in values.items()}


def summary_cells(results: list[dict]) -> dict[str, str]:
    """The mean +- std row of the table."""
    st = stats(results)

    def ms(key: str, digits: int = 3, sign: str = "") -> str:
        return f"{st[key]['mean']:{sign}.{digits}f} +- {st[key]['std']:.{digits}f}"

    out = {key: ms(key) for key in ("teacher_gold", "before", "distill", "grpo", "kl_token")}
    out["distill_gain"], out["grpo_gain"] = ms("distill_gain", sign="+"), ms("grpo_gain", sign="+")
    out["answers"] = f"{st['distill_answers']['mean']:.0f} / {st['grpo_answers']['mean']:.0f}"
    out["kl_sequence"] = ms("kl_sequence", digits=2)
    out["agreement"] = ms("agreement_after", digits=2)
    out["time"] = f"{ms('distill_seconds', digits=0)} / {ms('grpo_seconds', digits=0)}"
    return out


def verdict(results: list[dict], margin: float) -> tuple[bool, str]:
    """Pass when distillation's mean gain reaches `margin` and every seed's gain is above 0."""
    gains = [r["distill"] - r["before"] for r in results]
    ok = statistics.mean(gains) >= margin and min(gains) > 0
    word = "PASS" if ok else "FAIL"
    return ok, f"{word}: distill's mean gain {statistics.mean(gains):+.3f} (bar {margin:+.2f}), min {min(gains):+.3f}"


def markdown(results: list[dict], margin: float) -> str:
    """The table for docs/benchmarks.md: a row per seed, then the mean +- std, then the verdict."""
    lines = [
        "| seed | " + " | ".join(label for label, _, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for r in results:
        row = cells(r)
        lines.append(f"| {r['seed']} | " + " | ".join(row[key] for _, key, _ in COLUMNS) + " |")
    row = summary_cells(results)
    lines.append("| mean +- std | " + " | ".join(row[key] for _, key, _ in COLUMNS) + " |")
    threads = results[0]["threads"]
    parts = ("teacher_sft", "teacher_rs", "student_sft", "distill", "grpo")
    total = sum(sum(r["seconds"][p] for p in parts) for r in results)
    lines += [
        "",
        f"{verdict(results, margin)[1]}. {threads} thread(s) per process; all {len(results)} seed(s) in "
        f"{total / 60:.1f} min (teacher sft + rs_parity, student sft, distill, GRPO).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--margin", type=float, default=0.1, help="the mean gold gain distillation must reach")
    parser.add_argument("--out", type=Path, default=None, help="every seed's results as JSON")
    parser.add_argument("--keep", type=Path, default=None, help="run under this (new) folder and keep the runs")
    parser.add_argument("--doc", type=Path, nargs="?", const=DOC, default=None, metavar="FILE")
    args = parser.parse_args()
    if args.doc:
        check_markers(args.doc, BEGIN, END)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            root = (args.keep or Path(tmp)) / f"s{seed}"
            root.mkdir(parents=True)
            results.append(one_seed(seed, args.threads, root))
            print(json.dumps(results[-1]), flush=True)
    ok, line = verdict(results, args.margin)
    summary = {"seeds": results, "mean_std": stats(results), "ok": ok}
    print(json.dumps(summary["mean_std"]))
    table = markdown(results, args.margin)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.doc:
        update_doc(args.doc, table, BEGIN, END)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
