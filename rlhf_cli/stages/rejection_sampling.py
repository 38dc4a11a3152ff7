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
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rlhf_cli import checkpoints as ckpt
from rlhf_cli import engine as eng
from rlhf_cli.config.compose import config_hash, to_yaml
from rlhf_cli.data import build_prompt_datasets
from rlhf_cli.errors import UserError
from rlhf_cli.files import atomic_write_text, checkpoint_step, complete_checkpoints
from rlhf_cli.metrics import Metrics
from rlhf_cli.models import disable_dropout, load_causal_lm, load_tokenizer
from rlhf_cli.rollout import best_of_n as bon
from rlhf_cli.rollout import saved_round as saved
from rlhf_cli.rollout.evaluation import evaluate_policy
from rlhf_cli.rollout.online import reward_stats
from rlhf_cli.rollout.rewards import build_gold, build_reward
from rlhf_cli.run_dir import Run, now
from rlhf_cli.stages.common import export_final, finish, policy_engine, step_plan, train_loop
from rlhf_cli.stages.sft import micro_batches, train_step

SHOW = ("round", "loss", "lr", "tok/s", "selected_score_mean", "best_of_n_gain", "eval_score", "eval_gold")


def run(cfg: Any, run: Run) -> Path | None:
    """Run the rounds and export the last round's policy to `<run>/rejection_sampling/final/`; None when stopped
    early to resume."""
    st = cfg.stage
    # 1. Distributed group, seeds, the starting policy, tokenizer, prompts, the gold metric.
    dist = eng.init_distributed()
    torch.manual_seed(cfg.seed)
    check_config(cfg)
    source = run.resolve_source(cfg.model.name_or_path)
    tokenizer = load_tokenizer(OmegaConf.merge(cfg.model, {"name_or_path": source}))
    data = build_prompt_datasets(cfg.data, tokenizer, seed=cfg.seed)

    # 2. The reward source (loaded once for every round) and the statistics it is normalised with.
    rm_stats = reward_stats(st, run)
    reward = build_reward(st, run, cfg.deepspeed, tokenizer, dist)
    gold = build_gold(st.gold_reward, st, run, cfg.deepspeed, tokenizer, dist)

    # 3. Where to start: the first round without round.json, with what it saved that still holds under this config
    #    (a changed threshold selects again, a changed N draws again), at its newest fine-tuning checkpoint; record the
    #    stage. `fresh`: nothing of round 1 is kept, so the starting policy is evaluated (again) and logged from step 0.
    first, offset, fresh, metrics = start(cfg, run, source, data, reward, rm_stats, dist)

    # 4. The rounds: sample and select, fine-tune, evaluate, export.
    totals = {"tokens": 0.0, "target_tokens": 0.0, "train_seconds": 0.0}
    for r in range(first, st.rounds + 1):
        sampler = source if r == 1 else str(round_policy_dir(run, r - 1))
        files = bon.RoundFiles.of(run.stage_dir, r)
        if r > first:  # nothing of this round is saved yet: this records what its candidates are drawn with
            prepare_round(cfg, run, r, data, rm_stats, dist)
        if fresh and r == 1 and data.eval:  # the starting policy's held-out score: the 'before' of the headline
            metrics.log(0, {"round": 0, **evaluate_start(cfg, sampler, tokenizer, reward, data, gold, dist)}, SHOW)
        if not files.selection.is_file():
            sample_and_select(cfg, run, files, r, sampler, tokenizer, data, reward, rm_stats, dist, metrics, offset)
        examples = round_examples(run.stage_dir, r, st.keep_previous, data.train)
        init = source if st.init == "sft" else sampler
        outcome = fine_tune(cfg, run, r, init, examples, tokenizer, data, reward, gold, dist, metrics, offset)
        if outcome is None:  # stopped early (stage.stop_after_steps): resumable
            return None
        steps, evals, last, engine = outcome
        totals = {key: value + last.get(key, 0.0) for key, value in totals.items()}
        offset += steps
        if r < st.rounds:
            metrics.log(offset, {"round": r, **evals}, SHOW)
            end_round(cfg, run, files, r, steps, evals, engine, tokenizer, dist)
            del engine, last
            free_memory()
            continue
        # 5. After the last round: final evaluation logged, final/ exported, headline metrics and summary recorded.
        selection = json.loads(files.selection.read_text())
        export = export_final(engine, tokenizer, run, cfg.model.lora)
        finish(run, metrics, {**last, **totals, "step": offset}, evals, SHOW, export, st,
               extra={"rounds": st.rounds, "steps": offset, **{k: selection[k] for k in HEADLINE_SELECTION},
                      "data": data.report.to_dict()})  # fmt: skip
        end_round(cfg, run, files, r, steps, evals, engine, tokenizer, dist)
    return run.final_dir


