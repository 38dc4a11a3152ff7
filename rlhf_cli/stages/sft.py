"""`rlhf sft`: supervised fine-tuning on instruction / chat data (docs/algorithms.md section 2).

Loss on assistant tokens only (EOS included), normalised by the target tokens of the whole optimizer
step over all micro-batches and ranks, so batch 8 x accumulation 1 equals batch 2 x accumulation 4.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.data import IGNORE_INDEX, build_sft_datasets, collate_sft
from rlhf_cli.data.packing import collate_packed_sft, real_tokens
from rlhf_cli.data.sharding import eval_batches
from rlhf_cli.losses import count_targets
from rlhf_cli.losses.sft import sft_loss_from_logprobs
from rlhf_cli.metrics import Sums
from rlhf_cli.models.lm_head import target_logprobs
from rlhf_cli.run_dir import Run
from rlhf_cli.stages.common import (
    Finale,
    Loop,
    Packing,
    accumulate,
    export_final,
    packing_for,
    policy_engine,
    step_plan,
)
from rlhf_cli.stages.context import begin, stage_context, train_then_finish

SHOW = ("loss", "lr", "tok/s", "eval_loss")


def run(cfg: Any, run: Run) -> Path | None:
    """Train, checkpoint and export `<run>/sft/final/`. Returns it, or None when stopped early to resume."""
    st = cfg.stage
    # 1. Distributed group, seed, the model's source and its tokenizer (stages/context.py).
    ctx = stage_context(cfg, run)

    # 2. Data (tokenized once, in memory) and the step plan.
    data = build_sft_datasets(cfg.data, ctx.tokenizer, seed=cfg.seed)
    plan = step_plan(len(data.train), st, ctx.dist.world_size)

    # 3. Model (+ LoRA, gradient checkpointing) inside the DeepSpeed engine.
    engine = policy_engine(cfg, cfg.model, ctx.tokenizer, plan.total_steps, ctx.dist.world_size, dropout_off=False)
    packing = packing_for(cfg.data, st, engine, per_item=1)

    # 4. Resume from the newest complete checkpoint, if any; record the stage as running.
    inputs = {"model": cfg.model.name_or_path, "data": cfg.data.source}
    begun = begin(ctx, engine, plan.total_steps, inputs, (data.report.summary(), plan.describe(), packing.describe()))

    # 5. Train: the step's examples from the plan (a pure function of the step), packed or in micro-batches.
    pad_id, micro, dist = ctx.tokenizer.pad_token_id, st.micro_batch_size, ctx.dist

    def one_step(step: int) -> dict[str, float]:
        idx = plan.rank_indices(step, dist.rank, cfg.seed)
        return train_step(engine, step_batches(data.train, idx, micro, pad_id, packing), dist.device, packing.enabled)

    def run_eval() -> dict[str, float]:
        return evaluate(engine, data.eval, st.eval_batch_size, dist, pad_id)

    # 6. Final evaluation, export of final/, headline metrics into the manifest.
    finale = Finale(export_final(ctx, engine), extra={"steps": plan.total_steps, "data": data.report.to_dict()})
    return train_then_finish(ctx, engine, plan, begun, Loop(one_step, run_eval, SHOW), finale)


def micro_batches(examples: list, idx: list[int], micro: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate_sft([examples[i] for i in idx[j : j + micro]], pad_id) for j in range(0, len(idx), micro)]


def step_batches(examples: list, idx: list[int], micro: int, pad_id: int, packing: Packing) -> list[dict]:
    """The forwards of this rank's step over the examples `idx`: packed (`data.packing`) or padded micro-batches."""
    if not packing.enabled:
        return micro_batches(examples, idx, micro, pad_id)
    mine = [examples[i] for i in idx]
    sizes = [len(ex.input_ids) for ex in mine]
    layout = packing.layout(sizes)
    return [collate_packed_sft(mine, rows, pad_id, packing.flat) for rows in layout]


def train_step(engine: Any, batches: list[dict[str, torch.Tensor]], device: torch.device, packed: bool = False) -> dict:
    """One optimizer step over this rank's forwards (packed or padded); the loss is normalised over all ranks."""
    n_global = float(eng.all_reduce_sum(sum(count_targets(b["labels"]) for b in batches)))
    sums = Sums("loss", "tokens")

    def one(b: dict[str, torch.Tensor], real: bool) -> None:
        b = {k: v.to(device) for k, v in b.items()}
        loss_sum, _ = sft_loss(engine, b)
        eng.backward(engine, loss_sum if real else loss_sum * 0.0, n_global)  # a filler forward adds nothing
        if real:
            sums.add(loss=loss_sum.detach(), tokens=real_tokens(b))

    norm = accumulate(engine, batches, one, packed)
    total = sums.all_reduced()
    return {
        "loss": total["loss"] / n_global,
        "target_tokens": n_global,
        "tokens": total["tokens"],
        "grad_norm": norm,
    }


def sft_loss(model: Any, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed target-token NLL of a collated batch (input_ids, attention_mask, labels (B, T)), or a packed one
    (input_ids, position_ids, labels (R, W)), and its target count. Only the target positions go through the LM head,
    in chunks (`models.lm_head`): no (B, T, V) logits."""
    logps = target_logprobs(
        model, b["input_ids"], b.get("attention_mask"), b["labels"], position_ids=b.get("position_ids")
    )  # (B, T-1) fp32
    return sft_loss_from_logprobs(logps, b["labels"])


@torch.no_grad()
def evaluate(engine: Any, examples: list, batch_size: int, dist: Any, pad_id: int) -> dict[str, float]:
    """Token-level eval loss and perplexity over all eval examples (sharded over ranks by `eval_batches`, summed
    exactly)."""
    if not examples:
        return {}
    engine.eval()
    total, count = 0.0, 0
    for part in eval_batches(len(examples), batch_size, dist.rank, dist.world_size):
        b = collate_sft([examples[i] for i in part.idx], pad_id)
        b["labels"][~part.real] = IGNORE_INDEX  # a filler row adds nothing to the loss sum or the token count
        b = {k: v.to(dist.device) for k, v in b.items()}
        loss_sum, n = sft_loss(engine, b)
        total += float(loss_sum)
        count += n
    total, count = float(eng.all_reduce_sum(total)), float(eng.all_reduce_sum(count))
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
