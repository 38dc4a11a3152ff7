"""Rejection sampling's rounds on disk (stages/rejection_sampling.py): where a round's fine-tuning checkpoints and
exported policy go, which rounds are finished, where an invocation resumes, and the check of an unfinished round's
saved candidates and selection against the config (rollout/saved_round.py), with what its candidates are drawn with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlhf_cli import engine as eng
from rlhf_cli.files import atomic_write_text, checkpoint_step, complete_checkpoints
from rlhf_cli.rollout import best_of_n as bon
from rlhf_cli.rollout import saved_round as saved
from rlhf_cli.run_dir import Run
from rlhf_cli.stages.context import StageContext


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


def prepare_round(ctx: StageContext, r: int, data: Any, rm_stats: Any) -> saved.Outcome:
    """Rank 0 checks round r's saved candidates and selection against this config (saved_round.reconcile). Without
    a kept selection the round's fine-tuning checkpoints go (they trained on a selection that is gone), and a
    selection made again drops its logged statistics. Every rank gets the outcome, after rank 0 changed the files."""
    cfg, run = ctx.cfg, ctx.run
    outcome = None
    if ctx.dist.is_main:
        st = cfg.stage
        idx = bon.round_prompts(len(data.train), st.prompts_per_round, cfg.seed, r)
        files = bon.RoundFiles.of(run.stage_dir, r)
        outcome = saved.reconcile(
            files,
            r,
            drawn_record(cfg, run, r, idx, data.train, rm_stats),
            saved.selection_rule(st),
            len(idx) * st.n_samples,
        )
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
    return {
        "policy": policy,
        "seed": cfg.seed,
        "stage.n_samples": st.n_samples,
        "stage.generation_batch_size": st.generation_batch_size,
        **{f"stage.generation.{k}": v for k, v in generation.items()},
        **{f"stage.reward.{k}": v for k, v in reward.items()},
        "reward model": saved.source_identity(run, st.reward.model) if uses_model else None,
        "rm_stats": list(rm_stats) if rm_stats else None,
        "prompts": saved.prompts_digest(prompt_idx, prompts),
    }


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