def start(cfg: Any, run: Run, source: str, data: Any, reward: Any, rm_stats: Any, dist: Any) -> tuple:
    """(the first round to run, the steps before it, `fresh`, the stage's Metrics): what the unfinished round saved
    is checked against this config (`prepare_round`), the stage recorded as running, the log opened."""
    st = cfg.stage
    first, offset, history = finished_rounds(run.stage_dir, st.rounds)
    kept = prepare_round(cfg, run, first, data, rm_stats, dist) if first <= st.rounds else None
    fresh = first == 1 and not (kept and kept.drawn)
    resume_step = newest_step(round_ckpt_dir(run, first)) or offset
    started = run.begin(to_yaml(cfg), config_hash(cfg), {"policy": source, "reward": reward.describe(),
                        "data": cfg.data.source}, resume_point(run, first, bool(kept and kept.drawn)))  # fmt: skip
    estimate = offset + (st.rounds - first + 1) * steps_estimate(len(data.train), st, dist.world_size)
    metrics = Metrics(run.metrics_path, estimate, cfg.logging, dist.is_main, resume_step,
                      replay_from=0 if fresh else resume_step + 1)  # fmt: skip
    for line in (started, data.report.summary(), describe(st, len(data.train), first, history), kept and kept.line):
        if line:
            metrics.message(line)
    return first, offset, fresh, metrics


HEADLINE_SELECTION = ("candidate_score_mean", "selected_score_mean", "best_of_n_gain", "valid_prompt_fraction")


def check_config(cfg: Any) -> None:
    """What the schema cannot say alone, refused before any model is loaded."""
    lora = cfg.model.lora
    if lora.enabled and not lora.merge and cfg.stage.rounds > 1:
        raise UserError(
            "model.lora.merge=false with stage.rounds > 1: each round samples from the previous round's exported "
            "policy, which must be a whole model; set model.lora.merge=true or stage.rounds=1"
        )


def round_ckpt_dir(run: Run, r: int) -> Path:
    return run.checkpoints_dir / f"round-{r}"


def round_policy_dir(run: Run, r: int) -> Path:
    """The policy a finished round (not the last) exports: the next round samples from it (and starts from it with
    init=previous). Under checkpoints/, so a completed stage drops it with the resume checkpoints."""
    return run.checkpoints_dir / f"round-{r}-policy"


def finished_rounds(stage_dir: Path, rounds: int) -> tuple[int, int, list[dict]]:
    """(first round to run, optimizer steps of the finished rounds, their round.json records)."""
    history = []
    for r in range(1, rounds + 1):
        done = bon.RoundFiles.of(stage_dir, r).done
        if not done.is_file():
            break
        history.append(json.loads(done.read_text()))
    return len(history) + 1, sum(h["steps"] for h in history), history


def newest_step(ckpt_dir: Path) -> int | None:
    found = complete_checkpoints(ckpt_dir)
    return checkpoint_step(found[-1]) if found else None


