"""`rlhf rejection_sampling`: best-of-N rejection sampling in rounds (Llama 2; docs/algorithms.md section 7).

Round k: draw `n_samples` responses per prompt from the policy of round k-1 (round 1: the stage's starting policy,
this run's sft/final), score them with the reward source (reward model, classifier or function; PPO's normalisation
and missing-EOS rule), drop copies and unscorable candidates, keep the best (`stage.selection`), then fine-tune on the
kept samples with the SFT loss and SFT's own step function, on the sampled token ids themselves. The fine-tuning
starts from the previous round's policy (`init=previous`, the default: successive rounds refine one policy, as
RAFT and Llama 2's iterated models do, at the cost of one round's steps each) or from the starting policy every round
(`init=sft`, as ReST-EM does against drift over many rounds); `keep_previous` adds the earlier rounds' selections to
the training set (Llama 2's guard against regressions). Optimizer steps are numbered across rounds.

Resumable by unit (see rollout/best_of_n.py): finished generation chunks, the round's candidates and selection, the
fine-tuning's checkpoints (checkpoints/round-k/), the policy each finished round exports (checkpoints/round-k-policy/,
the next round's sampler) and round-k/round.json, which marks a round complete. The candidates and the selection of
an unfinished round are reused only while they were made with what the config now says (rollout/saved_round.py):
otherwise the round selects again from its saved candidates, or draws them again, and says so.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rlhf_cli import checkpoints as ckpt
from rlhf_cli import engine as eng
from rlhf_cli.config.compose import config_hash, to_yaml
from rlhf_cli.data import build_prompt_datasets
from rlhf_cli.errors import UserError
from rlhf_cli.files import atomic_write_text
from rlhf_cli.metrics import Metrics
from rlhf_cli.rollout import best_of_n as bon
from rlhf_cli.rollout import saved_round as saved
from rlhf_cli.rollout.evaluation import PolicyEval, evaluate_policy
from rlhf_cli.rollout.online import reward_stats
from rlhf_cli.rollout.rewards import build_gold, build_reward
from rlhf_cli.run_dir import Run, now
from rlhf_cli.stages.common import (
    Finale,
    Loop,
    export_final,
    finish,
    frozen_policy,
    interrupted,
    policy_engine,
    step_plan,
    train_loop,
)
from rlhf_cli.stages.context import StageContext, stage_context
from rlhf_cli.stages.rounds import (
    finished_rounds,
    newest_step,
    prepare_round,
    resume_point,
    round_ckpt_dir,
    round_policy_dir,
)
from rlhf_cli.stages.sft import micro_batches, train_step

SHOW = ("round", "loss", "lr", "tok/s", "selected_score_mean", "best_of_n_gain", "eval_score", "eval_gold")


def run(cfg: Any, run: Run) -> Path | None:
    """Run the rounds and export the last round's policy to `<run>/rejection_sampling/final/`; None when stopped
    early to resume."""
    st = cfg.stage
    # 1. Distributed group, seed, the starting policy and its tokenizer, the prompts (the config's own rules: at
    #    composition, rlhf_cli/registry.py).
    ctx = stage_context(cfg, run)
    data = build_prompt_datasets(cfg.data, ctx.tokenizer, seed=cfg.seed)

    # 2. The reward source (loaded once for every round), the statistics it is normalised with, the gold metric.
    rm_stats = reward_stats(st, run)
    reward = build_reward(st, run, cfg.deepspeed, ctx.tokenizer, ctx.dist)
    gold = build_gold(st.gold_reward, st, run, cfg.deepspeed, ctx.tokenizer, ctx.dist)

    # 3. Where to start: the first round without round.json, with what it saved that still holds under this config
    #    (a changed threshold selects again, a changed N draws again), at its newest fine-tuning checkpoint; record the
    #    stage. `fresh`: nothing of round 1 is kept, so the starting policy is evaluated (again) and logged from step 0.
    first, offset, fresh, metrics = start(ctx, data, reward, rm_stats)
    rs = Rounds(ctx, data, reward, gold, rm_stats, metrics)

    # 4. The rounds: sample and select, fine-tune, evaluate; every round but the last exports its policy.
    done, totals = None, {"tokens": 0.0, "target_tokens": 0.0, "train_seconds": 0.0}
    for r in range(first, st.rounds + 1):
        done = one_round(rs, r, first, fresh, offset)
        if done is None:  # stopped early (stage.stop_after_steps): resumable
            return None
        totals = {key: value + done.last.get(key, 0.0) for key, value in totals.items()}
        offset += done.steps
        if r < st.rounds:
            metrics.log(offset, {"round": r, **done.evals}, SHOW)
            end_round(rs, r, done)
            done = None
            free_memory()

    # 5. After the last round: final evaluation logged, final/ exported, headline metrics and summary recorded.
    if done is not None:
        finish_stage(rs, done, totals, offset)
    return run.final_dir


@dataclass(frozen=True)
class Rounds:
    """What every round reads: the stage's context, the prompts, the reward and gold sources, the reward statistics,
    the stage's metrics log."""

    ctx: StageContext
    data: Any
    reward: Any
    gold: Any
    rm_stats: Any
    metrics: Metrics


