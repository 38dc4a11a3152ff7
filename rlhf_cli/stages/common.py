"""Functions the training stages share (no base class): the step plan, model inputs, the training loop."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rlhf_cli import checkpoints as ckpt
from rlhf_cli import engine as eng
from rlhf_cli import preempt
from rlhf_cli.errors import UserError
from rlhf_cli.metrics import Metrics
from rlhf_cli.run_dir import now
from rlhf_cli.stages.plan import StepPlan
from rlhf_cli.summary import complete_stage


def step_plan(n_examples: int, stage_cfg: Any, world_size: int) -> StepPlan:
    micro, accum = stage_cfg.micro_batch_size, stage_cfg.gradient_accumulation_steps
    global_batch = micro * accum * world_size
    steps_per_epoch = n_examples // global_batch  # the last partial batch of an epoch is dropped
    if steps_per_epoch == 0:
        raise UserError(
            f"only {n_examples} training examples for a global batch of {global_batch}; lower "
            f"stage.micro_batch_size or stage.gradient_accumulation_steps, or add data"
        )
    total = stage_cfg.max_steps or math.ceil(stage_cfg.epochs * steps_per_epoch)
    return StepPlan(n_examples, micro, accum, world_size, steps_per_epoch, max(1, total))


@dataclass(frozen=True)
class Packing:
    """How one rank's examples of an optimizer step are laid out (rlhf_cli/data/packing.py): packed or not, the
    longest possible item (data.max_length, x 2 for a pair), the tokens per forward (padding included;
    data.max_tokens_per_batch, or None: per step, `micro` x the step's longest item, the size of the step's widest
    padded micro-batch, so the hidden states never outgrow padding's; sdpa's (R, 1, W, W) mask, which torch keeps
    per layer in the activations' dtype, is R x W^2 <= 2 x micro x the longest^2, up to twice a padded
    micro-batch's when rows are twice its width), and whether forwards are flattened into
    one row (flash attention detects packed sequences only there)."""

    enabled: bool
    capacity: int
    budget: int | None = None
    flat: bool = False
    micro: int = 1
    share_prompt: bool = False  # pairs: the prompt once for both replies (data.share_prompt)
    # sdpa: rows up to 2 x the longest item where that costs less (data/packing.py `attention_width`); 0: rows as long
    # as the longest item (eager, whose (R, heads, W, W) attention weights would outgrow a padded micro-batch's)
    width_scale: float = 0.0

    def layout(self, sizes: list[int]) -> list[list[list[int]]]:
        """Item positions as [forward][row][position], sizes (N,) tokens per item. Rows are as long as the step's
        longest item, or (sdpa) up to twice that where the row's attention costs less than the rows saved: sdpa and
        eager attend over the whole row, masked, so a row costs the attention of one padded row of its width while
        holding several short items. Flattened forwards (varlen flash attention): one row each."""
        from rlhf_cli.data.packing import plan_cheapest, plan_forwards

        budget = self.budget or self.micro * max(sizes)
        if self.flat:
            return plan_forwards(sizes, budget, budget)
        return plan_cheapest(sizes, budget, self.width_scale)

    def describe(self) -> str:
        if not self.enabled:
            return "packing: off (padded micro-batches)"
        budget = f"{self.budget} tokens" if self.budget else f"{self.micro} x the step's longest example"
        rows = "one row per forward" if self.flat else "rows as long as the step's longest example"
        if self.width_scale and not self.flat:
            rows = "rows 1-2 x the step's longest example, the width that costs least"
        shared = "; each pair's prompt computed once" if self.share_prompt else ""
        return f"packing: on, up to {budget} per forward (padding included), {rows}{shared}"

    def joint(self, other: Packing) -> Packing:
        """The layout that both this model and `other` (DPO's reference, which reads the same forwards) can take."""
        enabled = self.enabled and other.enabled
        flat, share = self.flat or other.flat, self.share_prompt and other.share_prompt
        scale = self.width_scale if other.width_scale else 0.0  # an eager reference keeps rows at the longest item
        return replace(self, enabled=enabled, flat=enabled and flat, share_prompt=enabled and share, width_scale=scale)


def packing_for(data_cfg: Any, st: Any, model: Any, per_item: int) -> Packing:
    """The stage's `Packing` from `data.packing` / `data.max_tokens_per_batch` and the model (or engine) it trains:
    auto is on where its attention keeps packed sequences apart; forced on where it does not is a UserError.
    `per_item`: sequences per item (1 for SFT, 2 for a preference pair, whose two sequences share a forward)."""
    from rlhf_cli.data.packing import (
        FLAT_ATTENTION,
        attention_width,
        check_budget,
        resolve_packing,
        resolve_share_prompt,
    )
    from rlhf_cli.models.load import unwrap

    config = unwrap(model).config
    capacity = data_cfg.max_length * per_item
    packed = resolve_packing(data_cfg.packing, config)
    share = per_item == 2 and resolve_share_prompt(data_cfg.share_prompt, config, data_cfg.max_length)
    if not packed:
        return Packing(False, capacity)
    budget = check_budget(data_cfg.max_tokens_per_batch, data_cfg.max_length, per_item)
    flat = config._attn_implementation in FLAT_ATTENTION
    scale = attention_width(config) if config._attn_implementation == "sdpa" else 0.0
    return Packing(True, capacity, budget, flat, st.micro_batch_size, share, scale)


def accumulate(engine: Any, forwards: list, one: Callable[[Any, bool], None], packed: bool) -> float | None:
    """Forward and backward of each of this rank's forwards of one optimizer step; the optimizer steps after the last.

    `one(forward, real)` runs one forward/backward; with real=False it must back-propagate a zero loss. Packed ranks
    may hold different numbers of forwards, but under ZeRO-3 every forward and under ZeRO-2 every backward is a
    collective: every rank runs the largest count over the ranks, the missing ones repeating its own last forward with
    weight 0. DeepSpeed's accumulation boundary is set explicitly (true on the last forward), since its micro-step
    counter assumes gradient_accumulation_steps forwards per step. Returns the gradient norm (`eng.step`)."""
    count = len(forwards)
    if packed:
        count = int(eng.all_gather_cat(torch.tensor([count])).max())
    norm = None
    for i in range(count):
        engine.set_gradient_accumulation_boundary(i == count - 1)
        one(forwards[min(i, len(forwards) - 1)], i < len(forwards))
        norm = eng.step(engine)
    return norm


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the model's forward takes (labels stay out: our losses are computed outside)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@dataclass(frozen=True)
class Loop:
    """What the shared loop calls: `step(step)` runs one optimizer step (0-based) and returns its metrics ("loss",
    "grad_norm" and, for tokens/s, "tokens" / "target_tokens"); `evaluate()` the held-out metrics; `show` the keys of
    the console line; `save(step)` writes a checkpoint (None: the engine's state into `ckpt_dir`, default the run's
    checkpoints/). A stage that trains in several phases (rejection sampling's rounds) numbers its steps across them:
    `step_offset` is added to the step in metrics, checkpoint names and `stage.stop_after_steps`."""

    step: Callable[[int], dict[str, Any]]
    evaluate: Callable[[], dict[str, float]]
    show: tuple[str, ...]
    save: Callable[[int], Any] | None = None
    step_offset: int = 0
    ckpt_dir: Path | None = None


def train_loop(ctx: Any, engine: Any, plan: StepPlan, metrics: Metrics, start_step: int, loop: Loop) -> dict[str, Any]:
    """Optimizer steps from `start_step` to the end of the plan, or to `stage.stop_after_steps` (`ctx`: the stage's
    StageContext, stages/context.py).

    Every `stage.eval_every` steps `loop.evaluate()` adds eval metrics. Checkpoints every `stage.save_every` steps; on
    SIGTERM / SIGUSR1 / Ctrl-C (any rank) all ranks save at the same step and raise Preempted. Returns the last step's
    record (its "step" counted within this loop) with running totals."""
    st, dist = ctx.cfg.stage, ctx.dist
    engine.train()
    totals = {"tokens": 0.0, "target_tokens": 0.0, "pairs": 0.0, "train_seconds": 0.0}
    last: dict[str, Any] = {"step": start_step}
    # Ctrl-C in the loop: a checkpoint at the next step boundary, like SIGTERM (a second Ctrl-C stops at once).
    with preempt.ctrl_c_saves(), metrics.closed_on_error():
        for step in range(start_step, plan.total_steps):
            t0 = time.perf_counter()
            out = loop.step(step)
            dt = time.perf_counter() - t0
            done = step + 1
            totals["train_seconds"] += dt
            values = {
                **out,
                "lr": eng.current_lr(engine),
                "epoch": done / plan.steps_per_epoch,
                "step_seconds": dt,
                "peak_mem_mib": eng.peak_memory_mib(dist.device),
            }
            for key, rate in (("tokens", "tok/s"), ("target_tokens", "target_tok/s"), ("pairs", "pairs/s")):
                if key in out:
                    totals[key] += out[key]
                    values[rate] = out[key] / dt
            if st.eval_every and done % st.eval_every == 0 and done < plan.total_steps:
                values.update(loop.evaluate())
                engine.train()
            metrics.log(loop.step_offset + done, values, loop.show)
            last = {"step": done, "loss": out["loss"], "peak_mem_mib": values["peak_mem_mib"], **totals}
            if _step_boundary(ctx, engine, plan, metrics, loop, done):
                break
    return last


def _step_boundary(ctx: Any, engine: Any, plan: StepPlan, metrics: Metrics, loop: Loop, done: int) -> bool:
    """After step `done`: a checkpoint when due (every `save_every`, or stopping, or preempted on any rank); raises
    Preempted after saving when preempted; True when `stage.stop_after_steps` stops the loop here."""
    st = ctx.cfg.stage
    at = loop.step_offset + done
    stopping = st.stop_after_steps is not None and plan.total_steps > done and at >= st.stop_after_steps
    preempted = eng.any_rank(preempt.requested())  # every rank stops at the same step boundary
    ckpt_dir = loop.ckpt_dir or ctx.run.checkpoints_dir
    if (st.save_every and done % st.save_every == 0) or stopping or preempted:
        if loop.save is None:
            ckpt.save_checkpoint(engine, ckpt_dir, at, {"step": at}, st.keep_last)
        else:
            loop.save(done)
    if preempted:
        raise preempt.Preempted(
            f"stopped by {preempt.signal_name() or 'a signal on another rank'} after step {at}; checkpoint "
            f"saved at step {at} ({ckpt_dir / f'step-{at}'}), run the same command again to resume from it"
        )
    if stopping:
        metrics.message(f"stopped after step {at} (stage.stop_after_steps); run the same command to resume")
    return stopping


def interrupted(ctx: Any, last: dict[str, Any], plan: StepPlan, metrics: Metrics, step_offset: int = 0) -> bool:
    """True, with the stage recorded as interrupted (at `step_offset` + the loop's last step), when the loop stopped
    before the end of the plan."""
    if last["step"] >= plan.total_steps:
        return False
    metrics.close()
    ctx.run.update_stage(status="interrupted", ended_at=now(), last_step=step_offset + last["step"])
    return True


@dataclass(frozen=True)
class Finale:
    """How a stage ends (`finish`): `export(final_eval)` writes its outputs (final/ and what else it keeps); `extra`
    (or what `extra()` returns then, for values the training changes) adds to the headline metrics, `outputs` to
    final/ in the manifest; `gate(final_eval)`, after the record and before the stage counts as completed, may refuse
    it (RM's accuracy gate)."""

    export: Callable[[dict[str, float]], Any]
    extra: dict[str, Any] | Callable[[], dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    gate: Callable[[dict[str, float]], None] | None = None


def export_final(ctx: Any, engine: Any) -> Callable[[dict[str, float]], None]:
    """The usual export: the trained model into final/, LoRA adapters merged when model.lora.merge is set."""
    lora = ctx.model_cfg.lora
    return lambda final_eval: eng.export_hf(
        engine, ctx.tokenizer, ctx.run.final_dir, merge_lora=lora.enabled and lora.merge
    )


def finish(
    ctx: Any,
    metrics: Metrics,
    last: dict[str, Any],
    final_eval: dict[str, float],
    show: tuple[str, ...],
    finale: Finale,
) -> None:
    """The end of a stage: log the final evaluation, close the metrics, export, then record the outputs (final/ and
    `finale.outputs`) and the headline metrics in the manifest, `finale.gate`, and the status with the stage's summary
    (its resume checkpoints dropped unless `stage.keep_checkpoints`)."""
    run = ctx.run
    metrics.log(last["step"], final_eval, show)
    metrics.close()
    finale.export(final_eval)
    extra = finale.extra() if callable(finale.extra) else finale.extra
    # Token totals only where the stage counts them (RM / DPO / PPO have no target tokens: no recorded zero).
    headline = {
        k: last[k]
        for k in ("loss", "tokens", "target_tokens", "train_seconds", "peak_mem_mib")
        if k in last and (last[k] or k not in ("tokens", "target_tokens"))
    }
    record = {
        "outputs": {"final": str(run.final_dir.relative_to(run.root)), **finale.outputs},
        "metrics": {**headline, **final_eval, **extra},
    }
    run.update_stage(**record)
    if finale.gate is not None:
        finale.gate(final_eval)
    complete_stage(run, ctx.cfg.stage.keep_checkpoints, plots=metrics.plots)


def in_engine(cfg: Any, model: Any, total_steps: int, world_size: int, optim: Any = None) -> Any:
    """`model` in its DeepSpeed engine at the stage's micro-batch and accumulation, with AdamW (`optim`, default the
    config's `optim` group) and its schedule over `total_steps` optimizer steps."""
    optim = cfg.optim if optim is None else optim
    st = cfg.stage
    ds_cfg = eng.ds_config(cfg.deepspeed, optim, st.micro_batch_size, st.gradient_accumulation_steps, world_size)
    return eng.initialize(model, ds_cfg, optim, total_steps)


def frozen_policy(ctx: Any, model_cfg: Any) -> Any:
    """The causal LM `model_cfg` names, frozen for generation and scoring: eval mode, no dropout, no gradients,
    ZeRO-3-partitioned under deepspeed.zero_stage=3 like the models it shares the accelerator with (forwards of
    stage.eval_batch_size rows)."""
    from rlhf_cli.models import disable_dropout, load_causal_lm

    cfg = ctx.cfg
    model = load_causal_lm(model_cfg, ctx.tokenizer, seed=cfg.seed)
    disable_dropout(model)
    return eng.frozen(model, cfg.deepspeed, cfg.stage.eval_batch_size, ctx.dist.device)


def policy_engine(
    cfg: Any, model_cfg: Any, tokenizer: Any, total_steps: int, world_size: int, dropout_off: bool = True
) -> Any:
    """The policy (optional gradient checkpointing and LoRA; dropout off for the preference and RL stages) in its
    DeepSpeed engine with AdamW and the schedule over `total_steps` optimizer steps. SFT keeps the model's dropout
    (`dropout_off=False`): its loss compares the policy with nothing."""
    from rlhf_cli.models import apply_lora, disable_dropout, enable_gradient_checkpointing, load_causal_lm

    policy = load_causal_lm(model_cfg, tokenizer, seed=cfg.seed)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if cfg.model.lora.enabled:
        policy = apply_lora(policy, cfg.model.lora)
    # After LoRA, whose adapters bring their own dropout (model.lora.dropout): with any dropout on, the train-mode
    # forward differs from the eval-mode rollout / reference one, so pi / pi_old (PPO) and pi / pi_ref (DPO) != 1.
    if dropout_off:
        disable_dropout(policy)
    return in_engine(cfg, policy, total_steps, world_size)
