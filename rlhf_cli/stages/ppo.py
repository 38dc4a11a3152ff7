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
from rlhf_cli.config.compose import config_hash, to_yaml
from rlhf_cli.data import build_prompt_datasets, collate_prompts
from rlhf_cli.errors import UserError
from rlhf_cli.metrics import Metrics
from rlhf_cli.models import enable_gradient_checkpointing, is_builtin, load_tokenizer
from rlhf_cli.models.reward import load_reward_model, pools_last_token
from rlhf_cli.rollout.controllers import KLController, RunningMoments, kl_controller
from rlhf_cli.rollout.evaluation import evaluate_policy
from rlhf_cli.rollout.experience import Reference, advantages, collect
from rlhf_cli.rollout.generation import sampling_config
from rlhf_cli.rollout.online import build_reference, reward_stats, rollout_metrics, score_stats, timing, write_samples
from rlhf_cli.rollout.rewards import build_gold, build_reward, same_tokenizer
from rlhf_cli.run_dir import Run
from rlhf_cli.stages.common import finish, interrupted, policy_engine, train_loop
from rlhf_cli.stages.plan import StepPlan, describe_plan, iteration_plan, ppo_updates
from rlhf_cli.stages.ppo_update import PtxData, ppo_update

SHOW = ("score_mean", "kl", "policy_loss", "value_loss", "lr", "tok/s", "eval_score", "eval_gold")


def run(cfg: Any, run: Run) -> Path | None:
    """Train the policy and export `<run>/ppo/final/` (and the critic in `<run>/ppo/critic/`)."""
    st = cfg.stage
    # 1. Distributed group, seeds, the policy's starting checkpoint; the recorded reward statistics (rm_stats).
    dist = eng.init_distributed()
    torch.manual_seed(cfg.seed)
    source = run.resolve_source(cfg.model.name_or_path)
    model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": source})
    rm_stats = reward_stats(st, run)

    # 2. Tokenizer, prompts, the iteration plan, optional ptx data.
    tokenizer = load_tokenizer(model_cfg)
    data = build_prompt_datasets(cfg.data, tokenizer, seed=cfg.seed)
    plan = iteration_plan(len(data.train), st, dist.world_size)
    ptx = PtxData(st, tokenizer, cfg.seed, dist) if st.ptx.coef > 0 else None

    # 3. Actor and critic in DeepSpeed engines; frozen reference and reward source; KL controller, running moments.
    updates = ppo_updates(plan, st)
    actor = policy_engine(cfg, model_cfg, tokenizer, updates, dist.world_size)
    critic, critic_source = build_critic(cfg, run, source, tokenizer, updates, dist)
    ref, ref_source = build_reference(cfg, run, source, tokenizer, dist)
    # Every rank scores at the same points: a reward or gold function that fails on one rank stops them all with its
    # message (rewards.raise_together).
    reward = build_reward(st, run, cfg.deepspeed, tokenizer, dist, together=True)
    gold = build_gold(st.gold_reward, st, run, cfg.deepspeed, tokenizer, dist, together=True)
    gen_config = sampling_config(st.generation, tokenizer.eos_token_id, tokenizer.pad_token_id)
    kl_ctl = kl_controller(st.kl_control, st.kl_coef, st.kl_target, st.kl_horizon)
    p = Parts(cfg, run, dist, tokenizer, data, plan, actor, critic, ref, reward, ptx, gen_config, kl_ctl,
              RunningMoments(), rm_stats)  # fmt: skip

    # 4. Resume (actor, critic, optimizers, schedulers, KL controller, running moments); record the stage.
    resume, client, notes = ckpt.resume_latest({"actor": actor, "critic": critic}, run.checkpoints_dir)
    start_step = load_state(p, client)
    inputs = {"policy": source, "reference": ref.describe(ref_source), "critic": critic_source,
              "reward": reward.describe(), "data": cfg.data.source}  # fmt: skip
    started = run.begin(to_yaml(cfg), config_hash(cfg), inputs, resume)
    metrics = Metrics(run.metrics_path, plan.total_steps, cfg.logging, dist.is_main, start_step)
    sources = (f"{k}: {v}" for k, v in inputs.items())
    for line in (started, *notes, data.report.summary(), describe_plan(plan, st), *sources):
        metrics.message(line)

    # 5. Train: an evaluation of the starting policy, then the iterations.
    def run_eval() -> dict[str, float]:
        return evaluate(actor, reward, data.eval, tokenizer, st, dist, cfg.seed, gold)

    if start_step == 0 and data.eval:
        metrics.log(0, run_eval(), SHOW)
    last = train_loop(st, actor, plan, dist, run, metrics, start_step, lambda step: iteration(p, step), run_eval,
                      SHOW, save=lambda step: save_state(p, step))  # fmt: skip
    if interrupted(last, plan, metrics, run):
        return None

    # 6. Final evaluation, export of the policy (final/) and the critic (critic/), headline metrics.
    def export() -> None:
        eng.export_hf(actor, tokenizer, run.final_dir, merge_lora=cfg.model.lora.enabled and cfg.model.lora.merge)
        eng.export_hf(critic, tokenizer, run.stage_dir / "critic", merge_lora=False)

    finish(run, metrics, last, run_eval(), SHOW, export, st, outputs={"critic": f"{run.stage}/critic"},
           extra={"iterations": plan.total_steps, "kl_coef": kl_ctl.value, "data": data.report.to_dict()})  # fmt: skip
    return run.final_dir


