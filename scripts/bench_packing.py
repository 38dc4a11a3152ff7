"""`python scripts/bench.py --only packing`: SFT, RM and DPO steps, packed and padded, next to a bare padded loop.

Three workloads, one process, fp32: the tiny default (3.7M-parameter Llama, the built-in samples, the stages' default
batches), a length-spread one (a 5.3M-parameter Llama with a 4,096-token vocabulary, random token ids, every
sequence 10 to 91 tokens, 32 sequences per optimizer step: SFT 8 x 4 examples, RM / DPO 8 x 2 pairs) and, for RM and
DPO where the shared data folder has it, real HH-RLHF pairs on the same model (`HH_PAIRS`). Per stage:
- shared / packed / padded: the stage's own step function (`train_step` of rlhf_cli/stages/<stage>.py with its
  DeepSpeed engine, ZeRO-0, LM head on target positions only): RM / DPO packed with each pair's prompt once
  (data.share_prompt, the default), packed with the prompt in both sequences, or data.packing off;
- bare: a plain PyTorch loop on the same padded micro-batches (full logits, the HF model's own pooling for RM, a
  frozen reference for DPO, torch AdamW), the baseline the issue measures against.
Reported: non-pad tokens/s (median over steps after warm-up; a shared prompt counted with each reply, as the padded
batches carry it), pad efficiency (non-pad / all positions fed to the model), MFU = 6 x N x non-pad tokens/s / peak,
with N the parameters of the matmuls (every 2-D weight except the input embedding) and the peak the flops/s of a
2048^3 fp32 matmul measured here, and peak RSS. Every configuration runs in its own process (`--worker`), so the peak
RSS is its own. DPO's reference forward is work the 6N leaves out.
FLOP bound: the bare loop's FLOPs per non-pad token over this mode's (`step_flops`, from the shapes fed), the speedup
packing and target-only logits can give at equal FLOP/s; GFLOP/s: the FLOPs actually done per second.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

STAGES = ("sft", "rm", "dpo")
MODES = ("shared", "packed", "padded", "bare")  # shared: pairs only
SPREAD_MODEL = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=None,
    tie_word_embeddings=False,
)
SPREAD_LENGTHS = (10, 91)
# Real chat pairs (HH-RLHF harmless-base test, in the team's shared folder; the workload is skipped without it),
# tokenized by the tiny tokenizer, pairs whose prompt + longer reply exceed 256 tokens dropped: prompts are about 58%
# of a pair's unshared tokens, the case `data.share_prompt` is for.
HH_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """fp32 flops/s of an n x n x n matmul on this machine (best of `repeats`, after one warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _spread_data(stage: str, n: int, seed: int = 0) -> list:
    """n SFT examples or preference pairs of random ids, every sequence 10-91 tokens (a pair's prompt shared)."""
    from rlhf_cli.data import IGNORE_INDEX, PreferenceExample, SFTExample

    gen = torch.Generator().manual_seed(seed)
    low, high = SPREAD_LENGTHS

    def ids(k: int) -> list[int]:
        return torch.randint(2, SPREAD_MODEL["vocab_size"], (k,), generator=gen).tolist()

    def length() -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    out = []
    for _ in range(n):
        total = length()
        prompt = max(1, int(total * float(torch.rand(1, generator=gen)) * 0.8))
        if stage == "sft":
            reply = ids(total - prompt - 1) + [1]
            out.append(SFTExample(ids(prompt) + reply, [IGNORE_INDEX] * prompt + reply))
        else:
            rejected = max(1, min(high - prompt, length() - prompt))
            out.append(PreferenceExample(ids(prompt), ids(total - prompt - 1) + [1], ids(rejected - 1) + [1]))
    return out


def _setup(stage: str, workload: str, steps: int) -> tuple:
    """(config, tokenizer, examples, per-step index lists, causal LM builder) of a workload."""
    from rlhf_cli.config.compose import compose
    from rlhf_cli.data import build_preference_datasets, build_sft_datasets
    from rlhf_cli.models import load_causal_lm, load_tokenizer
    from rlhf_cli.stages.common import step_plan

    if workload == "tiny":
        overrides = [] if stage == "sft" else ["model.name_or_path=builtin:tiny-llama"]
        cfg = compose(stage, overrides)
        tok = load_tokenizer(cfg.model)
        build = build_sft_datasets if stage == "sft" else build_preference_datasets
        examples = build(cfg.data, tok, seed=cfg.seed).train
        plan = step_plan(len(examples), cfg.stage, 1)
        steps_idx = [plan.rank_indices(s, 0, cfg.seed) for s in range(steps)]
        return cfg, tok.pad_token_id, examples, steps_idx, lambda: load_causal_lm(cfg.model, tok, seed=cfg.seed)
    from transformers import LlamaConfig, LlamaForCausalLM

    micro, accum = (8, 4) if stage == "sft" else (8, 2)
    data = ["data.max_length=128"]
    if workload == "hh":
        data = [f"data.source={HH_PAIRS}", "data.format=hh_rlhf", "data.max_length=256", "data.eval_fraction=0"]
    cfg = compose(
        stage,
        [
            f"stage.micro_batch_size={micro}",
            f"stage.gradient_accumulation_steps={accum}",
            *data,
            "model.name_or_path=builtin:tiny-llama",
        ],
    )
    per_step = micro * accum
    pad = 0
    if workload == "hh":
        tok = load_tokenizer(cfg.model)
        examples, pad = build_preference_datasets(cfg.data, tok, seed=cfg.seed).train, tok.pad_token_id
    else:
        examples = _spread_data(stage, per_step * steps)
    steps_idx = [list(range(s * per_step, (s + 1) * per_step)) for s in range(steps)]

    def build_lm():
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(LlamaConfig(**SPREAD_MODEL, attn_implementation="sdpa"))

    return cfg, pad, examples, steps_idx, build_lm


def _reward_from(causal):
    """A one-label Llama classifier on the causal LM's backbone (the RM stage's shape)."""
    from transformers import LlamaForSequenceClassification

    config = causal.config
    config.num_labels = 1
    model = LlamaForSequenceClassification(config)
    model.model.load_state_dict(causal.model.state_dict())
    return model


def matmul_params(model) -> int:
    """Parameters that enter a matmul per token: every 2-D weight but the input embedding (a lookup)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embed)


def step_flops(stage: str, batches: list, model, packed: bool) -> float:
    """Matmul + attention FLOPs of one step's forwards and backwards (the DPO reference: its forward), from the
    shapes actually fed: 6 x body parameters x every position fed (padding included), 6 x LM-head parameters x the
    positions projected (padded: all; packed: the targets only), 12 x layers x hidden x W^2 per row for attention
    (sdpa computes every masked position). The bare loop's FLOPs over the packed stage's bound the speedup packing
    can give at equal FLOP/s."""
    cfg = model.config
    head = 0 if stage == "rm" else model.get_output_embeddings().weight.numel()
    body = matmul_params(model) - head
    total = 0.0
    for b in batches:
        rows, width = b["input_ids"].shape
        fed = rows * width
        projected = int((b["labels"][:, 1:] != -100).sum()) if packed and head else fed
        attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * width**2 * rows
        train = 6 * body * fed + 6 * head * projected + attention
        total += train + (train / 3 if stage == "dpo" else 0)  # the reference: a forward only
    return total


def _stage_steps(
    stage: str, cfg, pad: int, examples: list, steps_idx: list, build_lm, packed: bool, shared: bool
) -> tuple:
    """Per-step (seconds, non-pad tokens, non-pad positions fed, all positions fed, FLOPs) of the stage's own
    train_step; and N. Non-pad tokens count a shared prompt with each reply, as the padded batches hold it."""
    from rlhf_cli import engine as eng
    from rlhf_cli.stages import dpo, rm, sft
    from rlhf_cli.stages.common import packing_for

    st, device = cfg.stage, torch.device("cpu")
    model = build_lm() if stage != "rm" else _reward_from(build_lm())
    n_params = matmul_params(model)
    reference = build_lm().eval().requires_grad_(False) if stage == "dpo" else None
    ds = eng.ds_config(cfg.deepspeed, cfg.optim, st.micro_batch_size, st.gradient_accumulation_steps, 1)
    engine = eng.initialize(model, ds, cfg.optim, len(steps_idx))
    data_cfg = SimpleNamespace(
        packing=packed, max_tokens_per_batch=None, max_length=cfg.data.max_length, share_prompt=shared
    )
    packing = packing_for(data_cfg, st, engine, per_item=1 if stage == "sft" else 2)
    ref = dpo.Reference.__new__(dpo.Reference)
    ref.kind, ref.table, ref.model = "model", None, reference
    out = []
    for idx in steps_idx:
        if stage == "sft":
            forwards = sft.step_batches(examples, idx, st.micro_batch_size, pad, packing)
            t = _timed(lambda f=forwards: sft.train_step(engine, f, device, packing.enabled))
            batches = forwards
        elif stage == "rm":
            batches = rm.pair_batches(examples, idx, st.micro_batch_size, pad, packing)
            t = _timed(lambda b=batches: rm.train_step(engine, b, device, None, packing.enabled))
        else:
            forwards = dpo.pair_forwards(examples, idx, st.micro_batch_size, pad, packing)
            t = _timed(lambda f=forwards: dpo.train_step(engine, ref, st, "train", f, device, packing.enabled))
            batches = [b for _, b in forwards]
        real, fed = sum(_real(b) for b in batches), sum(_fed(b) for b in batches)
        fed_all = sum(b["input_ids"].numel() for b in batches)
        out.append((t, real, fed, fed_all, step_flops(stage, batches, model, True)))
    return out, n_params


def _fed(b: dict) -> int:
    """Non-pad positions fed to the model: with a shared prompt, the prompt once (`_real` counts it per reply)."""
    return int((b["segment"] >= 0).sum()) if "segment" in b else int(b["attention_mask"].sum())


def _real(b: dict) -> int:
    from rlhf_cli.data.packing import real_tokens

    return real_tokens(b)


def _bare_steps(stage: str, cfg, pad: int, examples: list, steps_idx: list, build_lm) -> tuple:
    """The same padded micro-batches through a plain PyTorch loop: full logits (or the classifier's own pooled
    output), loss, backward, clipping, AdamW."""
    from rlhf_cli.data import collate_preference, collate_sft
    from rlhf_cli.losses import bradley_terry_loss, sft_loss_sum, split_pairs, token_logprobs
    from rlhf_cli.losses.dpo import preference_loss

    st = cfg.stage
    model = build_lm() if stage != "rm" else _reward_from(build_lm())
    reference = build_lm().eval().requires_grad_(False) if stage == "dpo" else None
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    collate = collate_sft if stage == "sft" else collate_preference
    out = []
    for idx in steps_idx:
        batches = [
            collate([examples[i] for i in idx[j : j + st.micro_batch_size]], pad)
            for j in range(0, len(idx), st.micro_batch_size)
        ]
        t0 = time.perf_counter()
        norm = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) if stage == "sft" else len(idx)
        for b in batches:
            inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            if stage == "sft":
                loss = sft_loss_sum(model(**inputs).logits, b["labels"])[0]
            elif stage == "rm":
                chosen, rejected = split_pairs(model(**inputs).logits[:, 0])
                loss = bradley_terry_loss(chosen, rejected, b["margin"])[0] * len(chosen)
            else:
                logps = token_logprobs(model(**inputs).logits, b["labels"]).sum(-1)
                with torch.no_grad():
                    ref_logps = token_logprobs(reference(**inputs).logits, b["labels"]).sum(-1)
                loss = preference_loss("sigmoid", *logps.chunk(2), *ref_logps.chunk(2), None, None, beta=0.1).sum()
            (loss / norm).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        flops = step_flops(stage, batches, model, False)
        out.append((time.perf_counter() - t0, real, real, sum(b["input_ids"].numel() for b in batches), flops))
    return out, matmul_params(model)


def worker(stage: str, workload: str, mode: str, steps: int, warmup: int) -> dict:
    """One configuration in this process: its medians and this process's peak RSS."""
    from rlhf_cli import engine as eng

    eng.init_distributed()
    setup = _setup(stage, workload, steps)
    if mode == "bare":
        records, n_params = _bare_steps(stage, *setup)
    else:
        records, n_params = _stage_steps(stage, *setup, packed=mode != "padded", shared=mode == "shared")
    records = records[warmup:]
    return {
        "tok_s": statistics.median(real / t for t, real, *_ in records),
        "pad_eff": sum(fed for _, _, fed, _, _ in records) / sum(a for *_, a, _ in records),
        "flops_per_token": sum(f for *_, f in records) / sum(real for _, real, *_ in records),
        "flop_s": statistics.median(f / t for t, *_, f in records),
        "n_params": n_params,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def packing_section(args, overrides: list[str]) -> None:
    """Every stage x workload x mode in its own process; a table per workload."""
    peak = matmul_peak()
    print(
        f"\nPacking: non-pad tokens/s, 1 process, {torch.get_num_threads()} threads, fp32; matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (2048^3 fp32); median of {args.steps - args.warmup} steps"
    )
    titles = {
        "tiny": "tiny default (3.7M Llama, built-in samples)",
        "spread": "length spread 10-91 (5.3M Llama, 4,096 vocab, 32 sequences/step)",
        "hh": "HH-RLHF pairs up to 256 tokens, tiny tokenizer (5.3M Llama, 32 sequences/step)",
    }
    for workload, title in titles.items():
        if workload == "hh" and not HH_PAIRS.exists():
            print(f"  {title}: skipped, {HH_PAIRS} not found")
            continue
        print(f"  {title}")
        print(
            f"  {'stage':5} {'mode':7} {'tokens/s':>9} {'x bare':>7} {'FLOP bound':>10} {'pad eff':>8} {'MFU':>6} "
            f"{'GFLOP/s':>8} {'peak RSS MiB':>13}"
        )
        for stage in STAGES if workload != "hh" else ("rm", "dpo"):
            modes = [m for m in MODES if stage != "sft" or m != "shared"]
            results = {mode: _run_worker(stage, workload, mode, args) for mode in modes}
            for mode, r in results.items():
                mfu = 6 * r["n_params"] * r["tok_s"] / peak
                ratio = r["tok_s"] / results["bare"]["tok_s"]
                bound = results["bare"]["flops_per_token"] / r["flops_per_token"]
                print(
                    f"  {stage:5} {mode:7} {r['tok_s']:9.0f} {ratio:7.2f} {bound:10.2f} {r['pad_eff']:8.2f} "
                    f"{mfu:6.3f} {r['flop_s'] / 1e9:8.1f} {r['peak_rss_mib']:13.0f}"
                )


def _run_worker(stage: str, workload: str, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", stage, workload, mode, str(args.steps), str(args.warmup)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        sys.exit(f"packing bench worker {stage} {workload} {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    stage_, workload_, mode_, steps_, warmup_ = sys.argv[2:7]
    print(json.dumps(worker(stage_, workload_, mode_, int(steps_), int(warmup_))))