def resume_point(run: Run, r: int, kept: bool) -> Path | None:
    """What this invocation continues from, for the log: a fine-tuning checkpoint, the round's folder when it `kept`
    saved candidates, or the previous round's."""
    found = complete_checkpoints(round_ckpt_dir(run, r))
    if found:
        return found[-1]
    here = bon.RoundFiles.of(run.stage_dir, r).dir
    return here if kept else (bon.RoundFiles.of(run.stage_dir, r - 1).dir if r > 1 else None)


def steps_estimate(n_train: int, st: Any, world_size: int) -> int:
    """Optimizer steps of one round if every sampled prompt keeps one sample (best-of-N): the progress bar's first
    guess, corrected once each round's selection is known."""
    prompts = min(st.prompts_per_round or n_train, n_train)
    per_prompt = st.top_k if st.selection == "top_k" else 1
    global_batch = st.micro_batch_size * st.gradient_accumulation_steps * world_size
    return st.max_steps or max(1, math.ceil(st.epochs * max(1, prompts * per_prompt // global_batch)))


def describe(st: Any, n_train: int, first: int, history: list[dict]) -> str:
    prompts = min(st.prompts_per_round or n_train, n_train)
    line = (f"{st.rounds} round(s) of {prompts} prompts x {st.n_samples} samples, selection {st.selection}, "
            f"fine-tuning from the {'starting' if st.init == 'sft' else 'previous round'} policy")  # fmt: skip
    if history:
        line += f"; round{'s 1-' if first > 2 else ' '}{first - 1} already done"
    return line


def generation_model(cfg: Any, source: str, tokenizer: Any, dist: Any) -> Any:
    """The policy `source` (an HF folder) frozen for sampling: eval mode, no gradients, ZeRO-3-partitioned under
    deepspeed.zero_stage=3 like the models it shares the accelerator with."""
    model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": source, "lora": {"enabled": False}})
    model = load_causal_lm(model_cfg, tokenizer, seed=cfg.seed)
    disable_dropout(model)
    return eng.frozen(model, cfg.deepspeed, cfg.stage.eval_batch_size, dist.device)


def evaluate_start(cfg: Any, source: str, tokenizer: Any, reward: Any, data: Any, gold: Any, dist: Any) -> dict:
    """Held-out score of the starting policy: the 'before' of the stage's headline."""
    st = cfg.stage
    model = generation_model(cfg, source, tokenizer, dist)
    out = evaluate_policy(model, reward, data.eval, tokenizer, st.generation, dist, cfg.seed, st.eval_batch_size,
                          sampling=st.eval_sampling, gold=gold, allow_invalid=True)  # fmt: skip
    del model
    free_memory()
    return out


def sample_and_select(cfg: Any, run: Run, files: bon.RoundFiles, r: int, sampler: str, tokenizer: Any, data: Any,
                      reward: Any, rm_stats: Any, dist: Any, metrics: Metrics, offset: int) -> None:  # fmt: skip
    """Round r's candidates from the policy `sampler` unless they are merged already (the chunks not yet on disk,
    then merged by rank 0), then its selection (rank 0), logged with the drawing's throughput."""
    st = cfg.stage
    speed: dict[str, float] = {}
    if not files.candidates.is_file():
        idx = bon.round_prompts(len(data.train), st.prompts_per_round, cfg.seed, r)
        chunks = [idx[j : j + st.generation_batch_size] for j in range(0, len(idx), st.generation_batch_size)]
        model = generation_model(cfg, sampler, tokenizer, dist)
        with metrics.closed_on_error():
            speed = bon.sample_chunks(model, chunks, files, r, data.train, tokenizer, reward, st, rm_stats, dist,
                                      cfg.seed, metrics.message, collective=cfg.deepspeed.zero_stage == 3)  # fmt: skip
        del model
        free_memory()
        eng.barrier()
        if dist.is_main:
            bon.merge_chunks(files, len(chunks), st.n_samples)
            saved.record_throughput(files, speed)
    if dist.is_main:
        stats = bon.select_round(files, st.n_samples, st, saved.selection_rule(st))
        metrics.log(offset, {"round": r, **stats, **(speed or saved.saved_throughput(files))}, SHOW)
    eng.barrier()


def prepare_round(cfg: Any, run: Run, r: int, data: Any, rm_stats: Any, dist: Any) -> saved.Outcome:
    """Rank 0 checks round r's saved candidates and selection against this config (saved_round.reconcile). Without
    a kept selection the round's fine-tuning checkpoints go (they trained on a selection that is gone), and a
    selection made again drops its logged statistics. Every rank gets the outcome, after rank 0 changed the files."""
    outcome = None
    if dist.is_main:
        st = cfg.stage
        idx = bon.round_prompts(len(data.train), st.prompts_per_round, cfg.seed, r)
        files = bon.RoundFiles.of(run.stage_dir, r)
        outcome = saved.reconcile(files, r, drawn_record(cfg, run, r, idx, data.train, rm_stats),
                                  saved.selection_rule(st), len(idx) * st.n_samples)  # fmt: skip
        if not outcome.selected:
            shutil.rmtree(round_ckpt_dir(run, r), ignore_errors=True)
        if outcome.redone:
            drop_selection_row(run.metrics_path, r)
    return eng.from_main(outcome)


def drawn_record(cfg: Any, run: Run, r: int, prompt_idx: list[int], prompts: list, rm_stats: Any) -> dict:
    """What round r's candidates are drawn with: the policy (round 1: the stage's starting policy; later: the
    previous round's, identified by when that round completed), N, the seed, the sampling and reward settings, the
    reward model and its normalisation statistics, the prompts."""
    st = cfg.stage
    if r == 1:
        policy = saved.source_identity(run, cfg.model.name_or_path)
    else:
        done = json.loads(bon.RoundFiles.of(run.stage_dir, r - 1).done.read_text())
        policy = f"round {r - 1}'s policy (completed {done.get('ended_at')})"
    uses_model = st.reward.model and not (st.reward.functions or st.reward.function)
    generation = OmegaConf.to_container(st.generation, resolve=True)
    reward = OmegaConf.to_container(st.reward, resolve=True)
    return {"policy": policy, "seed": cfg.seed, "stage.n_samples": st.n_samples,
            "stage.generation_batch_size": st.generation_batch_size,
            **{f"stage.generation.{k}": v for k, v in generation.items()},
            **{f"stage.reward.{k}": v for k, v in reward.items()},
            "reward model": saved.source_identity(run, st.reward.model) if uses_model else None,
            "rm_stats": list(rm_stats) if rm_stats else None,
            "prompts": saved.prompts_digest(prompt_idx, prompts)}  # fmt: skip


def drop_selection_row(path: Path, r: int) -> None:
    """Round r's selection statistics out of metrics.jsonl, for a selection made (and logged) again; the round's
    later rows are dropped as any replayed steps are (Metrics' replay_from)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not _selection_row(line, r)]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _selection_row(line: str, r: int) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and row.get("round") == r and "candidate_score_mean" in row


def round_examples(stage_dir: Path, r: int, keep_previous: bool, prompts: list) -> list:
    """The SFT examples round r trains on: its selection, and with `keep_previous` those of rounds 1..r-1 too."""
    rounds = range(1, r + 1) if keep_previous else (r,)
    rows = [row for k in rounds for row in bon.read_rows(bon.RoundFiles.of(stage_dir, k).selected)]
    return bon.training_examples(rows, prompts)


def fine_tune(cfg: Any, run: Run, r: int, init: str, examples: list, tokenizer: Any, data: Any, reward: Any,
              gold: Any, dist: Any, metrics: Metrics, offset: int) -> tuple | None:  # fmt: skip
    """SFT on the round's examples from the policy `init`, resumable from checkpoints/round-r/; then the held-out
    evaluation. Returns (steps, eval metrics, the loop's last record, the engine), or None when it stopped early."""
    st = cfg.stage
    plan = round_plan(len(examples), st, dist.world_size, r)
    metrics.set_total(offset + plan.total_steps * (st.rounds - r + 1))
    engine = policy_engine(cfg, OmegaConf.merge(cfg.model, {"name_or_path": init}), tokenizer, plan.total_steps,
                           dist.world_size)  # fmt: skip
    ckpt_dir = round_ckpt_dir(run, r)
    _, client, notes = ckpt.resume_latest(engine, ckpt_dir)
    for note in notes:
        metrics.message(note)
    metrics.message(f"round {r}: fine-tuning on {len(examples)} selected samples from {init}; {plan.describe()}")
    pad_id, micro, order_seed = tokenizer.pad_token_id, st.micro_batch_size, cfg.seed * 31 + r

    def one_step(step: int) -> dict[str, float]:
        idx = plan.rank_indices(step, dist.rank, order_seed)
        return {"round": r, **train_step(engine, micro_batches(examples, idx, micro, pad_id), dist.device)}

    def run_eval() -> dict[str, float]:
        return evaluate_policy(engine, reward, data.eval, tokenizer, st.generation, dist, cfg.seed, st.eval_batch_size,
                               sampling=st.eval_sampling, gold=gold, allow_invalid=True)  # fmt: skip

    def save(done: int) -> None:
        ckpt.save_checkpoint(engine, ckpt_dir, offset + done, {"step": offset + done}, st.keep_last)

    start, t0 = client["step"] - offset if client else 0, time.perf_counter()
    last = train_loop(st, engine, plan, dist, run, metrics, start, one_step, run_eval, SHOW, save=save,
                      step_offset=offset, ckpt_dir=ckpt_dir)  # fmt: skip
    if last["step"] < plan.total_steps:
        metrics.close()
        run.update_stage(status="interrupted", ended_at=now(), last_step=offset + last["step"])
        return None
    evals = run_eval() if data.eval else {}
    return plan.total_steps, {**evals, "finetune_seconds": time.perf_counter() - t0}, last, engine


def round_plan(n_examples: int, st: Any, world_size: int, r: int) -> Any:
    try:
        return step_plan(n_examples, st, world_size)
    except UserError:
        global_batch = st.micro_batch_size * st.gradient_accumulation_steps * world_size
        fixes = ", ".join(selection_fixes(st))
        raise UserError(f"round {r} selected {n_examples} sample(s), fewer than one global batch of {global_batch}; "
                        f"try {fixes} or a lower stage.micro_batch_size / stage.gradient_accumulation_steps: the same "
                        "command with the change selects again from the round's saved candidates, or draws them "
                        "again where the change needs it") from None  # fmt: skip


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


def end_round(cfg: Any, run: Run, files: bon.RoundFiles, r: int, steps: int, evals: dict, engine: Any,
              tokenizer: Any, dist: Any) -> None:  # fmt: skip
    """A finished round: its policy exported for the next round (the last round's goes to final/ through `finish`),
    then round.json, which marks the round complete, and its fine-tuning checkpoints removed (the exported policy
    replaces them)."""
    if r < cfg.stage.rounds:
        eng.export_hf(engine, tokenizer, round_policy_dir(run, r), merge_lora=cfg.model.lora.enabled)
    if dist.is_main:
        record = {"round": r, "steps": steps, "eval": evals, "ended_at": now()}  # ended_at: round r+1's draw record
        atomic_write_text(files.done, json.dumps(record, indent=2) + "\n")
        shutil.rmtree(round_ckpt_dir(run, r), ignore_errors=True)
        if not cfg.stage.save_candidates:  # kept until now so that a selection made again could read them
            files.candidates.unlink(missing_ok=True)
    eng.barrier()


def free_memory() -> None:
    """Collect a model that is done with before the next one is built (the sampler before the fine-tuning engine)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
