"""`rlhf ppo`: PPO with a critic on plain DeepSpeed (docs/algorithms.md sections 4 and 5).

One step of the stage is one iteration: sample a response per prompt (left-padded prompts, stop at EOS), read back
the rollout policy's and the reference's log-probs at the sampling temperature, the critic's values and the scores;
put the KL to the reference into the per-token reward; GAE; then `ppo_epochs` passes over the batch in shuffled
mini-batches (one actor and one critic optimizer step each, gradient accumulation over micro-batches). The losses
are token means over the mini-batch on all ranks. Dropout is off in all four models; the reference and the reward
model run in eval mode without gradients.

This module only wires the shared online parts of rlhf_cli/rollout/ (collection, scoring, advantages, the actor and
critic steps, evaluation) with what is PPO's own: the critic, the KL controller and the update schedule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rlhf_cli import checkpoints as ckpt
from rlhf_cli import engine as eng
from rlhf_cli.data import collate_prompts
from rlhf_cli.errors import UserError
from rlhf_cli.models import enable_gradient_checkpointing, is_builtin, load_tokenizer
from rlhf_cli.models.reward import load_reward_model, pools_last_token
from rlhf_cli.rollout.controllers import KLController, kl_controller
from rlhf_cli.rollout.experience import Collecting, RolloutModels, advantages, collect
from rlhf_cli.rollout.online import rollout_metrics, score_stats, timing, write_samples
from rlhf_cli.rollout.rewards import same_tokenizer
from rlhf_cli.run_dir import Run
from rlhf_cli.stages.common import Finale, Loop, export_final, in_engine
from rlhf_cli.stages.context import StageContext, begin, source_lines, stage_context, train_then_finish
from rlhf_cli.stages.online import OnlineParts, log_first_evaluation, online_parts, sampler_settings
from rlhf_cli.stages.plan import describe_plan, iteration_plan, ppo_updates
from rlhf_cli.stages.ppo_update import PtxData, ppo_update

SHOW = ("score_mean", "kl", "policy_loss", "value_loss", "lr", "tok/s", "eval_score", "eval_gold")


def run(cfg: Any, run: Run) -> Path | None:
    """Train the policy and export `<run>/ppo/final/` (and the critic in `<run>/ppo/critic/`)."""
    st = cfg.stage
    # 1. Distributed group, seed, the policy's starting checkpoint and its tokenizer (stages/context.py).
    ctx = stage_context(cfg, run)

    # 2. Prompts and the iteration plan; actor and critic in DeepSpeed engines, the frozen reference, the reward and
    #    gold sources (stages/online.py); optional ptx data; the KL controller.
    o = online_parts(
        ctx,
        lambda n: iteration_plan(n, st, ctx.dist.world_size),
        lambda plan: ppo_updates(plan, st),
        critic=lambda updates: build_critic(cfg, run, ctx.source, ctx.tokenizer, updates, ctx.dist),
    )
    ptx = PtxData(st, ctx.tokenizer, cfg.seed, ctx.dist) if st.ptx.coef > 0 else None
    p = Parts(ctx, o, ptx, kl_controller(st.kl_control, st.kl_coef, st.kl_target, st.kl_horizon))

    # 3. Resume (actor, critic, optimizers, schedulers, KL controller, running moments); record the stage.
    inputs = o.inputs(ctx)
    begun = begin(
        ctx,
        {"actor": o.actor, "critic": o.critic},
        o.plan.total_steps,
        inputs,
        (o.data.report.summary(), describe_plan(o.plan, st), *source_lines(inputs)),
        restore=lambda client: load_state(p, client),
    )

    # 4. Train: an evaluation of the starting policy, then the iterations (rollout, advantages, update).
    log_first_evaluation(begun, lambda: o.evaluate(ctx), SHOW)
    loop = Loop(lambda step: iteration(p, step), lambda: o.evaluate(ctx), SHOW, save=lambda step: save_state(p, step))

    # 5. Final evaluation, export of the policy (final/) and the critic (critic/), headline metrics.
    def export(final_eval: dict[str, float]) -> None:
        export_final(ctx, o.actor)(final_eval)
        eng.export_hf(o.critic, ctx.tokenizer, run.stage_dir / "critic", merge_lora=False)

    def extra() -> dict[str, Any]:  # the KL coefficient the adaptive controller ended at
        return {"iterations": o.plan.total_steps, "kl_coef": p.kl_ctl.value, "data": o.data.report.to_dict()}

    finale = Finale(export, outputs={"critic": f"{run.stage}/critic"}, extra=extra)
    return train_then_finish(ctx, o.actor, o.plan, begun, loop, finale)


@dataclass
class Parts:
    """What an iteration reads and updates: the stage's context and online parts (stages/online.py), the ptx data,
    the KL controller (checkpointed with the engines and the running moments)."""

    ctx: StageContext
    o: OnlineParts
    ptx: PtxData | None
    kl_ctl: KLController


def iteration(p: Parts, step: int) -> dict[str, float]:
    """One PPO iteration (0-based `step`): a rollout of this rank's prompts, scores shaped with the reward
    statistics, KL-in-reward advantages, the update; then the KL controller and, every `sample_every`, sample rows."""
    ctx, o = p.ctx, p.o
    cfg, st, dist = ctx.cfg, ctx.st, ctx.dist
    prompts = [o.data.train[i] for i in o.plan.rank_indices(step, dist.rank, cfg.seed)]
    batch = {k: v.to(dist.device) for k, v in collate_prompts(prompts, ctx.tokenizer.pad_token_id).items()}
    # Sampling is seeded by (seed, iteration, rank): a resumed run draws what an uninterrupted one would.
    torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.rank)
    how = Collecting(
        ctx.tokenizer,
        st,
        o.gen_config,
        stats=lambda raw: score_stats(st, raw, o.moments, o.rm_stats),
        **sampler_settings(ctx),
    )
    ro = collect(RolloutModels(o.actor, o.reward, o.critic, o.ref), prompts, batch, how)
    adv = advantages(ro, st, p.kl_ctl.value)
    out = {**rollout_metrics(ro, adv), "kl_coef": p.kl_ctl.value}
    t0 = time.perf_counter()
    out.update(ppo_update(o.actor, o.critic, ro, adv, st, step, cfg.seed, p.ptx))
    out.update(timing(ro, time.perf_counter() - t0, out))
    p.kl_ctl.update(out["kl"], int(out["rollout_sequences"]))
    if st.sample_every and (step + 1) % st.sample_every == 0 and dist.is_main:
        write_samples(ctx.run.stage_dir / "samples.jsonl", step + 1, ro, st.sample_rows)
    return out


def save_state(p: Parts, step: int) -> None:
    """Checkpoint both engines with the KL controller and the running moments (collective)."""
    client = {"step": step, "kl_controller": p.kl_ctl.state_dict(), "running_moments": p.o.moments.state_dict()}
    ckpt.save_checkpoint(
        {"actor": p.o.actor, "critic": p.o.critic}, p.ctx.run.checkpoints_dir, step, client, p.ctx.st.keep_last
    )


def load_state(p: Parts, client: dict | None) -> int:
    """Restore the KL controller and running moments from a checkpoint's client state; the step to start at."""
    if not client:
        return 0
    p.kl_ctl.load_state_dict(client["kl_controller"])
    p.o.moments.load_state_dict(client["running_moments"])
    return client["step"]


