"""Resume state: commit a checkpoint of one or several DeepSpeed engines atomically (`step-N/`, then COMPLETE),
prune old ones, check the disk first, and load the newest one that every rank can read, setting damaged ones aside.

Called by every rank (collective). DeepSpeed itself stays in engine.py: this module only calls the engines' own
`save_checkpoint` / `load_checkpoint`.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlhf_cli.engine import barrier
from rlhf_cli.errors import UserError
from rlhf_cli.files import COMPLETE_MARKER, checkpoint_step, complete_checkpoints
from rlhf_cli.models.weights import error_summary, is_unreadable_file_error, torch_file_problem


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tagged(engines: Any) -> dict[str, Any]:
    """One engine (tag "state") or several by name (PPO: {"actor": ..., "critic": ...})."""
    return dict(engines) if isinstance(engines, dict) else {"state": engines}


def save_checkpoint(engines: Any, ckpt_dir: Path, step_no: int, client_state: dict, keep_last: int) -> Path:
    """Commit the resume state of one engine or a dict of named engines as `ckpt_dir/step-N/`: write under a
    temporary name, rename, mark COMPLETE, and only then delete checkpoints beyond `keep_last`. The client state
    goes with the first engine. Collective: every rank calls it."""
    final = ckpt_dir / f"step-{step_no}"
    tmp = ckpt_dir / f".tmp-step-{step_no}"
    rank0 = dist.get_rank() == 0
    tagged = _tagged(engines)
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    check_disk_space(ckpt_dir, expected_checkpoint_bytes(list(tagged.values()), ckpt_dir))
    barrier()
    for i, (tag, engine) in enumerate(tagged.items()):
        client = dict(client_state, rng=rng_state()) if i == 0 else {}
        engine.save_checkpoint(str(tmp), tag=tag, client_state=client, save_latest=False)
    barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (final / COMPLETE_MARKER).write_text(f"step {step_no}\n")
        done = complete_checkpoints(ckpt_dir)
        for old in done[: max(0, len(done) - keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def expected_checkpoint_bytes(engines: list[Any], ckpt_dir: Path) -> int:
    """Size of the next checkpoint: the last committed one if there is one, else an estimate per engine of the
    model (its dtype) plus fp32 Adam moments and master weights for the trainable parameters, over all ranks."""
    done = complete_checkpoints(ckpt_dir)
    if done:
        return sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file())
    counts = [count_parameters(engine.module) for engine in engines]
    return sum(n_all * 4 + n_train * 12 for n_all, n_train in counts)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts; under ZeRO-3 the full sizes (`ds_numel`), not the local shards."""

    def numel(p: torch.nn.Parameter) -> int:
        return getattr(p, "ds_numel", p.numel())

    params = list(model.parameters())
    return sum(numel(p) for p in params), sum(numel(p) for p in params if p.requires_grad)