@dataclass
class Parts:
    """What an iteration reads and updates: the models, the data and its plan, the KL controller and running
    moments (both checkpointed with the engines)."""

    cfg: Any
    run: Run
    dist: Any
    tokenizer: Any
    data: Any
    plan: StepPlan
    actor: Any
    critic: Any
    ref: Reference
    reward: Any
    ptx: PtxData | None
    gen_config: Any
    kl_ctl: KLController
    moments: RunningMoments
    rm_stats: tuple[float, float] | None


def iteration(p: Parts, step: int) -> dict[str, float]:
    """One PPO iteration (0-based `step`): a rollout of this rank's prompts, scores shaped with the reward
    statistics, KL-in-reward advantages, the update; then the KL controller and, every `sample_every`, sample rows."""
    cfg, st, dist = p.cfg, p.cfg.stage, p.dist
    prompts = [p.data.train[i] for i in p.plan.rank_indices(step, dist.rank, cfg.seed)]
    batch = {k: v.to(dist.device) for k, v in collate_prompts(prompts, p.tokenizer.pad_token_id).items()}
    # Sampling is seeded by (seed, iteration, rank): a resumed run draws what an uninterrupted one would.
    torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.rank)
    ro = collect(p.actor, p.critic, p.ref, p.reward, prompts, batch, p.tokenizer, st, p.gen_config,
                 stats=lambda raw: score_stats(st, raw, p.moments, p.rm_stats))  # fmt: skip
    adv = advantages(ro, st, p.kl_ctl.value)
    out = {**rollout_metrics(ro, adv), "kl_coef": p.kl_ctl.value}
    t0 = time.perf_counter()
    out.update(ppo_update(p.actor, p.critic, ro, adv, st, step, cfg.seed, p.ptx))
    out.update(timing(ro, time.perf_counter() - t0, out))
    p.kl_ctl.update(out["kl"], int(out["rollout_sequences"]))
    if st.sample_every and (step + 1) % st.sample_every == 0 and dist.is_main:
        write_samples(p.run.stage_dir / "samples.jsonl", step + 1, ro, st.sample_rows)
    return out


def save_state(p: Parts, step: int) -> None:
    """Checkpoint both engines with the KL controller and the running moments (collective)."""
    client = {"step": step, "kl_controller": p.kl_ctl.state_dict(), "running_moments": p.moments.state_dict()}
    ckpt.save_checkpoint({"actor": p.actor, "critic": p.critic}, p.run.checkpoints_dir, step, client,
                         p.cfg.stage.keep_last)  # fmt: skip


def load_state(p: Parts, client: dict | None) -> int:
    """Restore the KL controller and running moments from a checkpoint's client state; the step to start at."""
    if not client:
        return 0
    p.kl_ctl.load_state_dict(client["kl_controller"])
    p.moments.load_state_dict(client["running_moments"])
    return client["step"]


def evaluate(actor: Any, reward: Any, examples: list, tokenizer: Any, st: Any, dist: Any, seed: int,
             gold: Any = None) -> dict:  # fmt: skip
    """PPO's held-out evaluation: `evaluate_policy` with the stage's generation settings, `eval_batch_size` and
    `eval_sampling` (greedy unless set), and the gold metric `gold` (loaded from `stage.gold_reward`) when set."""
    return evaluate_policy(actor, reward, examples, tokenizer, st.generation, dist, seed, st.eval_batch_size,
                           sampling=st.eval_sampling, gold=gold)  # fmt: skip


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
        raise UserError(f"critic {source}: a critic needs a decoder (a value at every token); encoders such as BERT "
                        "cannot be one. Set stage.critic.init=policy or stage.critic.source")  # fmt: skip
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(critic)
    optim = OmegaConf.merge(cfg.optim, {"lr": st.critic.lr})
    ds_cfg = eng.ds_config(cfg.deepspeed, optim, st.micro_batch_size, st.gradient_accumulation_steps,
                           dist.world_size)  # fmt: skip
    return eng.initialize(critic, ds_cfg, optim, updates), source


def check_critic_tokenizer(critic_cfg: Any, tokenizer: Any) -> None:
    """The critic reads the policy's token ids, so it must share the policy's tokenizer."""
    if is_builtin(critic_cfg.name_or_path):
        return
    if not same_tokenizer(load_tokenizer(critic_cfg), tokenizer):
        raise UserError(f"critic {critic_cfg.name_or_path} has another tokenizer than the policy; a critic reads the "
                        "policy's token ids. Set stage.critic.init=policy, or stage.critic.source to a model with "
                        "the policy's tokenizer")  # fmt: skip
