"""`make bench`: throughput and memory of the stages on the tiny default (SFT, RM, DPO, PPO; ZeRO scale-out).

1. Single process: runs the real stage (`rlhf sft`, fresh run directory) and reads per-step tokens/s from
   its metrics.jsonl (warm-up steps dropped), then times a bare loop on the same model, batches and
   optimizer (forward, loss, backward, AdamW step; no DeepSpeed, logging or checkpoints). The ratio
   stage / bare shows the loop's overhead (goal: > 0.9).
2. Scale-out: the stage under ZeRO-0/2/3 with 1 and 2 processes at the same global batch: per-step time,
   peak memory per process, and scaling efficiency = 2-process throughput / (2 x 1-process throughput).
   On a 2-core machine the 1-process run uses both cores and each of the 2 processes one, so the
   efficiency measures the parallel overhead, not a speed-up.
3. RM and DPO pairs/s; PPO generation and training tokens/s and the split of an iteration's wall time between
   generation, scoring and the update; rejection sampling's generation throughput for N = 4 and N = 8 and the time
   split of a round between generation, scoring and fine-tuning.
4. Packing (`--only packing`, scripts/bench_packing.py): SFT, RM and DPO steps with data.packing on and off next to a
   bare padded PyTorch loop, on the tiny default and on a length-spread workload (10-91 tokens, 5.3M Llama, 4,096
   vocabulary): non-pad tokens/s, pad efficiency, MFU against a measured fp32 matmul peak, peak RSS.
5. Rollout engines (`--only rollout`, scripts/bench_rollout.py): PPO, GRPO and rejection sampling per engine at the
   same settings, and generation alone against its compute bound.
6. Start-up: seconds until the commands a new user runs first have answered (fresh processes, median of 3):
   `--help`, `--cfg job`, a config error, a refused stage (completed; run directory in use), `explain`, and
   `generate` / `score` on a tiny run (2 steps of sft and rm).

Usage: python scripts/bench.py [--steps N] [--warmup K] [--skip-scaling] [--startup-only] [key=value overrides ...]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch


def run_stage(steps: int, overrides: list[str], nproc: int = 1, stage: str = "sft") -> list[dict]:
    """Run `rlhf <stage>` for `steps` steps in a fresh run directory; the per-step metrics records."""
    with tempfile.TemporaryDirectory() as root:
        args = [
            f"run.root={root}",
            "run.name=bench",
            f"stage.max_steps={steps}",
            "stage.save_every=0",
            "stage.eval_every=0",
            "logging.progress=false",
            "logging.log_every=1000000",
            *overrides,
        ]
        launch = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] if nproc > 1 else []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        res = subprocess.run(
            [sys.executable, *launch, "-m", "rlhf_cli", stage, *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            sys.exit(f"bench run failed ({nproc} process(es), {overrides}):\n{res.stderr[-3000:]}")
        lines = (Path(root) / "bench" / stage / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "tok/s" in r]


def bare_loop(steps: int, overrides: list[str]) -> tuple[list[float], list[int], list[int]]:
    """Per-step seconds, tokens and target tokens of forward + loss + backward + step, same batches."""
    from rlhf_cli.config.compose import compose
    from rlhf_cli.data import build_sft_datasets, collate_sft
    from rlhf_cli.losses import count_targets, sft_loss_sum
    from rlhf_cli.models import load_causal_lm, load_tokenizer
    from rlhf_cli.stages.common import model_inputs, step_plan

    cfg = compose("sft", overrides)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    data = build_sft_datasets(cfg.data, tok, seed=cfg.seed)
    plan = step_plan(len(data.train), cfg.stage, 1)
    model = load_causal_lm(cfg.model, tok, seed=cfg.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    micro = cfg.stage.micro_batch_size
    times, toks, targets = [], [], []
    for step in range(steps):
        idx = plan.rank_indices(step, 0, cfg.seed)
        batches = [
            collate_sft([data.train[i] for i in idx[j : j + micro]], tok.pad_token_id)
            for j in range(0, len(idx), micro)
        ]
        t0 = time.perf_counter()
        n = sum(count_targets(b["labels"]) for b in batches)
        for b in batches:
            loss, _ = sft_loss_sum(model(**model_inputs(b)).logits, b["labels"])
            (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        toks.append(sum(int(b["attention_mask"].sum()) for b in batches))
        targets.append(n)
    return times, toks, targets


def single_process(args: argparse.Namespace, overrides: list[str]) -> None:
    records = run_stage(args.steps, overrides)[args.warmup :]
    stage_tok = statistics.median(r["tok/s"] for r in records)
    stage_target = statistics.median(r["target_tok/s"] for r in records)
    stage_peak = max(r["peak_mem_mib"] for r in records)
    times, toks, targets = (x[args.warmup :] for x in bare_loop(args.steps, overrides))
    bare_tok = statistics.median(t / s for t, s in zip(toks, times, strict=True))
    bare_target = statistics.median(t / s for t, s in zip(targets, times, strict=True))
    bare_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nSFT, tiny default, 1 process, {torch.get_num_threads()} threads, median of {len(records)} steps")
    print(f"  stage : {stage_tok:9.0f} tokens/s {stage_target:9.0f} target tokens/s  peak RSS {stage_peak:.0f} MiB")
    print(f"  bare  : {bare_tok:9.0f} tokens/s {bare_target:9.0f} target tokens/s  peak RSS {bare_peak:.0f} MiB")
    print(f"  ratio stage/bare (tokens/s): {stage_tok / bare_tok:.3f}")


def scaling(args: argparse.Namespace, overrides: list[str]) -> None:
    print("\nScale-out, tiny default, global batch 16 (1 x micro 16 | 2 x micro 8), CPU/gloo")
    print(f"  {'zero':6} {'procs':>5} {'s/step':>8} {'tokens/s':>9} {'peak MiB/proc':>14} {'efficiency':>10}")
    for zero in ("zero0", "zero2", "zero3"):
        results = {}
        for nproc in (1, 2):
            micro = 16 // nproc
            extra = [f"deepspeed={zero}", f"stage.micro_batch_size={micro}", "stage.gradient_accumulation_steps=1"]
            recs = run_stage(args.steps, [*extra, *overrides], nproc)[args.warmup :]
            sec = statistics.median(r["step_seconds"] for r in recs)
            results[nproc] = (sec, statistics.median(r["tok/s"] for r in recs), max(r["peak_mem_mib"] for r in recs))
        for nproc, (sec, tok, peak) in results.items():
            eff = f"{tok / (2 * results[1][1]):.3f}" if nproc == 2 else ""
            print(f"  {zero:6} {nproc:>5} {sec:8.3f} {tok:9.0f} {peak:14.0f} {eff:>10}")


def preference_stages(args: argparse.Namespace, overrides: list[str]) -> None:
    """RM and DPO on the built-in preference sample, starting from the tiny builtin model (no SFT run)."""
    print("\nPreference stages, tiny default model, built-in preference sample, 1 process")
    print(f"  {'stage':6} {'pairs/s':>8} {'tokens/s':>9} {'s/step':>7} {'peak RSS MiB':>13}")
    for stage in ("rm", "dpo"):
        recs = run_stage(args.steps, ["model.name_or_path=builtin:tiny-llama", *overrides], stage=stage)
        recs = recs[args.warmup :]
        sec = statistics.median(r["step_seconds"] for r in recs)
        pairs = statistics.median(r["pairs/s"] for r in recs)
        tok = statistics.median(r["tok/s"] for r in recs)
        print(f"  {stage:6} {pairs:8.1f} {tok:9.0f} {sec:7.3f} {max(r['peak_mem_mib'] for r in recs):13.0f}")


# PPO and GRPO at the same batch: 32 sampled rows per iteration (PPO: 32 prompts x 1; GRPO: 8 prompts x 4), one
# process, the tiny default, up to 32 new tokens. PPO: 4 epochs x 2 mini-batches (its defaults), actor and critic;
# GRPO: one pass in one mini-batch of 32 rows (no old-log-prob forward, no critic, no reference: kl_coef 0).
ONLINE = {
    "ppo": [],
    "grpo": [
        "stage.rollout_batch_size=8",
        "stage.n_samples=4",
        "stage.micro_batch_size=8",
        "stage.gradient_accumulation_steps=4",
    ],
}


def online_stages(args: argparse.Namespace, overrides: list[str]) -> None:
    """PPO and GRPO on the tiny default after short sft and rm stages in the same run: samples/s, rollout generation
    tokens/s, training tokens/s, the share of each iteration's wall time in generation / scoring / update, peak RSS."""
    with tempfile.TemporaryDirectory() as root:
        common = [
            f"run.root={root}",
            "run.name=bench",
            "stage.save_every=0",
            "stage.eval_every=0",
            "logging.progress=false",
            "logging.log_every=1000000",
            *overrides,
        ]
        for stage, steps in (("sft", 40), ("rm", 20)):
            _stage_or_exit([stage, *common, f"stage.max_steps={steps}"])
        print(
            f"\nOnline RL, tiny default, 32 sampled rows per iteration, up to 32 new tokens, 1 process; median of "
            f"{args.steps - args.warmup} iterations after {args.warmup}"
        )
        print(
            f"  {'stage':<5} {'samples/s':>9} {'s/iter':>6} {'gen tok/s':>9} {'train tok/s':>11} {'generation':>10} "
            f"{'scoring':>7} {'update':>6} {'peak MiB':>8}"
        )
        for stage, extra in ONLINE.items():
            _stage_or_exit([stage, *common, *extra, f"stage.max_steps={args.steps}"])
            lines = (Path(root) / "bench" / stage / "metrics.jsonl").read_text().splitlines()
            recs = [r for r in map(json.loads, lines) if "gen_tok/s" in r][args.warmup :]

            def med(key: str, recs: list = recs) -> float:
                return statistics.median(r[key] for r in recs)

            print(
                f"  {stage:<5} {med('rollout_sequences') / med('step_seconds'):9.1f} {med('step_seconds'):6.2f} "
                f"{med('gen_tok/s'):9.0f} {med('train_tok/s'):11.0f} {med('generation_share'):10.2f} "
                f"{med('scoring_share'):7.2f} {med('update_share'):6.2f} "
                f"{max(r['peak_mem_mib'] for r in recs):8.0f}"
            )
        print("  (shares of the iteration's wall time; scoring = old / reference log-probs, values, reward)")


