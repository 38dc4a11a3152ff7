"""What every stage sets up the same way, written once: the frozen `StageContext` (config, run, distributed group,
seed, the resolved starting checkpoint and its model config, the tokenizer), `begin` (resume, the run's record, the
metrics log and its opening lines) and `train_then_finish` (the shared loop, an interrupted stop, `finish`).

A stage's `run(cfg, run)` builds the context with `stage_context`, its own data and models, then calls these two; what
is left in it are the steps of its algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rlhf_cli import checkpoints as ckpt
from rlhf_cli import engine as eng
from rlhf_cli.config.compose import config_hash, to_yaml
from rlhf_cli.metrics import Metrics
from rlhf_cli.rollout.engines import make_engine
from rlhf_cli.run_dir import Run
from rlhf_cli.stages.common import finish, interrupted, train_loop


@dataclass(frozen=True)
class StageContext:
    """Built once per stage by `stage_context`: the composed config, the run directory, the distributed group,
    where the stage's model starts (`source`, resolved from `stage:<name>`) with `model_cfg` (cfg.model reading from
    it) and the tokenizer."""

    cfg: Any
    run: Run
    dist: Any
    source: str
    model_cfg: Any
    tokenizer: Any
    rollout: Any = None  # the RolloutEngine of a stage that generates (cfg.rollout), else None

    @property
    def st(self) -> Any:
        return self.cfg.stage

    @property
    def seed(self) -> int:
        return self.cfg.seed


def merged_model_config(cfg: Any, run: Run) -> Any:
    """cfg.model reading from its resolved sources (`stage:<name>` -> that stage's final/): the model and, where set,
    the tokenizer."""
    resolved = {"name_or_path": run.resolve_source(cfg.model.name_or_path)}
    if cfg.model.tokenizer:
        resolved["tokenizer"] = run.resolve_source(cfg.model.tokenizer)
    return OmegaConf.merge(cfg.model, resolved)


def default_tokenizer(model_cfg: Any) -> Any:
    from rlhf_cli.models import load_tokenizer

    return load_tokenizer(model_cfg)


def stage_context(
    cfg: Any,
    run: Run,
    model_config: Callable[[Any, Run], Any] = merged_model_config,
    tokenizer: Callable[[Any], Any] = default_tokenizer,
    check: Callable[[str], None] | None = None,
) -> StageContext:
    """1. The distributed group and the seed (every rank builds the same models and the same data order); the
    starting checkpoint (`model_config(cfg, run)`: cfg.model with its source resolved, or a clear error), `check`ed
    (`check(source)`, before anything loads), and its tokenizer."""
    dist = eng.init_distributed()
    torch.manual_seed(cfg.seed)
    model_cfg = model_config(cfg, run)
    source = model_cfg.name_or_path
    if check is not None:
        check(source)
    tok = tokenizer(model_cfg)
    rollout = make_engine(cfg.rollout, model_cfg, tok, dist) if "rollout" in cfg else None
    return StageContext(cfg, run, dist, source, model_cfg, tok, rollout)


@dataclass(frozen=True)
class Begun:
    """What `begin` hands the loop: the metrics log and the step to start at (0, or the resumed checkpoint's)."""

    metrics: Metrics
    start_step: int


def first_step(client: dict | None) -> int:
    return client["step"] if client else 0


def begin(
    ctx: StageContext,
    models: Any,
    total_steps: int,
    inputs: dict[str, str],
    lines: Iterable[str | None] = (),
    restore: Callable[[dict | None], int] = first_step,
) -> Begun:
    """Resume `models` (an engine, or a dict of them) from the newest complete checkpoint, if any (a damaged one: the
    one before); `restore(client)` reads the checkpoint's client state and says the step to start at. Record the stage
    as running with its `inputs`, open the metrics log, and write its opening lines: where it starts, the resume
    notes, then `lines` (None ones left out)."""
    run, cfg = ctx.run, ctx.cfg
    resume, client, notes = ckpt.resume_latest(models, run.checkpoints_dir)
    start_step = restore(client)
    started = run.begin(to_yaml(cfg), config_hash(cfg), inputs, resume)
    metrics = Metrics(run.metrics_path, total_steps, cfg.logging, ctx.dist.is_main, start_step)
    engine_line = ctx.rollout.describe() if ctx.rollout is not None else None
    for line in (started, *notes, engine_line, *lines):
        if line is not None:
            metrics.message(line)
    return Begun(metrics, start_step)


def source_lines(inputs: dict[str, str]) -> list[str]:
    """`key: value` lines of a stage's inputs, for its opening lines."""
    return [f"{k}: {v}" for k, v in inputs.items()]


def train_then_finish(ctx: StageContext, engine: Any, plan: Any, begun: Begun, loop: Any, finale: Any) -> Path | None:
    """The shared loop from `begun.start_step` (stages/common.train_loop), then, when it ran to the end of the plan,
    the final evaluation and `finish` (`finale`: a common.Finale); the stage's final/ folder, or None when it stopped
    early (recorded as interrupted; the same command resumes)."""

    last = train_loop(ctx, engine, plan, begun.metrics, begun.start_step, loop)
    if interrupted(ctx, last, plan, begun.metrics, loop.step_offset):
        return None
    finish(ctx, begun.metrics, last, loop.evaluate(), loop.show, finale)
    return ctx.run.final_dir
