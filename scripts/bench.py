"""`make bench`: SFT training throughput and peak memory on the tiny default, and the loop's overhead.

1. Runs the real stage (`rlhf sft`, fresh run directory) for a fixed number of steps and reads the
   per-step tokens/s from its metrics.jsonl (warm-up steps dropped).
2. Times a bare loop on the same model, batches and optimizer: forward, loss, backward, AdamW step,
   no DeepSpeed, no logging, no checkpoints.
3. Prints target tokens/s, total tokens/s, peak memory, and the ratio stage / bare (goal: > 0.9).

Usage: python scripts/bench.py [--steps N] [--warmup K] [key=value overrides for the stage ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_mib(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def run_stage(root: str, steps: int, overrides: list[str]) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "rlhf_cli",
        "sft",
        f"run.root={root}",
        "run.name=bench",
        f"stage.max_steps={steps}",
        "stage.save_every=0",
        "logging.progress=false",
        "logging.log_every=1000000",
        *overrides,
    ]
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = (Path(root) / "bench" / "sft" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "tok/s" in r]


def bare_loop(steps: int, overrides: list[str]) -> tuple[float, float]:
    """Tokens/s and target tokens/s of forward + loss + backward + step, same batches as the stage."""
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as root:
        records = run_stage(root, args.steps, overrides)[args.warmup :]
    stage_tok = statistics.median(r["tok/s"] for r in records)
    stage_target = statistics.median(r["target_tok/s"] for r in records)
    stage_peak = peak_rss_mib(children=True)

    times, toks, targets = bare_loop(args.steps, overrides)
    times, toks, targets = times[args.warmup :], toks[args.warmup :], targets[args.warmup :]
    bare_tok = statistics.median(t / s for t, s in zip(toks, times, strict=True))
    bare_target = statistics.median(t / s for t, s in zip(targets, times, strict=True))
    print(f"\nSFT benchmark, tiny default, {torch.get_num_threads()} threads, {len(records)} timed steps")
    print(f"  stage  : {stage_tok:10.0f} tokens/s  {stage_target:10.0f} target tokens/s  peak RSS {stage_peak:.0f} MiB")
    print(
        f"  bare   : {bare_tok:10.0f} tokens/s  {bare_target:10.0f} target tokens/s  peak RSS {peak_rss_mib():.0f} MiB"
    )
    print(f"  ratio stage/bare (tokens/s): {stage_tok / bare_tok:.3f}")


if __name__ == "__main__":
    main()