def rejection_sampling_stage(args: argparse.Namespace, overrides: list[str]) -> None:
    """Rejection sampling on the tiny default after short sft and rm stages: one round each with N = 4 and N = 8
    (all built-in prompts, up to 32 new tokens), generation throughput and the round's time split."""
    with tempfile.TemporaryDirectory() as root:
        common = [f"run.root={root}", "logging.progress=false", "logging.log_every=1000000", *overrides]
        print("\nRejection sampling, tiny default, 1 round over the built-in prompts, 1 process")
        print(
            f"  {'N':>2} {'responses/s':>11} {'new tok/s':>9} {'generation s':>12} {'scoring s':>9} "
            f"{'fine-tune s':>11} {'gain':>6}"
        )
        for stage, steps in (("sft", 40), ("rm", 20)):
            _stage_or_exit([stage, *common, "run.name=bench", "stage.save_every=0", f"stage.max_steps={steps}"])
        for n in (4, 8):
            name = f"rs{n}"
            shutil.copytree(Path(root) / "bench", Path(root) / name, ignore=shutil.ignore_patterns(".lock"))
            _stage_or_exit(["rejection_sampling", *common, f"run.name={name}", f"stage.n_samples={n}"])
            rows = [
                json.loads(line)
                for line in (Path(root) / name / "rejection_sampling" / "metrics.jsonl").read_text().splitlines()
            ]
            sel = next(r for r in rows if "responses/s" in r)
            tune = next(r for r in reversed(rows) if "finetune_seconds" in r)
            print(
                f"  {n:>2} {sel['responses/s']:11.1f} {sel['gen_tok/s']:9.0f} "
                f"{sel['generation_seconds']:12.1f} {sel['scoring_seconds']:9.1f} "
                f"{tune['finetune_seconds']:11.1f} {sel['best_of_n_gain']:6.3f}"
            )


