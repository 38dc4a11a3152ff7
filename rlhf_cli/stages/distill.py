"""`rlhf distill`: on-policy distillation on plain DeepSpeed (docs/algorithms.md section 13). The student (the trained
policy, usually this run's sft) samples; a frozen teacher (`stage.teacher`: a stage of this run, a folder or a hub
id) reads the student's own samples; the student minimises its divergence from the teacher at those positions.

One step is one iteration: `rollout_batch_size` prompts x `n_samples` responses, dealt evenly over the ranks; the
student's and the teacher's log-probs of the sampled tokens (the teacher is a frozen scorer like PPO's reference);
then `ppo_epochs` passes in mini-batches. `stage.estimator` picks the loss: `sampled` (the sampled token's
l_s - l_t as a negative per-token advantage, through the shared actor step), `full` (the reverse KL over the
vocabulary, or the student's top-k and a tail bucket) or `jsd` (GKD's generalised JSD), both through the update in
stages/distill_update.py with a teacher forward per micro-batch. An optional reward (`stage.reward`) adds its score
advantage, the divergence weighted by `stage.kl_to_teacher_coef`.

The teacher's tokenizer must be the student's: compared from the tokenizer files before any weights load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rlhf_cli import engine as eng
from rlhf_cli.config.batches import mini_batch
from rlhf_cli.config.distill import distill_rows, has_reward
from rlhf_cli.data import build_prompt_datasets, collate_prompts
from rlhf_cli.rollout.controllers import RunningMoments
from rlhf_cli.rollout.experience import Collecting, RolloutModels, collect
from rlhf_cli.rollout.generation import response_logits, response_logprobs, sampling_config
from rlhf_cli.rollout.online import check_scorable, reward_stats, rollout_metrics, score_stats, write_samples
from rlhf_cli.rollout.rewards import build_gold, build_reward
from rlhf_cli.run_dir import Run
from rlhf_cli.stages.common import Finale, Loop, export_final, policy_engine
from rlhf_cli.stages.context import StageContext, begin, source_lines, stage_context, train_then_finish
from rlhf_cli.stages.distill_update import Evaluation, check_tokenizers, score_advantages, teacher_sums, update
from rlhf_cli.stages.online import load_state, log_first_evaluation, sampler_settings, save_state
from rlhf_cli.stages.plan import StepPlan, critic_free_plan

SHOW = ("kl_teacher_token", "loss", "response_length", "lr", "tok/s", "eval_gold", "eval_teacher_agreement")


def run(cfg: Any, run: Run) -> Path | None:
    """Train the student and export `<run>/<stage>/final/`; None when stopped early to resume."""
    st = cfg.stage
    # 1. Distributed group, seed, the student's starting checkpoint and its tokenizer; the teacher's tokenizer
    #    compared with it (and the teacher checked to be a causal LM) before any weights load.
    ctx = stage_context(cfg, run, check=lambda source: check_tokenizers(cfg, run, source))

    # 2. Prompts, the iteration plan, the student in its engine, the frozen teacher, the optional reward, the gold.
    p = distill_parts(ctx)

    # 3. Resume (student, optimizer, scheduler, running moments); record the stage with its teacher.
    inputs = p.inputs(ctx)
    begun = begin(
        ctx,
        p.actor,
        p.plan.total_steps,
        inputs,
        (p.data.report.summary(), describe(p.plan, st, ctx.dist.world_size), *source_lines(inputs)),
        restore=lambda client: load_state(p, client),
    )

    # 4. Train: the starting student's evaluation (and, once, the teacher's greedy answers that agreement is measured
    #    against), then the iterations (student samples, teacher scores, update).
    evaluation = Evaluation(ctx, p)

    def check(first: dict[str, float]) -> None:
        if p.scored:
            check_scorable(first.get("eval_invalid_fraction"), p.reward, "of the first evaluation")

    log_first_evaluation(begun, evaluation, SHOW, check)
    loop = Loop(lambda step: iteration(ctx, p, step), evaluation, SHOW, save=lambda step: save_state(ctx, p, step))

    # 5. Final evaluation, export of the student (final/), headline metrics (with the teacher's own evaluation).
    def extra() -> dict[str, Any]:
        return {"iterations": p.plan.total_steps, "estimator": st.estimator, **evaluation.teacher_metrics}

    finale = Finale(export_final(ctx, p.actor), extra=extra)
    return train_then_finish(ctx, p.actor, p.plan, begun, loop, finale)


class NoReward:
    """The reward of pure distillation: none. `collect` and `evaluate_policy` score every response; this scores 0,
    and the stage leaves the score out of its metrics and its loss."""

    def score(self, prompts: list, seq: Any, texts: list[str], allow_invalid: bool = False) -> torch.Tensor:
        return torch.zeros(len(texts))

    def describe(self) -> str:
        return "none (pure distillation)"


class Teacher:
    """The frozen teacher: eval mode, no dropout, no gradients; ZeRO-3-partitioned under zero_stage=3; on the CPU
    between uses with `stage.offload_frozen`."""

    def __init__(self, model: Any, offload: bool, device: torch.device):
        self.model, self.offload, self.device = model, offload, device

    @torch.no_grad()
    def logits(self, seq: Any) -> torch.Tensor:
        """The teacher's logits that predict the response tokens: (B, R, V) (rollout/generation.py)."""
        with eng.on_device(self.model, self.device, self.offload) as model:
            return response_logits(model, seq)

    @torch.no_grad()
    def logprobs(self, seq: Any, temperature: float) -> torch.Tensor:
        """log t(y_t) of the response tokens at `temperature`: (B, R), 0 after the end."""
        return response_logprobs(self.logits(seq), seq, temperature)


