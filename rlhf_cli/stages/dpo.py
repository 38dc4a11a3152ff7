"""`rlhf dpo`: the DPO family on preference pairs (docs/algorithms.md section 6), from this run's SFT model.

The reference is a frozen copy of the starting checkpoint, or (LoRA) the same model with its adapters
disabled, or (`stage.precompute_ref`) log-probs computed in one pass before training so no reference
model is held. All three give the same loss. Log-probs are summed over the completion tokens (EOS
included) in fp32; each loss says in rlhf_cli/losses/dpo.py which normalisation it uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rlhf_cli import engine as eng
from rlhf_cli.data import build_preference_datasets, collate_preference
from rlhf_cli.data.packing import model_mask, real_tokens, segment_sums
from rlhf_cli.data.sharding import eval_batches
from rlhf_cli.errors import UserError
from rlhf_cli.losses.dpo import REFERENCE_FREE, implicit_rewards, preference_loss
from rlhf_cli.metrics import Sums
from rlhf_cli.models import disable_dropout, load_causal_lm
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
from rlhf_cli.stages.rm import pair_batches

SHOW = ("loss", "reward_accuracy", "reward_margin", "lr", "tok/s", "eval_reward_accuracy")
PAIR_KEYS = (
    "loss",
    "reward_chosen",
    "reward_rejected",
    "reward_margin",
    "reward_accuracy",
    "logps_chosen",
    "logps_rejected",
)


def run(cfg: Any, run: Run) -> Path | None:
    """Train the policy and export `<run>/dpo/final/`. Returns it, or None when stopped early to resume."""
    st = cfg.stage
    # 1. Distributed group, seed, where the policy starts, its tokenizer (stages/context.py).
    ctx = stage_context(cfg, run)
    ref_source = run.resolve_source(st.reference) if st.reference else ctx.source

    # 2. Preference pairs (chosen and rejected share the prompt's token ids) and the step plan.
    data = build_preference_datasets(cfg.data, ctx.tokenizer, seed=cfg.seed)
    plan = step_plan(len(data.train), st, ctx.dist.world_size)

    # 3. Reference log-probs (precomputed), or the reference model; then the policy in the engine.
    ref = Reference(st, cfg, ref_source, ctx.tokenizer, ctx.dist)
    if st.precompute_ref and st.loss not in REFERENCE_FREE:
        ref.precompute({"train": data.train, "eval": data.eval}, ctx.tokenizer.pad_token_id)
    engine = policy_engine(cfg, ctx.model_cfg, ctx.tokenizer, plan.total_steps, ctx.dist.world_size)
    packing = joint_packing(cfg, engine, ref, ref_source)

    # 4. Resume; record the stage as running.
    inputs = {"policy": ctx.source, "reference": ref.describe(), "data": cfg.data.source}
    lines = (data.report.summary(), plan.describe(), f"reference: {ref.describe()}", packing.describe())
    begun = begin(ctx, engine, plan.total_steps, inputs, lines)

    # 5. Train: the step's pairs from the plan (a pure function of the step), packed or in micro-batches.
    pad_id, micro, dist = ctx.tokenizer.pad_token_id, st.micro_batch_size, ctx.dist

    def one_step(step: int) -> dict[str, float]:
        idx = plan.rank_indices(step, dist.rank, cfg.seed)
        forwards = pair_forwards(data.train, idx, micro, pad_id, packing)
        return train_step(engine, ref, st, "train", forwards, dist.device, packing.enabled)

    def run_eval() -> dict[str, float]:
        return evaluate(engine, ref, st, data.eval, pad_id, dist)

    # 6. Final evaluation, export of the policy, headline metrics into the manifest.
    finale = Finale(export_final(ctx, engine), extra={"steps": plan.total_steps, "data": data.report.to_dict()})
    return train_then_finish(ctx, engine, plan, begun, Loop(one_step, run_eval, SHOW), finale)


def joint_packing(cfg: Any, engine: Any, ref: Reference, ref_source: str) -> Packing:
    """The policy's packing, narrowed to a layout the reference model can read too (it reads the same forwards)."""
    packing = packing_for(cfg.data, cfg.stage, engine, per_item=2)
    if packing.enabled and ref.model is not None:
        try:
            packing = packing.joint(packing_for(cfg.data, cfg.stage, ref.model, per_item=2))
        except UserError as err:
            raise UserError(f"the reference model ({ref_source}): {err}") from None
    return packing