def _stage_or_exit(args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "rlhf_cli", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"bench {args[0]} failed:\n{res.stderr[-3000:]}")


def rlhf(args: list[str], expect: int = 0) -> tuple[float, str]:
    """(wall seconds, stdout + stderr) of `rlhf <args>` in a fresh interpreter, which must exit with `expect`."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "rlhf_cli", *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if res.returncode != expect:
        sys.exit(f"bench: `rlhf {' '.join(args)}` exited {res.returncode}, not {expect}:\n{res.stderr[-3000:]}")
    return seconds, res.stdout + res.stderr


@contextlib.contextmanager
def held_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock as another `rlhf` process would (run_dir.py), naming this process."""
    with open(run_dir / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} (scripts/bench.py)")
        lock.flush()
        yield


def startup(repeats: int = 3) -> None:
    """Start-up seconds of the first commands, each the median of `repeats` fresh processes. Refusals, `--cfg job`
    and config errors should answer before torch or DeepSpeed load; generate and score load only torch and
    transformers."""
    with tempfile.TemporaryDirectory() as root:
        run = [f"run.root={root}", "run.name=bench"]
        outs = [
            rlhf(
                [stage, *run, "stage.max_steps=2", "stage.save_every=0", "stage.eval_every=0", "logging.progress=false"]
            )[1]
            for stage in ("sft", "rm")
        ]  # a tiny run to refuse, use, score with
        notice = "printed" if any("built successfully" in out for out in outs) else "not printed"
        tool = ["run=bench", f"root={root}"]
        cases = [
            ("rlhf --help", ["--help"], 0),
            ("rlhf sft --cfg job", ["sft", "--cfg", "job"], 0),
            ("config error (optim.lrr=1)", ["sft", "optim.lrr=1"], 2),
            ("refusal: completed stage", ["sft", *run], 2),
            ("refusal: run directory in use", ["sft", *run], 2),
            ("rlhf explain sft", ["explain", "sft", f"run.root={root}"], 0),
            ("rlhf explain ppo", ["explain", "ppo", *run], 0),
            ("rlhf generate (tiny run)", ["generate", *tool, "prompt=What is the capital of France?"], 0),
            ("rlhf score (tiny run)", ["score", *tool, "prompt=What is 2 + 2?", "response=2 + 2 = 4."], 0),
        ]
        print(f"\nStart-up, median of {repeats} fresh processes (seconds until the command has answered)")
        for name, args, expect in cases:
            with held_lock(Path(root) / "bench") if "in use" in name else contextlib.nullcontext():
                seconds = statistics.median(rlhf(args, expect)[0] for _ in range(repeats))
            print(f"  {name:32} {seconds:6.2f}")
        print(f"  DeepSpeed's op build line at a stage start: {notice}")


def rollout(args: argparse.Namespace, overrides: list[str]) -> None:
    """The rollout engines in PPO, GRPO and rejection sampling, and generation alone (scripts/bench_rollout.py)."""
    from bench_rollout import rollout_section

    rollout_section(args, overrides, _stage_or_exit)


def packing(args: argparse.Namespace, overrides: list[str]) -> None:
    """SFT, RM and DPO with packing on / off next to a bare padded loop, two workloads (scripts/bench_packing.py)."""
    from bench_packing import packing_section

    packing_section(args, overrides)


SECTIONS = {
    "single": single_process,
    "preference": preference_stages,
    "online": online_stages,
    "rejection_sampling": rejection_sampling_stage,
    "rollout": rollout,
    "scaling": scaling,
    "packing": packing,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--startup-only", action="store_true")
    parser.add_argument("--only", choices=SECTIONS, help="run one section (after the start-up times)")
    args, overrides = parser.parse_known_args()
    startup()
    if args.startup_only:
        return
    for name, section in SECTIONS.items():
        if args.only in (None, name) and not (name == "scaling" and args.skip_scaling):
            section(args, overrides)


if __name__ == "__main__":
    main()
