"""`make bench` section `rollout` (`python scripts/bench.py --only rollout`): the rollout engines (rollout/engines.py)
on the tiny default after short sft and rm stages, one process.

1. Per engine (`hf`, and `vllm` when it imports) and per stage at the same settings: PPO (32 prompts x 1 sample) and
   GRPO (8 prompts x 4), up to 32 new tokens, median of the iterations after the warm-up: samples/s, rollout new
   tokens/s, the shares of an iteration in generation / scoring / update, peak RSS; rejection sampling, one round
   with N = 8 over the built-in prompts: responses/s, new tokens/s, generation / scoring / fine-tuning seconds.
2. Generation alone, on the sft policy, for the GRPO-shaped batch (32 rows: 8 prompts x 4) and the rejection-
   sampling-shaped one (128 rows: 16 prompts x 8), temperature 1, up to 32 new tokens: transformers' `generate`
   (the engine before rollout/decode.py), the hf engine and vllm, 7 calls each after a warm-up, the engines taking
   turns (call i of every engine with seed i, so a slow spell of the machine hits them all); new tokens/s against the
   compute bound of the same work: 2 x (matmul parameters) x (prompt tokens of the distinct prompts + new tokens)
   FLOPs at this machine's measured fp32 matmul peak (attention over a context this short is left out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

PPO = ["stage.rollout_batch_size=32"]
GRPO = [
    "stage.rollout_batch_size=8",
    "stage.n_samples=4",
    "stage.micro_batch_size=8",
    "stage.gradient_accumulation_steps=4",
]
QUIET = ["stage.save_every=0", "stage.eval_every=0", "logging.progress=false", "logging.log_every=1000000"]


def engines() -> list[str]:
    from rlhf_cli.config.rollout_engine import vllm_installed

    return ["hf", "vllm"] if vllm_installed() else ["hf"]


def _records(root: Path, name: str, stage: str) -> list[dict]:
    return [json.loads(line) for line in (root / name / stage / "metrics.jsonl").read_text().splitlines()]


def online_row(root: Path, stage: str, engine: str, extra: list[str], args: argparse.Namespace, run) -> str:
    name = f"{stage}-{engine}"
    shutil.copytree(root / "bench", root / name, ignore=shutil.ignore_patterns(".lock"))
    run([stage, f"run.root={root}", f"run.name={name}", f"rollout.engine={engine}", *QUIET, *extra])
    recs = [r for r in _records(root, name, stage) if "gen_tok/s" in r][args.warmup :]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in recs)

    return (
        f"  {stage:<6} {engine:<5} {med('rollout_sequences') / med('step_seconds'):9.1f} {med('step_seconds'):6.2f} "
        f"{med('gen_tok/s'):9.0f} {med('generation_share'):10.2f} {med('scoring_share'):7.2f} "
        f"{med('update_share'):6.2f} {max(r['peak_mem_mib'] for r in recs):8.0f}"
    )


def rs_row(root: Path, engine: str, run) -> str:
    name = f"rs-{engine}"
    shutil.copytree(root / "bench", root / name, ignore=shutil.ignore_patterns(".lock"))
    run(["rejection_sampling", f"run.root={root}", f"run.name={name}", f"rollout.engine={engine}", "stage.n_samples=8"])
    rows = _records(root, name, "rejection_sampling")
    sel = next(r for r in rows if "responses/s" in r)
    tune = next(r for r in reversed(rows) if "finetune_seconds" in r)
    return (
        f"  {'rs N=8':<6} {engine:<5} {sel['responses/s']:9.1f} {sel['gen_tok/s']:9.0f} "
        f"{sel['generation_seconds']:8.1f} {sel['scoring_seconds']:7.1f} {tune['finetune_seconds']:9.1f} "
        f"{max(r.get('peak_mem_mib', 0.0) for r in rows):8.0f}"
    )


def stages_table(root: Path, args: argparse.Namespace, run) -> None:
    print(f"\nRollout engines in the stages, tiny default, 1 process, {torch.get_num_threads()} threads")
    print(
        f"  {'stage':<6} {'engine':<5} {'samples/s':>9} {'s/iter':>6} {'gen tok/s':>9} {'generation':>10} "
        f"{'scoring':>7} {'update':>6} {'peak MiB':>8}"
    )
    for engine in engines():
        for stage, extra in (("ppo", PPO), ("grpo", GRPO)):
            print(online_row(root, stage, engine, [*extra, f"stage.max_steps={args.steps}"], args, run))
    print(f"  {'':<6} {'':<5} {'resp/s':>9} {'gen tok/s':>9} {'gen s':>8} {'score s':>7} {'tune s':>9} {'peak MiB':>8}")
    for engine in engines():
        print(rs_row(root, engine, run))


def _batch(tok, n_prompts: int, n_samples: int) -> dict[str, torch.Tensor]:
    from rlhf_cli.data import build_prompt_datasets
    from rlhf_cli.data.prompts import collate_prompts

    data = build_prompt_datasets(_prompt_data(), tok, seed=0)
    rows = [p for p in data.train[:n_prompts] for _ in range(n_samples)]
    return collate_prompts(rows, tok.pad_token_id)


def _prompt_data():
    from rlhf_cli.config.compose import compose

    return compose("grpo", []).data


def generation_alone(final: Path) -> None:
    """Section 2 of the module docstring, on the sft policy in `final`."""
    from bench_packing import matmul_params, matmul_peak

    from rlhf_cli.config.online import GenerationConfig
    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models import disable_dropout, load_causal_lm, load_tokenizer
    from rlhf_cli.rollout.engines import HF
    from rlhf_cli.rollout.generation import sampling_config

    model_cfg = ModelConfig(name_or_path=str(final))
    tok = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, tok, seed=0).eval()
    disable_dropout(model)
    config = sampling_config(GenerationConfig(max_new_tokens=32, temperature=1.0), tok.eos_token_id, tok.pad_token_id)
    peak, n_params = matmul_peak(), matmul_params(model)
    print(
        f"\nGeneration alone: sft policy, temperature 1, up to 32 new tokens, {torch.get_num_threads()} threads; "
        f"matmul peak {peak / 1e9:.0f} GFLOP/s, {n_params / 1e6:.2f}M matmul parameters; 7 calls each, in turns"
    )
    print(
        f"  {'batch':<22} {'engine':<9} {'ms/call':>7} {'new tok':>7} {'new tok/s':>9} {'bound tok/s':>11} "
        f"{'of bound':>8}"
    )
    callers = {
        "generate": lambda b: _transformers_generate(model, b, config),
        "hf": lambda b: HF.generate(model, b, config),
    }
    if "vllm" in engines():
        callers["vllm"] = _vllm_caller(model, model_cfg, tok, config)
    for label, (n_prompts, n_samples) in (("GRPO 8 prompts x 4", (8, 4)), ("RS 16 prompts x 8", (16, 8))):
        batch = _batch(tok, n_prompts, n_samples)
        distinct = batch["attention_mask"][::n_samples].sum().item()  # prompt tokens, once per distinct prompt
        for name, (seconds, tokens) in _calls_in_turns(callers, batch).items():
            bound = tokens / (2 * n_params * (distinct + tokens) / peak)
            print(
                f"  {label:<22} {name:<9} {seconds * 1e3:7.0f} {tokens:7.0f} {tokens / seconds:9.0f} "
                f"{bound:11.0f} {tokens / seconds / bound:8.2f}"
            )


def _calls_in_turns(callers: dict, batch: dict, calls: int = 7) -> dict[str, tuple[float, float]]:
    """Per caller, the mean seconds and new tokens of a call over `calls` calls after a warm-up; the callers take
    turns, call i of each with seed i."""
    total = {name: [0.0, 0.0] for name in callers}
    for rep in range(calls + 1):
        for name, call in callers.items():
            torch.manual_seed(rep)
            t0 = time.perf_counter()
            seq = call(batch)
            if rep:  # the first round warms up
                total[name][0] += (time.perf_counter() - t0) / calls
                total[name][1] += float(seq.response_mask.sum()) / calls
    return {name: (seconds, tokens) for name, (seconds, tokens) in total.items()}


def _transformers_generate(model, batch: dict, config):
    """The engine before rollout/decode.py: transformers' `generate` with a clean config, in the rollout layout."""
    from transformers import GenerationConfig as HFConfig

    from rlhf_cli.rollout.generation import join, truncate_at_eos

    model.generation_config = HFConfig()
    with torch.no_grad():
        out = model.generate(**batch, generation_config=config)
    response, mask, has_eos = truncate_at_eos(
        out[:, batch["input_ids"].shape[1] :], config.eos_token_id, config.pad_token_id
    )
    return join(batch["input_ids"], batch["attention_mask"], response, mask, has_eos)


def _vllm_caller(model, model_cfg, tok, config):
    from types import SimpleNamespace

    from rlhf_cli.config.online import RolloutConfig
    from rlhf_cli.rollout.engines import make_engine

    dist = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
    engine = make_engine(RolloutConfig(engine="vllm"), model_cfg, tok, dist)
    return lambda b: engine.generate(model, b, config)


def rollout_section(args: argparse.Namespace, overrides: list[str], run) -> None:
    """Both tables of the module docstring; `run(args)` runs one `rlhf` command or exits with its error."""

    def run_with(command: list[str]) -> None:
        run([*command, *overrides])

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for stage, steps in (("sft", 40), ("rm", 20)):
            run_with([stage, f"run.root={root}", "run.name=bench", *QUIET, f"stage.max_steps={steps}"])
        stages_table(root, args, run_with)
        generation_alone(root / "bench" / "sft" / "final")