def pair_forwards(examples: list, idx: list[int], micro: int, pad_id: int, packing: Any) -> list[tuple[list, dict]]:
    """This rank's forwards of one step as (pair indices into `examples`, batch), packed or padded (`rm.pair_batches`):
    the indices in the batch's pair order, for the precomputed reference table."""
    batches = pair_batches(examples, idx, micro, pad_id, packing)
    if not packing.enabled:
        return [(idx[j : j + micro], b) for j, b in zip(range(0, len(idx), micro), batches, strict=True)]
    return [([idx[i] for i in b["pairs"].tolist()], b) for b in batches]


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (fp32) and completion lengths of a stacked pair batch, each (2B,) chosen first.

    Chosen and rejected go through one forward, as padded rows or packed side by side (`data.packing`: position ids
    restart per sequence; the sums are taken per sequence), their shared prompt possibly once (`data.share_prompt`:
    an explicit (R, 1, W, W) mask); only their completion positions reach the LM head, in
    chunks (`models.lm_head`). Called under torch.no_grad for the reference, so no graph is built there."""
    logps = target_logprobs(
        model, batch["input_ids"], model_mask(model, batch), batch["labels"], position_ids=batch.get("position_ids")
    )
    targets = (batch["labels"][:, 1:] != -100).float()
    if "segment" in batch:
        return segment_sums(logps, batch), segment_sums(targets.to(logps.device), batch)
    return logps.sum(-1), targets.sum(-1)


class Reference:
    """Where the reference log-probs come from: none (SimPO, ORPO), a table computed before training,
    the policy with its LoRA adapters disabled, or a frozen reference model."""

    def __init__(self, st: Any, cfg: Any, source: str, tokenizer: Any, dist: Any):
        self.st, self.dist, self.source, self.table, self.model = st, dist, source, None, None
        if st.loss in REFERENCE_FREE:
            self.kind = "none"
        elif cfg.model.lora.enabled and not st.reference:
            self.kind = "adapters_off"  # the policy's own base weights: no second copy in memory
        else:
            self.kind = "model"
        if self.kind == "model" or (self.kind == "adapters_off" and st.precompute_ref):
            ref_cfg = OmegaConf.merge(cfg.model, {"name_or_path": source})
            model = load_causal_lm(ref_cfg, tokenizer, seed=cfg.seed)
            disable_dropout(model)
            self.model = eng.frozen(model, cfg.deepspeed, st.micro_batch_size, dist.device)

    def describe(self) -> str:
        if self.table is not None:
            return f"precomputed from {self.source}"
        return {
            "none": "none (reference-free loss)",
            "adapters_off": "the policy with LoRA adapters disabled",
            "model": f"frozen copy of {self.source}",
        }[self.kind]

    @torch.no_grad()
    def precompute(self, splits: dict[str, list], pad_id: int) -> None:
        """One pass over every pair of every split; then the reference model is dropped."""
        self.table = {}
        for name, examples in splits.items():
            rows = []
            for j in range(0, len(examples), self.st.eval_batch_size):
                batch = collate_preference(examples[j : j + self.st.eval_batch_size], pad_id)
                batch = {k: v.to(self.dist.device) for k, v in batch.items()}
                logps, _ = sequence_logps(self.model, batch)
                rows.append(torch.stack(logps.float().cpu().chunk(2), dim=1))  # (B, 2): chosen, rejected
            self.table[name] = torch.cat(rows) if rows else torch.zeros(0, 2)
        self.model = None

    @torch.no_grad()
    def logps(self, policy: Any, batch: dict, split: str, idx: list[int]) -> torch.Tensor | None:
        """Reference summed log-probs (2B,) for the pairs `idx` of `split`, or None (reference-free)."""
        if self.kind == "none":
            return None
        if self.table is not None:
            rows = self.table[split][idx]
            return torch.cat([rows[:, 0], rows[:, 1]]).to(batch["input_ids"].device)
        if self.kind == "adapters_off":
            module = getattr(policy, "module", policy)
            with module.disable_adapter():
                return sequence_logps(policy, batch)[0]
        return sequence_logps(self.model, batch)[0]


def pair_losses(engine: Any, ref: Reference, st: Any, batch: dict, split: str, idx: list[int]) -> dict:
    """Per-pair loss (B,) and the logged per-pair quantities for one stacked micro-batch."""
    ref_logps = ref.logps(engine, batch, split, idx)
    logps, lengths = sequence_logps(engine, batch)
    pc, pr = logps.chunk(2)
    lc, lr = lengths.chunk(2)
    rc, rr = ref_logps.chunk(2) if ref_logps is not None else (torch.zeros_like(pc), torch.zeros_like(pr))
    loss = preference_loss(
        st.loss,
        pc,
        pr,
        rc,
        rr,
        lc,
        lr,
        beta=st.beta,
        label_smoothing=st.label_smoothing,
        rpo_alpha=st.rpo_alpha,
        simpo_gamma=st.simpo_gamma,
        orpo_lambda=st.orpo_lambda,
    )
    return {
        "loss": loss,
        **implicit_rewards(pc, pr, rc, rr, st.beta),
        "logps_chosen": pc.detach(),
        "logps_rejected": pr.detach(),
    }


def train_step(engine, ref, st, split, forwards, device, packed: bool = False) -> dict[str, float]:
    """One optimizer step over this rank's forwards, (pair indices, batch) each: the per-pair losses summed, divided
    by the pairs of the step on all ranks."""
    n_global = float(eng.all_reduce_sum(sum(len(idx) for idx, _ in forwards)))
    sums = Sums(*PAIR_KEYS, "tokens")

    def one(forward: tuple[list, dict], real: bool) -> None:
        idx, batch = forward
        batch = {k: v.to(device) for k, v in batch.items()}
        out = pair_losses(engine, ref, st, batch, split, idx)
        eng.backward(engine, out["loss"].sum() * (1.0 if real else 0.0), n_global)  # a filler adds nothing
        if real:
            sums.add(**{key: out[key].detach().sum() for key in PAIR_KEYS}, tokens=real_tokens(batch))

    norm = accumulate(engine, forwards, one, packed)
    total = sums.all_reduced()
    return {
        **{k: total[k] / n_global for k in PAIR_KEYS},
        "tokens": total["tokens"],
        "pairs": n_global,
        "grad_norm": norm,
    }


@torch.no_grad()
def evaluate(engine: Any, ref: Reference, st: Any, examples: list, pad_id: int, dist: Any) -> dict[str, float]:
    """The per-pair quantities averaged over all eval pairs (sharded over ranks by `eval_batches`, summed exactly).
    Filler pairs index real examples (the precomputed reference table has no row -1) and are left out of the sums."""
    if not examples:
        return {}
    engine.eval()
    sums = Sums(*PAIR_KEYS, "pairs")
    for part in eval_batches(len(examples), st.eval_batch_size, dist.rank, dist.world_size):
        pairs = [examples[i] for i in part.idx]
        batch = {k: v.to(dist.device) for k, v in collate_preference(pairs, pad_id).items()}
        out = pair_losses(engine, ref, st, batch, "eval", part.idx)
        sums.add_columns({**{key: out[key].detach() for key in PAIR_KEYS}, "pairs": part.weight}, keep=part.real)
    total = sums.all_reduced()
    return {f"eval_{k}": total[k] / total["pairs"] for k in PAIR_KEYS}