@dataclass(frozen=True)
class RoundDone:
    """A round's fine-tuning, finished: its optimizer steps, its held-out evaluation, the loop's last record, the
    engine (the round's policy)."""

    steps: int
    evals: dict
    last: dict
    engine: Any


def one_round(rs: Rounds, r: int, first: int, fresh: bool, offset: int) -> RoundDone | None:
    """Round r: its candidates drawn from the previous round's policy (round 1: the starting one) and selected unless
    saved, then the fine-tuning; None when it stopped early."""
    ctx, st = rs.ctx, rs.ctx.st
    sampler = ctx.source if r == 1 else str(round_policy_dir(ctx.run, r - 1))
    files = bon.RoundFiles.of(ctx.run.stage_dir, r)
    if r > first:  # nothing of this round is saved yet: this records what its candidates are drawn with
        prepare_round(ctx, r, rs.data, rs.rm_stats)
    if fresh and r == 1 and rs.data.eval:  # the starting policy's held-out score: the 'before' of the headline
        rs.metrics.log(0, {"round": 0, **evaluate_start(rs, sampler)}, SHOW)
    if not files.selection.is_file():
        sample_and_select(rs, files, r, sampler, offset)
    examples = round_examples(ctx.run.stage_dir, r, st.keep_previous, rs.data.train)
    return fine_tune(rs, r, ctx.source if st.init == "sft" else sampler, examples, offset)


def finish_stage(rs: Rounds, done: RoundDone, totals: dict, steps: int) -> None:
    """After the last round: its evaluation logged as the final one, final/ exported, the headline metrics (with the
    last selection's) and the summary recorded; then the round marked complete."""
    ctx, st = rs.ctx, rs.ctx.st
    files = bon.RoundFiles.of(ctx.run.stage_dir, st.rounds)
    selection = json.loads(files.selection.read_text())
    extra = {
        "rounds": st.rounds,
        "steps": steps,
        **{k: selection[k] for k in HEADLINE_SELECTION},
        "data": rs.data.report.to_dict(),
    }
    finish(
        ctx,
        rs.metrics,
        {**done.last, **totals, "step": steps},
        done.evals,
        SHOW,
        Finale(export_final(ctx, done.engine), extra=extra),
    )
    end_round(rs, st.rounds, done)


def start(ctx: StageContext, data: Any, reward: Any, rm_stats: Any) -> tuple:
    """(the first round to run, the steps before it, `fresh`, the stage's Metrics): what the unfinished round saved
    is checked against this config (`prepare_round`), the stage recorded as running, the log opened."""
    cfg, run, st = ctx.cfg, ctx.run, ctx.st
    first, offset, history = finished_rounds(run.stage_dir, st.rounds)
    kept = prepare_round(ctx, first, data, rm_stats) if first <= st.rounds else None
    fresh = first == 1 and not (kept and kept.drawn)
    resume_step = newest_step(round_ckpt_dir(run, first)) or offset
    started = run.begin(
        to_yaml(cfg),
        config_hash(cfg),
        {"policy": ctx.source, "reward": reward.describe(), "data": cfg.data.source},
        resume_point(run, first, bool(kept and kept.drawn)),
    )
    estimate = offset + (st.rounds - first + 1) * steps_estimate(len(data.train), st, ctx.dist.world_size)
    metrics = Metrics(
        run.metrics_path,
        estimate,
        cfg.logging,
        ctx.dist.is_main,
        resume_step,
        replay_from=0 if fresh else resume_step + 1,
    )
    lines = (data.report.summary(), ctx.rollout.describe(), describe(st, len(data.train), first, history))
    for line in (started, *lines, kept and kept.line):
        if line:
            metrics.message(line)
    return first, offset, fresh, metrics


