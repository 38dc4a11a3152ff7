"""The parts PPO and the critic-free stages (GRPO / RLOO / REINFORCE++) build alike, built by one function
(`online_parts`): the prompts and the iteration plan, the policy engine (and PPO's critic), the frozen reference, the
reward and gold sources, the sampling config, the running moments and the reward statistics; and the evaluation of the
starting policy both log before their first iteration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_cli import checkpoints as ckpt
from rlhf_cli.data import build_prompt_datasets
from rlhf_cli.rollout.controllers import RunningMoments
from rlhf_cli.rollout.evaluation import PolicyEval, evaluate_policy
from rlhf_cli.rollout.experience import Reference
from rlhf_cli.rollout.generation import sampling_config
from rlhf_cli.rollout.online import build_reference, reward_stats
from rlhf_cli.rollout.rewards import build_gold, build_reward
from rlhf_cli.stages.common import policy_engine
from rlhf_cli.stages.context import Begun, StageContext
from rlhf_cli.stages.plan import StepPlan


@dataclass(frozen=True)
class OnlineParts:
    """What an online stage's iterations read (the running moments are updated in place and checkpointed with the
    engines). `critic` / `ref` None where the stage has none (the critic-free stages; kl_coef = 0)."""

    data: Any
    plan: StepPlan
    actor: Any
    critic: Any | None
    critic_source: str | None
    ref: Reference | None
    ref_source: str | None
    reward: Any
    gold: Any
    gen_config: Any
    moments: RunningMoments
    rm_stats: tuple[float, float] | None

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        """The stage's inputs for the manifest and the log: policy, reference, critic (PPO), reward, data."""
        ref = self.ref.describe(self.ref_source) if self.ref is not None else "none (stage.kl_coef=0)"
        critic = {"critic": self.critic_source} if self.critic is not None else {}
        return {
            "policy": ctx.source,
            "reference": ref,
            **critic,
            "reward": self.reward.describe(),
            "data": ctx.cfg.data.source,
        }

    def evaluate(self, ctx: StageContext, allow_invalid: bool = False) -> dict[str, float]:
        """The policy's held-out evaluation (`evaluate_policy` with the stage's settings and gold metric)."""
        how = PolicyEval.of_stage(ctx, gold=self.gold, allow_invalid=allow_invalid)
        return evaluate_policy(self.actor, self.reward, self.data.eval, how)


def online_parts(
    ctx: StageContext,
    plan_of: Callable[[int], StepPlan],
    updates_of: Callable[[StepPlan], int],
    critic: Callable[[int], tuple[Any, str]] | None = None,
    reference: bool = True,
) -> OnlineParts:
    """The recorded reward statistics (rm_stats; refused before any model loads where none describe the scores), the
    prompts, the plan (`plan_of(n_prompts)`), the policy engine with its schedule over `updates_of(plan)` optimizer
    steps, `critic(updates)` -> (engine, source) when given, the reference (`reference`), the reward and gold sources
    (every rank scores at the same points: a function that fails on one rank stops them all with its message,
    rewards.raise_together), the sampling config. Models are built in that order (LoRA's initialisation draws from
    the global RNG)."""
    cfg, run, dist, tokenizer = ctx.cfg, ctx.run, ctx.dist, ctx.tokenizer
    st = cfg.stage
    rm_stats = reward_stats(st, run)
    data = build_prompt_datasets(cfg.data, tokenizer, seed=cfg.seed)
    plan = plan_of(len(data.train))
    updates = updates_of(plan)
    actor = policy_engine(cfg, ctx.model_cfg, tokenizer, updates, dist.world_size)
    critic_engine, critic_source = critic(updates) if critic is not None else (None, None)
    ref, ref_source = build_reference(cfg, run, ctx.source, tokenizer, dist) if reference else (None, None)
    reward = build_reward(st, run, cfg.deepspeed, tokenizer, dist, together=True)
    gold = build_gold(st.gold_reward, st, run, cfg.deepspeed, tokenizer, dist, together=True)
    gen_config = sampling_config(st.generation, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return OnlineParts(
        data,
        plan,
        actor,
        critic_engine,
        critic_source,
        ref,
        ref_source,
        reward,
        gold,
        gen_config,
        RunningMoments(),
        rm_stats,
    )


def sampler_settings(ctx: StageContext) -> dict[str, Any]:
    """`Collecting`'s engine fields: the stage's rollout engine and, for a sampler that is not the trainer, the
    importance-weight correction and its cap (cfg.rollout)."""
    r = ctx.cfg.rollout
    return {"engine": ctx.rollout, "correction": r.correction, "correction_cap": r.correction_cap}


def log_first_evaluation(
    begun: Begun,
    evaluate: Callable[[], dict[str, float]],
    show: tuple[str, ...],
    check: Callable[[dict[str, float]], None] | None = None,
) -> None:
    """A fresh start (step 0) with held-out prompts: the starting policy's evaluation, `check`ed, logged at step 0."""
    if begun.start_step != 0:
        return
    first = evaluate()
    if not first:
        return
    if check is not None:
        check(first)
    begun.metrics.log(0, first, show)


def save_state(ctx: Any, p: Any, step: int) -> None:
    """Checkpoint the trained engine `p.actor` with the running moments `p.moments` (collective): the critic-free
    stages and distillation."""
    client = {"step": step, "running_moments": p.moments.state_dict()}
    ckpt.save_checkpoint(p.actor, ctx.run.checkpoints_dir, step, client, ctx.st.keep_last)


def load_state(p: Any, client: dict | None) -> int:
    """Restore what `save_state` saved beside the engine; the step to resume from (0: none)."""
    if not client:
        return 0
    if "running_moments" in client:
        p.moments.load_state_dict(client["running_moments"])
    return client["step"]