def check_disk_space(folder: Path, needed: int) -> None:
    """Refuse to start a checkpoint that cannot fit (a full disk would leave a corrupt one); every rank
    checks, since ranks may write to different file systems."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed * 1.1:
        raise UserError(
            f"not enough disk space for a checkpoint in {folder}: about {needed / 2**30:.2f} GiB needed, "
            f"{free / 2**30:.2f} GiB free; free space, lower stage.keep_last, or set run.root elsewhere"
        )


def load_checkpoint(engines: Any, path: Path) -> dict:
    """Restore model, optimizer, scheduler (of each named engine) and RNG from `step-N/`; returns the client
    state saved with the first engine."""
    state: dict | None = None
    for tag, engine in _tagged(engines).items():
        _, client = engine.load_checkpoint(str(path), tag=tag)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint `{tag}` in {path}")
        state = client if state is None else state
    set_rng_state(state.pop("rng"))
    state.setdefault("step", checkpoint_step(path))
    return state


def resume_latest(engines: Any, ckpt_dir: Path) -> tuple[Path | None, dict | None, list[str]]:
    """Load the newest complete checkpoint of `ckpt_dir` that loads on every rank into `engines` (one engine, or a
    dict of named ones as for `load_checkpoint`). Returns (its path, the client state `load_checkpoint` returns,
    lines to log); (None, None, []) when there is none, i.e. start from step 0.

    A committed checkpoint whose files were damaged later (cut short by a full disk or a bad copy) is skipped for the
    next older one, and once one loads, rank 0 renames each damaged one to `damaged-step-N/`: kept for inspection,
    but out of later resumes, out of `keep_last` pruning (which would otherwise delete the good one for it) and out
    of the way of the next save of step N. When none loads, nothing is renamed and a UserError says what to remove.
    Collective: every rank calls it, each loads its own shard files, and the ranks agree on every attempt."""
    damaged: list[tuple[Path, str]] = []
    for path in reversed(complete_checkpoints(ckpt_dir)):
        client, problems = _try_checkpoint(engines, path)
        if not problems:
            return path, client, _set_aside(damaged, path)
        damaged.append((path, "; ".join(problems)))
    if damaged:
        listed = ", ".join(f"{path.name} ({why})" for path, why in damaged)
        folders = " ".join(str(path) for path, _ in damaged)
        raise UserError(
            f"no checkpoint in {ckpt_dir} can be loaded, all are damaged: {listed}. Remove them (rm -r {folders}) "
            f"to train this stage again from step 0, or start over with a new run.name"
        )
    return None, None, []


def _try_checkpoint(engines: Any, path: Path) -> tuple[dict | None, list[str]]:
    """(client state, []) when `path` loaded on every rank, else (None, what was wrong on each rank that failed).
    The cheap file check comes first, so a cut file is found before it half-loads an engine; errors of an unreadable
    file are caught on load, anything else (a model that does not match the checkpoint) is raised as before."""
    problem = _damaged_file(path)
    client = None
    if problem is None:
        try:
            client = load_checkpoint(engines, path)
        except Exception as err:
            if not (isinstance(err, FileNotFoundError) or is_unreadable_file_error(err)):
                raise
            problem = error_summary(err)
    problems: list[Any] = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Every rank's verdict (not just a flag): the ranks agree, and rank 0 can say which rank failed and why.
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problems = [f"rank {rank}: {p}" if p else None for rank, p in enumerate(problems)]
    failed = [p for p in problems if p]
    return (None if failed else client), failed


def _damaged_file(path: Path) -> str | None:
    """The first state file of checkpoint `path` that is cut short (DeepSpeed's .pt files are torch zip archives,
    whose directory is at the end), as `relative/path: what`, or None."""
    for file in sorted(path.rglob("*.pt")):
        problem = torch_file_problem(file)
        if problem:
            return f"{file.relative_to(path)}: {problem}"
    return None


def _set_aside(damaged: list[tuple[Path, str]], resumed: Path) -> list[str]:
    """Rename each damaged checkpoint to `damaged-step-N/` (rank 0; `-2`, `-3`... when that name is taken) and return
    the one log line that says so."""
    if not damaged:
        return []
    targets = []
    for path, _ in damaged:
        target, n = path.with_name(f"damaged-{path.name}"), 1
        while target.exists():
            n += 1
            target = path.with_name(f"damaged-{path.name}-{n}")
        targets.append(target)
    barrier()  # every rank has chosen the same names before rank 0 renames
    if dist.get_rank() == 0:
        for (path, _), target in zip(damaged, targets, strict=True):
            os.replace(path, target)
    barrier()
    listed = ", ".join(f"{path.name} ({why})" for path, why in damaged)
    return [
        f"[yellow]damaged checkpoint(s) in {resumed.parent}: {listed}; kept as {', '.join(t.name for t in targets)} "
        f"for inspection, resuming from the older {resumed.name}[/]"
    ]
