"""`rlhf grpo`, `rlhf rloo`, `rlhf reinforce_pp`: critic-free online RL on plain DeepSpeed
(docs/algorithms.md sections 5 and 8). One module, three registry entries: the verbs differ only in their defaults
(configs/stage/<verb>.yaml) and `stage.advantage` picks the estimator (grpo | rloo | reinforce_pp |
reinforce_pp_baseline).

One step of the stage is one iteration: `rollout_batch_size` prompts x `n_samples` responses, the rows dealt evenly
over the ranks (rlhf_cli/rollout/critic_free.py); scored by the stage's reward source (model, classifier, or
weighted functions); advantages from the whole batch's scores; then `ppo_epochs` passes over this rank's rows in
shuffled mini-batches, one optimizer step each, with the surrogate of `stage.policy_loss` (clip, gspo, cispo;
separate low / high ranges), the optional k3 KL loss (GRPO) and the chosen loss aggregation. With kl_coef = 0 no
reference model is loaded. With one pass in one mini-batch the old log-probs are not computed at all: the ratio is
taken against the detached current log-probs. The shared online parts (sampling, scoring, the actor step,
evaluation) live in rlhf_cli/rollout/.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.config.batches import critic_free_rows, mini_batch
from rlhf_cli.config.online import kl_in_loss
from rlhf_cli.data import collate_prompts
from rlhf_cli.rollout.critic_free import Estimate, estimate
from rlhf_cli.rollout.experience import Collecting, RolloutModels, collect
from rlhf_cli.rollout.online import check_scorable, rollout_metrics, score_stats, timing, write_samples
from rlhf_cli.run_dir import Run
from rlhf_cli.stages.common import Finale, Loop, export_final
from rlhf_cli.stages.context import StageContext, begin, source_lines, stage_context, train_then_finish
from rlhf_cli.stages.critic_free_update import dynamic_rollout, update
from rlhf_cli.stages.online import (
    OnlineParts,
    load_state,
    log_first_evaluation,
    online_parts,
    sampler_settings,
    save_state,
)
from rlhf_cli.stages.plan import critic_free_plan, critic_free_updates, describe_critic_free

SHOW = ("score_mean", "policy_loss", "kl", "kl_loss", "zero_variance_groups", "lr", "tok/s", "eval_score", "eval_gold")


def run(cfg: Any, run: Run) -> Path | None:
    """Train the policy and export `<run>/<stage>/final/`; None when stopped early to resume."""
    st = cfg.stage
    # 1. Distributed group, seed, the policy's starting checkpoint and its tokenizer (the config's own rules: at
    #    composition, rlhf_cli/registry.py).
    ctx = stage_context(cfg, run)
    world = ctx.dist.world_size

    # 2. Prompts, the iteration plan, the policy in its engine; the reference only when a KL is used; the reward and
    #    gold sources (stages/online.py).
    o = online_parts(
        ctx,
        lambda n: critic_free_plan(n, st, world),
        lambda plan: critic_free_updates(plan, st, world),
        reference=bool(st.kl_coef),
    )

    # 3. Resume (policy, optimizer, scheduler, running moments); record the stage.
    inputs = o.inputs(ctx)
    begun = begin(
        ctx,
        o.actor,
        o.plan.total_steps,
        inputs,
        (o.data.report.summary(), describe_critic_free(o.plan, st, world), *source_lines(inputs)),
        restore=lambda client: load_state(o, client),
    )

    # 4. Train: an evaluation of the starting policy, then the iterations (rollout, estimator, update).
    def run_eval() -> dict[str, float]:
        return o.evaluate(ctx, allow_invalid=True)

    def check(first: dict[str, float]) -> None:
        check_scorable(first.get("eval_invalid_fraction"), o.reward, "of the first evaluation")

    log_first_evaluation(begun, run_eval, SHOW, check)
    loop = Loop(lambda step: iteration(ctx, o, step), run_eval, SHOW, save=lambda step: save_state(ctx, o, step))

    # 5. Final evaluation, export of the policy (final/), headline metrics.
    extra = {"iterations": o.plan.total_steps, "advantage": st.advantage, "data": o.data.report.to_dict()}
    finale = Finale(export_final(ctx, o.actor), extra=extra)
    return train_then_finish(ctx, o.actor, o.plan, begun, loop, finale)


def needs_old_logprobs(st: Any, world_size: int) -> bool:
    """The rollout policy's log-probs are needed for a ratio after the first optimizer step (several epochs or
    mini-batches) and for a KL in the reward (rloo, reinforce_pp); else the ratio is 1 by construction."""
    several = st.ppo_epochs > 1 or critic_free_rows(st, world_size) > mini_batch(st)
    return several or (not kl_in_loss(st) and st.kl_coef > 0)


def iteration(ctx: StageContext, p: OnlineParts, step: int) -> dict[str, float]:
    """One iteration (0-based `step`): this rank's rows of the iteration's prompts x n_samples, scored; the
    estimator's advantages over the whole batch; the update; every `sample_every`, sample rows."""
    cfg, st, dist = ctx.cfg, ctx.cfg.stage, ctx.dist
    rows_per_rank = critic_free_rows(st, dist.world_size)
    old = needs_old_logprobs(st, dist.world_size)

    def draw(prompt_idx: list[int], attempt: int) -> Any:
        """Rows [rank x M, (rank + 1) x M) of `prompt_idx` x n_samples, sampled and scored."""
        rows = [i for i in prompt_idx for _ in range(st.n_samples)]
        mine = rows[dist.rank * (len(rows) // dist.world_size) :][: len(rows) // dist.world_size]
        prompts = [p.data.train[i] for i in mine]
        batch = {k: v.to(dist.device) for k, v in collate_prompts(prompts, ctx.tokenizer.pad_token_id).items()}
        # Seeded by (seed, iteration, attempt, rank): a resumed run draws what an uninterrupted one would.
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + attempt * 101 + dist.rank)
        how = Collecting(
            ctx.tokenizer,
            st,
            p.gen_config,
            stats=lambda raw: score_stats(st, raw, p.moments, p.rm_stats),
            allow_invalid=True,
            old_logprobs=old,
            **sampler_settings(ctx),
        )
        return collect(RolloutModels(p.actor, p.reward, ref=p.ref), prompts, batch, how)

    prompt_idx = p.plan.rank_indices(step, 0, cfg.seed)
    if st.dynamic_sampling:
        ro, sampling, filler = dynamic_rollout(draw, prompt_idx, p.plan, step, cfg.seed, st, ctx.tokenizer.pad_token_id)
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
        write_samples(ctx.run.stage_dir / "samples.jsonl", step + 1, ro, st.sample_rows)
    return out


def reward_terms(reward: Any) -> dict[str, float]:
    """The mean of each weighted reward function over the batch (all ranks), as reward/<function>."""
    terms = getattr(reward, "last_terms", None)
    if not terms:
        return {}
    means = eng.all_reduce_sum(
        torch.stack([torch.stack([v.nansum(), torch.isfinite(v).sum()]) for v in terms.values()]).double()
    )
    return {f"reward/{name}": float(s / max(float(c), 1.0)) for name, (s, c) in zip(terms, means.tolist(), strict=True)}