HEADLINE_SELECTION = ("candidate_score_mean", "selected_score_mean", "best_of_n_gain", "valid_prompt_fraction")


def steps_estimate(n_train: int, st: Any, world_size: int) -> int:
    """Optimizer steps of one round if every sampled prompt keeps one sample (best-of-N): the progress bar's first
    guess, corrected once each round's selection is known."""
    prompts = min(st.prompts_per_round or n_train, n_train)
    per_prompt = st.top_k if st.selection == "top_k" else 1
    global_batch = st.micro_batch_size * st.gradient_accumulation_steps * world_size
    return st.max_steps or max(1, math.ceil(st.epochs * max(1, prompts * per_prompt // global_batch)))


def describe(st: Any, n_train: int, first: int, history: list[dict]) -> str:
    prompts = min(st.prompts_per_round or n_train, n_train)
    line = (
        f"{st.rounds} round(s) of {prompts} prompts x {st.n_samples} samples, selection {st.selection}, "
        f"fine-tuning from the {'starting' if st.init == 'sft' else 'previous round'} policy"
    )
    if history:
        line += f"; round{'s 1-' if first > 2 else ' '}{first - 1} already done"
    return line


def generation_model(ctx: StageContext, source: str) -> Any:
    """The policy `source` (an HF folder, a whole model) frozen for sampling."""
    return frozen_policy(ctx, OmegaConf.merge(ctx.cfg.model, {"name_or_path": source, "lora": {"enabled": False}}))


def evaluate_start(rs: Rounds, source: str) -> dict:
    """Held-out score of the starting policy: the 'before' of the stage's headline."""
    model = generation_model(rs.ctx, source)
    out = evaluate_policy(model, rs.reward, rs.data.eval, PolicyEval.of_stage(rs.ctx, rs.gold, allow_invalid=True))
    del model
    free_memory()
    return out


def sample_and_select(rs: Rounds, files: bon.RoundFiles, r: int, sampler: str, offset: int) -> None:
    """Round r's candidates from the policy `sampler` unless they are merged already (the chunks not yet on disk,
    then merged by rank 0), then its selection (rank 0), logged with the drawing's throughput."""
    ctx, st, dist, data = rs.ctx, rs.ctx.st, rs.ctx.dist, rs.data
    speed: dict[str, float] = {}
    if not files.candidates.is_file():
        idx = bon.round_prompts(len(data.train), st.prompts_per_round, ctx.seed, r)
        chunks = [idx[j : j + st.generation_batch_size] for j in range(0, len(idx), st.generation_batch_size)]
        model = generation_model(ctx, sampler)
        with rs.metrics.closed_on_error():
            how = bon.Drawing(
                data.train,
                ctx.tokenizer,
                rs.reward,
                st,
                rs.rm_stats,
                dist,
                ctx.seed,
                collective=ctx.cfg.deepspeed.zero_stage == 3,
                engine=ctx.rollout,
            )
            speed = bon.sample_chunks(model, chunks, files, r, how, rs.metrics.message)
        del model
        free_memory()
        eng.barrier()
        if dist.is_main:
            bon.merge_chunks(files, len(chunks), st.n_samples)
            saved.record_throughput(files, speed)
    if dist.is_main:
        stats = bon.select_round(files, st.n_samples, st, saved.selection_rule(st))
        rs.metrics.log(offset, {"round": r, **stats, **(speed or saved.saved_throughput(files))}, SHOW)
    eng.barrier()


def round_examples(stage_dir: Path, r: int, keep_previous: bool, prompts: list) -> list:
    """The SFT examples round r trains on: its selection, and with `keep_previous` those of rounds 1..r-1 too."""
    rounds = range(1, r + 1) if keep_previous else (r,)
    rows = [row for k in rounds for row in bon.read_rows(bon.RoundFiles.of(stage_dir, k).selected)]
    return bon.training_examples(rows, prompts)


def fine_tune(rs: Rounds, r: int, init: str, examples: list, offset: int) -> RoundDone | None:
    """SFT on the round's examples from the policy `init`, resumable from checkpoints/round-r/; then the held-out
    evaluation. None when it stopped early (recorded as interrupted, `common.interrupted`)."""
    ctx, metrics = rs.ctx, rs.metrics
    cfg, st, dist = ctx.cfg, ctx.st, ctx.dist
    plan = round_plan(len(examples), st, dist.world_size, r)
    metrics.set_total(offset + plan.total_steps * (st.rounds - r + 1))
    engine = policy_engine(
        cfg, OmegaConf.merge(cfg.model, {"name_or_path": init}), ctx.tokenizer, plan.total_steps, dist.world_size
    )
    ckpt_dir = round_ckpt_dir(ctx.run, r)
    _, client, notes = ckpt.resume_latest(engine, ckpt_dir)
    for note in notes:
        metrics.message(note)
    metrics.message(f"round {r}: fine-tuning on {len(examples)} selected samples from {init}; {plan.describe()}")
    pad_id, micro, order_seed = ctx.tokenizer.pad_token_id, st.micro_batch_size, cfg.seed * 31 + r

    def one_step(step: int) -> dict[str, float]:
        idx = plan.rank_indices(step, dist.rank, order_seed)
        return {"round": r, **train_step(engine, micro_batches(examples, idx, micro, pad_id), dist.device)}

    def run_eval() -> dict[str, float]:
        return evaluate_policy(engine, rs.reward, rs.data.eval, PolicyEval.of_stage(ctx, rs.gold, allow_invalid=True))

    start_step, t0 = client["step"] - offset if client else 0, time.perf_counter()
    loop = Loop(one_step, run_eval, SHOW, step_offset=offset, ckpt_dir=ckpt_dir)  # checkpoints step-<offset + done>
    last = train_loop(ctx, engine, plan, metrics, start_step, loop)
    if interrupted(ctx, last, plan, metrics, offset):
        return None
    evals = run_eval() if rs.data.eval else {}
    return RoundDone(plan.total_steps, {**evals, "finetune_seconds": time.perf_counter() - t0}, last, engine)


def round_plan(n_examples: int, st: Any, world_size: int, r: int) -> Any:
    try:
        return step_plan(n_examples, st, world_size)
    except UserError:
        global_batch = st.micro_batch_size * st.gradient_accumulation_steps * world_size
        fixes = ", ".join(selection_fixes(st))
        raise UserError(
            f"round {r} selected {n_examples} sample(s), fewer than one global batch of {global_batch}; "
            f"try {fixes} or a lower stage.micro_batch_size / stage.gradient_accumulation_steps: the same "
            "command with the change selects again from the round's saved candidates, or draws them "
            "again where the change needs it"
        ) from None


def selection_fixes(st: Any) -> list[str]:
    """The changes that select more samples under this selection (a higher N cannot add to best-of-N's one per
    prompt); each takes effect on a re-run (saved_round)."""
    fixes = ["stage.selection=top_k"]
    if st.selection == "top_k":
        fixes = [f"a higher stage.top_k (now {st.top_k})"]
    elif st.selection == "threshold":
        fixes = [f"a lower stage.threshold (now {st.threshold:g})"]
    if st.selection != "best":
        fixes.append(f"a higher stage.n_samples (now {st.n_samples})")
    if st.prompts_per_round:
        fixes.append(f"a higher stage.prompts_per_round (now {st.prompts_per_round})")
    return fixes


def end_round(rs: Rounds, r: int, done: RoundDone) -> None:
    """A finished round: its policy exported for the next round (the last round's goes to final/ through `finish`),
    then round.json, which marks the round complete, and its fine-tuning checkpoints removed (the exported policy
    replaces them)."""
    ctx = rs.ctx
    files = bon.RoundFiles.of(ctx.run.stage_dir, r)
    if r < ctx.st.rounds:
        eng.export_hf(done.engine, ctx.tokenizer, round_policy_dir(ctx.run, r), merge_lora=ctx.cfg.model.lora.enabled)
    if ctx.dist.is_main:
        record = {"round": r, "steps": done.steps, "eval": done.evals, "ended_at": now()}  # round r+1's draw record
        atomic_write_text(files.done, json.dumps(record, indent=2) + "\n")
        shutil.rmtree(round_ckpt_dir(ctx.run, r), ignore_errors=True)
        if not ctx.st.save_candidates:  # kept until now so that a selection made again could read them
            files.candidates.unlink(missing_ok=True)
    eng.barrier()


def free_memory() -> None:
    """Collect a model that is done with before the next one is built (the sampler before the fine-tuning engine)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
