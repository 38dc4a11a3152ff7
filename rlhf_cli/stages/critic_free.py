"""`rlhf grpo`, `rlhf rloo`, `rlhf reinforce_pp`: critic-free online RL on plain DeepSpeed
(docs/algorithms.md sections 5 and 8). One module, three registry entries: the verbs differ only in their defaults
(configs/stage/<verb>.yaml) and `stage.advantage` picks the estimator (grpo | rloo | reinforce_pp |
reinforce_pp_baseline).

One step of the stage is one iteration: `rollout_batch_size` prompts x `n_samples` responses, the rows dealt evenly
over the ranks (rlhf_cli/rollout/critic_free.py); scored by the stage's reward source (model, classifier, or
weighted functions); advantages from the whole batch's scores; then `ppo_epochs` passes over this rank's rows in
shuffled mini-batches, one optimizer step each, with the clipped surrogate (separate low / high ranges), the
optional k3 KL loss (GRPO) and the chosen loss aggregation. With kl_coef = 0 no reference model is loaded. With one
pass in one mini-batch the old log-probs are not computed at all: the ratio is taken against the detached current
log-probs. The shared online parts (sampling, scoring, the actor step, evaluation) live in rlhf_cli/rollout/.
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
from rlhf_cli.config.batches import critic_free_rows, mini_batch
from rlhf_cli.config.compose import config_hash, to_yaml
from rlhf_cli.config.online import kl_in_loss
from rlhf_cli.data import build_prompt_datasets, collate_prompts
from rlhf_cli.metrics import Metrics
from rlhf_cli.models import load_tokenizer
from rlhf_cli.rollout.controllers import RunningMoments
from rlhf_cli.rollout.critic_free import Estimate, estimate
from rlhf_cli.rollout.evaluation import evaluate_policy
from rlhf_cli.rollout.experience import Reference, collect
from rlhf_cli.rollout.generation import sampling_config
from rlhf_cli.rollout.online import (
    build_reference,
    check_scorable,
    reward_stats,
    rollout_metrics,
    score_stats,
    timing,
    write_samples,
)
from rlhf_cli.rollout.rewards import build_gold, build_reward
from rlhf_cli.run_dir import Run
from rlhf_cli.stages.common import export_final, finish, interrupted, policy_engine, train_loop
from rlhf_cli.stages.critic_free_update import dynamic_rollout, update
from rlhf_cli.stages.plan import StepPlan, critic_free_plan, critic_free_updates, describe_critic_free

SHOW = ("score_mean", "policy_loss", "kl", "kl_loss", "zero_variance_groups", "lr", "tok/s", "eval_score", "eval_gold")


def run(cfg: Any, run: Run) -> Path | None:
    """Train the policy and export `<run>/<stage>/final/`; None when stopped early to resume."""
    st = cfg.stage
    # 1. Distributed group, seeds, the policy's starting checkpoint (the config's own rules: at composition,
    #    rlhf_cli/registry.py).
    dist = eng.init_distributed()
    torch.manual_seed(cfg.seed)
    source = run.resolve_source(cfg.model.name_or_path)
    model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": source})
    rm_stats = reward_stats(st, run)

    # 2. Tokenizer, prompts, the iteration plan, the gold metric.
    tokenizer = load_tokenizer(model_cfg)
    data = build_prompt_datasets(cfg.data, tokenizer, seed=cfg.seed)
    plan = critic_free_plan(len(data.train), st, dist.world_size)

    # 3. The policy in its engine; the reference only when a KL is used; the reward source.
    actor = policy_engine(cfg, model_cfg, tokenizer, critic_free_updates(plan, st, dist.world_size), dist.world_size)
    ref, ref_source = build_reference(cfg, run, source, tokenizer, dist) if st.kl_coef else (None, None)
    # Every rank scores at the same points (iterations, evaluation batches): a reward or gold function that raises on
    # one rank stops them all with its message (rewards.raise_together).
    reward = build_reward(st, run, cfg.deepspeed, tokenizer, dist, together=True)
    gold = build_gold(st.gold_reward, st, run, cfg.deepspeed, tokenizer, dist, together=True)
    gen_config = sampling_config(st.generation, tokenizer.eos_token_id, tokenizer.pad_token_id)
    p = Parts(cfg, run, dist, tokenizer, data, plan, actor, ref, reward, gen_config, RunningMoments(), rm_stats)

    # 4. Resume (policy, optimizer, scheduler, running moments); record the stage.
    resume, client, notes = ckpt.resume_latest(actor, run.checkpoints_dir)
    start_step = load_state(p, client)
    inputs = {"policy": source, "reference": ref.describe(ref_source) if ref else "none (stage.kl_coef=0)",
              "reward": reward.describe(), "data": cfg.data.source}  # fmt: skip
    started = run.begin(to_yaml(cfg), config_hash(cfg), inputs, resume)
    metrics = Metrics(run.metrics_path, plan.total_steps, cfg.logging, dist.is_main, start_step)
    sources = (f"{k}: {v}" for k, v in inputs.items())
    for line in (started, *notes, data.report.summary(), describe_critic_free(plan, st, dist.world_size), *sources):
        metrics.message(line)

    # 5. Train: an evaluation of the starting policy, then the iterations.
    def run_eval() -> dict[str, float]:
        return evaluate_policy(actor, reward, data.eval, tokenizer, st.generation, dist, cfg.seed, st.eval_batch_size,
                               sampling=st.eval_sampling, gold=gold, allow_invalid=True)  # fmt: skip

    if start_step == 0 and data.eval:
        first = run_eval()
        check_scorable(first.get("eval_invalid_fraction"), reward, "of the first evaluation")
        metrics.log(0, first, SHOW)
    last = train_loop(st, actor, plan, dist, run, metrics, start_step, lambda step: iteration(p, step), run_eval,
                      SHOW, save=lambda step: save_state(p, step))  # fmt: skip
    if interrupted(last, plan, metrics, run):
        return None

    # 6. Final evaluation, export of the policy (final/), headline metrics.
    finish(run, metrics, last, run_eval(), SHOW, export_final(actor, tokenizer, run, cfg.model.lora), st,
           extra={"iterations": plan.total_steps, "advantage": st.advantage, "data": data.report.to_dict()})
    return run.final_dir


@dataclass
class Parts:
    """What an iteration reads and updates (the running moments are checkpointed with the engine)."""

    cfg: Any
    run: Run
    dist: Any
    tokenizer: Any
    data: Any
    plan: StepPlan
    actor: Any
    ref: Reference | None
    reward: Any
    gen_config: Any
    moments: RunningMoments
    rm_stats: tuple[float, float] | None


def needs_old_logprobs(st: Any, world_size: int) -> bool:
    """The rollout policy's log-probs are needed for a ratio after the first optimizer step (several epochs or
    mini-batches) and for a KL in the reward (rloo, reinforce_pp); else the ratio is 1 by construction."""
    several = st.ppo_epochs > 1 or critic_free_rows(st, world_size) > mini_batch(st)
    return several or (not kl_in_loss(st) and st.kl_coef > 0)


def iteration(p: Parts, step: int) -> dict[str, float]:
    """One iteration (0-based `step`): this rank's rows of the iteration's prompts x n_samples, scored; the
    estimator's advantages over the whole batch; the update; every `sample_every`, sample rows."""
    cfg, st, dist = p.cfg, p.cfg.stage, p.dist
    rows_per_rank = critic_free_rows(st, dist.world_size)
    old = needs_old_logprobs(st, dist.world_size)

    def draw(prompt_idx: list[int], attempt: int) -> Any:
        """Rows [rank x M, (rank + 1) x M) of `prompt_idx` x n_samples, sampled and scored."""
        rows = [i for i in prompt_idx for _ in range(st.n_samples)]
        mine = rows[dist.rank * (len(rows) // dist.world_size) :][: len(rows) // dist.world_size]
        prompts = [p.data.train[i] for i in mine]
        batch = {k: v.to(dist.device) for k, v in collate_prompts(prompts, p.tokenizer.pad_token_id).items()}
        # Seeded by (seed, iteration, attempt, rank): a resumed run draws what an uninterrupted one would.
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + attempt * 101 + dist.rank)
        return collect(p.actor, None, p.ref, p.reward, prompts, batch, p.tokenizer, st, p.gen_config,
                       stats=lambda raw: score_stats(st, raw, p.moments, p.rm_stats), allow_invalid=True,
                       old_logprobs=old)  # fmt: skip

    prompt_idx = p.plan.rank_indices(step, 0, cfg.seed)
    if st.dynamic_sampling:
        ro, sampling, filler = dynamic_rollout(draw, prompt_idx, p.plan, step, cfg.seed, st, p.tokenizer.pad_token_id)
    else:
        ro, sampling, filler = draw(prompt_idx, 0), {}, None
    out = {"invalid_fraction": 0.0, **rollout_metrics(ro)}  # all-reduced: every rank stops here together
    check_scorable(out["invalid_fraction"], p.reward, f"of iteration {step + 1}")
    est: Estimate = estimate(ro, st, dist.rank * rows_per_rank, filler)
    out.update({**est.stats, **sampling, **reward_terms(p.reward)})
    t0 = time.perf_counter()
    out.update(update(p.actor, ro, est, st, step, cfg.seed))
    out.update(timing(ro, time.perf_counter() - t0, out))
    if st.sample_every and (step + 1) % st.sample_every == 0 and dist.is_main:
        write_samples(p.run.stage_dir / "samples.jsonl", step + 1, ro, st.sample_rows)
    return out


def reward_terms(reward: Any) -> dict[str, float]:
    """The mean of each weighted reward function over the batch (all ranks), as reward/<function>."""
    terms = getattr(reward, "last_terms", None)
    if not terms:
        return {}
    means = eng.all_reduce_sum(torch.stack([torch.stack([v.nansum(), torch.isfinite(v).sum()]) for v in
                                            terms.values()]).double())  # fmt: skip
    return {f"reward/{name}": float(s / max(float(c), 1.0)) for name, (s, c) in zip(terms, means.tolist(),
                                                                                    strict=True)}  # fmt: skip


def save_state(p: Parts, step: int) -> None:
    """Checkpoint the policy engine with the running moments (collective)."""
    client = {"step": step, "running_moments": p.moments.state_dict()}
    ckpt.save_checkpoint(p.actor, p.run.checkpoints_dir, step, client, p.cfg.stage.keep_last)


def load_state(p: Parts, client: dict | None) -> int:
    if not client:
        return 0
    if "running_moments" in client:
        p.moments.load_state_dict(client["running_moments"])
    return client["step"]