@dataclass(frozen=True)
class DistillParts:
    """What the iterations read: prompts, plan, the student engine (`actor`), the teacher, the reward (`NoReward`
    without one: `scored` False), the gold metric, the sampling config, the running moments and reward statistics."""

    data: Any
    plan: StepPlan
    actor: Any
    teacher: Teacher
    teacher_source: str
    reward: Any
    scored: bool
    gold: Any
    gen_config: Any
    moments: RunningMoments
    rm_stats: tuple[float, float] | None

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        """The stage's inputs for the manifest and the log: student, teacher, reward, data."""
        return {
            "policy": ctx.source,
            "teacher": f"frozen {self.teacher_source} (stage.teacher={ctx.st.teacher})",
            "reward": self.reward.describe(),
            "data": ctx.cfg.data.source,
        }


def distill_parts(ctx: StageContext) -> DistillParts:
    """The recorded reward statistics (refused before any model loads where none describe the scores), the prompts,
    the plan, the student engine with its schedule, the teacher, the reward (when one is mixed in) and the gold;
    built in that order (LoRA's initialisation draws from the global RNG)."""
    from rlhf_cli.models import disable_dropout, load_causal_lm

    cfg, run, dist, tokenizer = ctx.cfg, ctx.run, ctx.dist, ctx.tokenizer
    st = cfg.stage
    rm_stats = reward_stats(st, run) if has_reward(st) else None
    data = build_prompt_datasets(cfg.data, tokenizer, seed=cfg.seed)
    plan = critic_free_plan(len(data.train), st, dist.world_size)
    updates = plan.total_steps * st.ppo_epochs * (distill_rows(st, dist.world_size) // mini_batch(st))
    actor = policy_engine(cfg, ctx.model_cfg, tokenizer, updates, dist.world_size)
    source = run.resolve_source(st.teacher)
    model = load_causal_lm(OmegaConf.merge(cfg.model, {"name_or_path": source}), tokenizer, seed=cfg.seed)
    disable_dropout(model)
    home = torch.device("cpu") if st.offload_frozen else dist.device
    teacher = Teacher(eng.frozen(model, cfg.deepspeed, st.micro_batch_size, home), st.offload_frozen, dist.device)
    scored = has_reward(st)
    reward = build_reward(st, run, cfg.deepspeed, tokenizer, dist, together=True) if scored else NoReward()
    gold = build_gold(st.gold_reward, st, run, cfg.deepspeed, tokenizer, dist, together=True)
    gen_config = sampling_config(st.generation, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return DistillParts(
        data, plan, actor, teacher, source, reward, scored, gold, gen_config, RunningMoments(), rm_stats
    )


def describe(plan: StepPlan, st: Any, world_size: int) -> str:
    rows = distill_rows(st, world_size)
    top = f", top-{st.top_k} and a tail bucket" if st.top_k and st.estimator == "full" else ""
    beta = f" (beta {st.jsd_beta})" if st.estimator == "jsd" else ""
    return (
        f"{plan.n_examples} prompts, {st.rollout_batch_size} per iteration x {st.n_samples} samples ({rows} rows per "
        f"rank on {world_size} rank(s)); {plan.total_steps} iterations of {st.ppo_epochs} epoch(s) x "
        f"{rows // mini_batch(st)} mini-batch(es) of {mini_batch(st)} rows per rank; estimator {st.estimator}{top}"
        f"{beta}, x {st.kl_to_teacher_coef}"
    )


def iteration(ctx: StageContext, p: DistillParts, step: int) -> dict[str, float]:
    """One iteration (0-based `step`): this rank's rows of the iteration's prompts x n_samples, sampled by the
    student; the teacher's log-probs of them; the score advantages when a reward is mixed in; the update; every
    `sample_every`, sample rows."""
    cfg, st, dist = ctx.cfg, ctx.cfg.stage, ctx.dist
    rows = [i for i in p.plan.rank_indices(step, 0, cfg.seed) for _ in range(st.n_samples)]
    per_rank = len(rows) // dist.world_size
    prompts = [p.data.train[i] for i in rows[dist.rank * per_rank :][:per_rank]]
    batch = {k: v.to(dist.device) for k, v in collate_prompts(prompts, ctx.tokenizer.pad_token_id).items()}
    # Seeded by (seed, iteration, rank): a resumed run draws what an uninterrupted one would.
    torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.rank)
    how = Collecting(
        ctx.tokenizer,
        st,
        p.gen_config,
        stats=lambda raw: score_stats(st, raw, p.moments, p.rm_stats),
        allow_invalid=True,
        **sampler_settings(ctx),
    )
    ro = collect(RolloutModels(p.actor, p.reward), prompts, batch, how)
    t0 = time.perf_counter()
    tau = st.generation.temperature
    ro.ref_logprobs = torch.cat(
        [
            p.teacher.logprobs(ro.seq.rows(c, trim=False), tau)
            for c in torch.arange(len(prompts)).split(st.micro_batch_size)
        ]
    )
    ro.seconds["teacher"] = time.perf_counter() - t0
    out = {"invalid_fraction": 0.0, **rollout_metrics(ro)}  # all-reduced: every rank stops here together
    out["kl_teacher_sequence"] = out.pop("kl")  # rollout_metrics' KL to its `ref_logprobs`: here the teacher's
    out.update(teacher_sums(ro))
    seq_adv = None
    if p.scored:
        check_scorable(out["invalid_fraction"], p.reward, f"of iteration {step + 1}")
        seq_adv, adv_mean = score_advantages(ro, st, dist.rank * per_rank)
        out["score_advantage_mean"] = adv_mean
    else:
        for key in ("score_mean", "score_std", "invalid_fraction"):
            out.pop(key, None)
    t1 = time.perf_counter()
    out.update(update(p.actor, p.teacher, ro, seq_adv, st, step, cfg.seed))
    out.update(seconds(ro, time.perf_counter() - t1, out))
    if st.sample_every and (step + 1) % st.sample_every == 0 and dist.is_main:
        write_samples(ctx.run.stage_dir / "samples.jsonl", step + 1, ro, st.sample_rows)
    return out


def seconds(ro: Any, update_seconds: float, out: dict) -> dict[str, float]:
    """The split of an iteration's time: generation, scoring (the student's log-probs and the reward), the teacher's
    forwards, the update; their shares and throughputs."""
    parts = {
        "generation": ro.seconds["generation"],
        "scoring": ro.seconds["scoring"],
        "teacher": ro.seconds["teacher"],
        "update": update_seconds,
    }
    total = max(sum(parts.values()), 1e-9)
    return {
        **{f"{k}_seconds": v for k, v in parts.items()},
        **{f"{k}_share": v / total for k, v in parts.items()},
        "gen_tok/s": out["generated_tokens"] / max(parts["generation"], 1e-9),
        "train_tok/s": out["tokens"] / max(update_seconds, 1e-9),
    }
