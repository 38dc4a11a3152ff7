"""`rlhf rm`: a reward model trained on preference pairs with the Bradley-Terry loss (docs/algorithms.md section 3).

Each micro-batch is one forward over the stacked [chosen; rejected] rows; the score is read at the last real token
(`sequence_scores`). The loss is a mean over pairs: the summed per-pair loss of a micro-batch goes to `backward`
with the number of pairs of the whole optimizer step over all ranks, exact for unequal micro-batches too.
Evaluation reports pair accuracy and margin, and the mean / std of the rewards of every eval reply, which the
manifest keeps for reward normalisation downstream (PPO). `stage.min_eval_accuracy` gates the stage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rlhf_cli import engine as eng
from rlhf_cli.data import build_preference_datasets, collate_preference
from rlhf_cli.data.packing import collate_packed_pairs, collate_shared_pairs, pair_size, real_tokens, shared_pair_size
from rlhf_cli.data.sharding import eval_batches
from rlhf_cli.errors import UserError
from rlhf_cli.losses import bradley_terry_loss, split_pairs
from rlhf_cli.metrics import Sums
from rlhf_cli.models import enable_gradient_checkpointing
from rlhf_cli.models.reward import (
    REWARD_STATS_FILE,
    apply_reward_lora,
    check_max_length,
    load_reward_model,
    load_reward_tokenizer,
    packed_sequence_scores,
    sequence_scores,
)
from rlhf_cli.run_dir import Run
from rlhf_cli.stages.common import (
    Finale,
    Loop,
    Packing,
    accumulate,
    export_final,
    in_engine,
    packing_for,
    step_plan,
)
from rlhf_cli.stages.context import StageContext, begin, merged_model_config, stage_context, train_then_finish

SHOW = ("loss", "accuracy", "lr", "tok/s", "pairs/s", "eval_accuracy")


def run(cfg: Any, run: Run) -> Path | None:
    """Train, checkpoint and export `<run>/rm/final/`. Returns it, or None when stopped early to resume."""
    st = cfg.stage
    # 1. Distributed group, seed; the starting model (`stage:sft` -> this run's sft/final, or a clear error) and the
    #    tokenizer from it.
    ctx = stage_context(cfg, run, model_config=resolved_model_config, tokenizer=load_reward_tokenizer)

    # 2. Preference data (tokenized once, in memory) and the step plan.
    data = build_preference_datasets(cfg.data, ctx.tokenizer, seed=cfg.seed)
    if st.min_eval_accuracy is not None and not data.eval:  # fail now, not after training
        raise UserError(
            "stage.min_eval_accuracy needs held-out pairs, and there are none: set data.eval_fraction > 0 or "
            "data.eval_split, or unset stage.min_eval_accuracy"
        )
    plan = step_plan(len(data.train), st, ctx.dist.world_size)

    # 3. Reward model (+ gradient checkpointing, LoRA) inside the DeepSpeed engine.
    model, engine, packing = build_engine(cfg, ctx.model_cfg, ctx.tokenizer, plan, ctx.dist)

    # 4. Resume from the newest complete checkpoint, if any; record the stage as running.
    inputs = {
        "model": run_relative(ctx.source, run),
        "model_name_or_path": cfg.model.name_or_path,
        "data": cfg.data.source,
    }
    model_line = f"model: {ctx.source} ({type(model).__name__})"
    lines = (model_line, data.report.summary(), plan.describe(), packing.describe())
    begun = begin(ctx, engine, plan.total_steps, inputs, lines)

    # 5. Train: the step's pairs from the plan (a pure function of the step), packed or in micro-batches.
    pad_id, micro, dist = ctx.tokenizer.pad_token_id, st.micro_batch_size, ctx.dist

    def one_step(step: int) -> dict[str, float]:
        idx = plan.rank_indices(step, dist.rank, cfg.seed)
        batches = pair_batches(data.train, idx, micro, pad_id, packing)
        return train_step(engine, batches, dist.device, st.center_coef, packing.enabled)

    def run_eval() -> dict[str, float]:
        return evaluate(engine, data.eval, st.eval_batch_size, dist, pad_id)

    # 6. Final evaluation, export of final/ with the reward statistics, headline metrics, then the accuracy gate.
    finale = Finale(
        export_with_stats(ctx, engine),
        extra={"steps": plan.total_steps, "data": data.report.to_dict()},
        gate=lambda final_eval: check_accuracy_gate(final_eval, st.min_eval_accuracy, run.final_dir),
    )
    return train_then_finish(ctx, engine, plan, begun, Loop(one_step, run_eval, SHOW), finale)


def export_with_stats(ctx: StageContext, engine: Any) -> Callable[[dict[str, float]], None]:
    """final/, and next to its weights the final evaluation's reward mean / std (reward_stats.json), which a later
    stage normalises scores with (stage.reward.normalize=rm_stats)."""
    export = export_final(ctx, engine)

    def write(final_eval: dict[str, float]) -> None:
        export(final_eval)
        if ctx.dist.is_main and "reward_mean" in final_eval:
            stats = {k: final_eval[k] for k in ("reward_mean", "reward_std", "eval_pairs")}
            (ctx.run.final_dir / REWARD_STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")

    return write


def build_engine(cfg: Any, model_cfg: Any, tokenizer: Any, plan: Any, dist: Any) -> tuple[Any, Any, Any]:
    """(the reward model, its DeepSpeed engine, the step's packing): loaded from `model_cfg.name_or_path` (resolved),
    with gradient checkpointing and LoRA as configured."""
    st = cfg.stage
    model = load_reward_model(model_cfg, model_cfg.name_or_path, tokenizer, seed=cfg.seed)
    check_max_length(model, cfg.data.max_length)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if model_cfg.lora.enabled:
        model = apply_reward_lora(model, model_cfg.lora)
    engine = in_engine(cfg, model, plan.total_steps, dist.world_size)
    return model, engine, packing_for(cfg.data, st, engine, per_item=2)


def resolved_model_config(cfg: Any, run: Run) -> Any:
    """The `model` group as a plain dataclass with `stage:<name>` sources replaced by that stage's final/."""
    return OmegaConf.to_object(merged_model_config(cfg, run))


def run_relative(path: str, run: Run) -> str:
    """A folder inside the run directory as a path relative to it (like `outputs`); anything else unchanged."""
    try:
        return str(Path(path).resolve().relative_to(run.root.resolve()))
    except ValueError:
        return path


def pair_batches(examples: list, idx: list[int], micro: int, pad_id: int, packing: Packing) -> list[dict]:
    """The forwards of this rank's step over the pairs `idx`: packed (a pair's chosen and rejected side by side,
    `data.packing`) or padded micro-batches of 2B rows; both hold margin (B,) and the sequences chosen first."""
    mine = [examples[i] for i in idx]
    if not packing.enabled:
        return [collate_preference(mine[j : j + micro], pad_id) for j in range(0, len(mine), micro)]
    if packing.share_prompt:  # each pair's prompt once, an explicit mask keeping the replies apart
        layout = packing.layout([shared_pair_size(p) for p in mine])
        return [collate_shared_pairs(mine, rows, pad_id) for rows in layout]
    layout = packing.layout([pair_size(p) for p in mine])
    return [collate_packed_pairs(mine, rows, pad_id, packing.flat) for rows in layout]


def batch_scores(model: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reward per sequence (2B,) of a padded or a packed pair batch."""
    if "position_ids" in b:
        return packed_sequence_scores(model, b)
    return sequence_scores(model, b["input_ids"], b["attention_mask"])


def train_step(engine: Any, batches: list[dict], device: torch.device, center_coef: Any, packed: bool = False) -> dict:
    """One optimizer step over this rank's forwards of B_i pairs each (2 B_i sequences, chosen first).

    Normaliser: pairs of the whole step over all ranks, so the gradient is that of the mean over those pairs."""
    n_pairs = float(eng.all_reduce_sum(sum(len(b["margin"]) for b in batches)))
    sums = Sums("loss", "correct", "margin", "chosen", "rejected", "tokens")

    def one(b: dict[str, torch.Tensor], real: bool) -> None:
        b = {k: v.to(device) for k, v in b.items()}
        r_chosen, r_rejected = split_pairs(batch_scores(engine, b))
        loss, _ = bradley_terry_loss(r_chosen, r_rejected, b["margin"], center_coef)
        n = len(r_chosen)
        eng.backward(engine, loss * (n if real else 0.0), n_pairs)  # summed per-pair loss; a filler adds nothing
        if real:
            pairs = pair_sums(r_chosen, r_rejected)
            sums.add(
                loss=loss.detach().double().cpu() * n,
                correct=pairs["correct"],
                margin=pairs["margin"],
                chosen=pairs["chosen"],
                rejected=pairs["rejected"],
                tokens=real_tokens(b),
            )

    norm = accumulate(engine, batches, one, packed)
    total = sums.all_reduced()
    return {
        "loss": total["loss"] / n_pairs,
        "accuracy": total["correct"] / n_pairs,
        "margin": total["margin"] / n_pairs,
        "reward_chosen": total["chosen"] / n_pairs,
        "reward_rejected": total["rejected"] / n_pairs,
        "grad_norm": norm,
        "pairs": n_pairs,
        "tokens": total["tokens"],
    }


@torch.no_grad()
def evaluate(engine: Any, examples: list, batch_size: int, dist: Any, pad_id: int) -> dict[str, float]:
    """Held-out pairs (sharded over ranks by `eval_batches`, summed exactly): accuracy, mean margin, BT loss, and
    the mean and population std of the rewards of all 2N replies (chosen and rejected together)."""
    if not examples:
        return {}
    engine.eval()
    sums = Sums("pairs", "correct", "margin", "loss", "reward", "reward_sq")
    for part in eval_batches(len(examples), batch_size, dist.rank, dist.world_size):
        b = {k: v.to(dist.device) for k, v in collate_preference([examples[i] for i in part.idx], pad_id).items()}
        scores = sequence_scores(engine, b["input_ids"], b["attention_mask"]).double()
        real = part.real.to(scores.device)  # filler pairs ran the forward only to keep the ranks in step
        if not real.any():
            continue  # fillers only: nothing to add (and the BT mean over no pair is NaN)
        r_chosen, r_rejected = (r[real] for r in split_pairs(scores))
        loss, _ = bradley_terry_loss(r_chosen, r_rejected, b["margin"][real])
        s = pair_sums(r_chosen, r_rejected)
        n = len(r_chosen)
        sums.add(
            pairs=n,
            correct=s["correct"],
            margin=s["margin"],
            loss=loss.double().cpu() * n,
            reward=s["chosen"] + s["rejected"],
            reward_sq=s["squares"],
        )
    total = sums.all_reduced()
    pairs = total["pairs"]
    mean = total["reward"] / (2 * pairs)
    return {
        "eval_accuracy": total["correct"] / pairs,
        "eval_margin": total["margin"] / pairs,
        "eval_loss": total["loss"] / pairs,
        "reward_mean": mean,
        "reward_std": math.sqrt(max(total["reward_sq"] / (2 * pairs) - mean**2, 0.0)),
        "eval_pairs": pairs,
    }


def pair_sums(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over B pairs of rewards (B,) each, float64: correct pairs (r_c > r_r), margins, chosen, rejected, and
    the squares of all 2B rewards (for the std). Sums, not means, so ranks and micro-batches add up exactly."""
    r_chosen, r_rejected = r_chosen.detach().double().cpu(), r_rejected.detach().double().cpu()
    return {
        "correct": (r_chosen > r_rejected).sum().double(),
        "margin": (r_chosen - r_rejected).sum(),
        "chosen": r_chosen.sum(),
        "rejected": r_rejected.sum(),
        "squares": (r_chosen**2).sum() + (r_rejected**2).sum(),
    }


def check_accuracy_gate(final_eval: dict[str, float], threshold: float | None, final_dir: Path) -> None:
    """Fail the stage (final/ is kept for inspection) when held-out accuracy is below `stage.min_eval_accuracy`,
    so a pipeline never runs PPO on a reward model that cannot rank its own held-out pairs."""
    if threshold is None:
        return
    accuracy = final_eval["eval_accuracy"]
    if accuracy >= threshold:
        return
    raise UserError(
        f"reward model eval accuracy {accuracy:.4f} on {int(final_eval['eval_pairs'])} held-out pairs is below "
        f"stage.min_eval_accuracy={threshold:g}; the model is kept in {final_dir} for inspection. Try training "
        f"longer (stage.epochs / stage.max_steps), another optim.lr, more or cleaner preference data, or a "
        f"stronger starting model (model.name_or_path); or lower stage.min_eval_accuracy"
    )