def build_critic(cfg: Any, run: Run, policy_source: str, tokenizer: Any, updates: int, dist: Any) -> tuple[Any, str]:
    """The value model: the reward model's weights (InstructGPT) or the policy's with a fresh scalar head, read at
    every token; its own AdamW (lr stage.critic.lr) in its own engine. With a reward function there is no reward
    model to start from, so `init=reward` falls back to the policy."""
    st = cfg.stage
    from_rm = st.critic.init == "reward" and st.reward.model and not st.reward.function
    source = run.resolve_source(st.critic.source or (st.reward.model if from_rm else policy_source))
    critic_cfg = OmegaConf.merge(cfg.model, {"name_or_path": source, "lora": {"enabled": False}})
    check_critic_tokenizer(critic_cfg, tokenizer)
    critic = load_reward_model(critic_cfg, source, tokenizer, seed=cfg.seed)
    if not pools_last_token(critic):
        raise UserError(
            f"critic {source}: a critic needs a decoder (a value at every token); encoders such as BERT "
            "cannot be one. Set stage.critic.init=policy or stage.critic.source"
        )
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(critic)
    return in_engine(cfg, critic, updates, dist.world_size, OmegaConf.merge(cfg.optim, {"lr": st.critic.lr})), source


def check_critic_tokenizer(critic_cfg: Any, tokenizer: Any) -> None:
    """The critic reads the policy's token ids, so it must share the policy's tokenizer."""
    if is_builtin(critic_cfg.name_or_path):
        return
    if not same_tokenizer(load_tokenizer(critic_cfg), tokenizer):
        raise UserError(
            f"critic {critic_cfg.name_or_path} has another tokenizer than the policy; a critic reads the "
            "policy's token ids. Set stage.critic.init=policy, or stage.critic.source to a model with "
            "the policy's tokenizer"
        )
