"""What a stage command does with what is already in its run directory (docs/run-directory.md): refuse a
completed stage or a stale input, resume, or start again from scratch (`run.overwrite`), decided by rank 0 when the
run is opened (`open_run`), before any model loads.

- An input that is a stage of the run must be completed and intact on disk, and not stale itself (its own inputs
  unchanged since it completed), unless `run.allow_stale_inputs`.
- A completed, intact stage is refused unless `run.overwrite`; the message says when its inputs changed since.
- A stage that is not completed resumes only from saved work made from the same inputs and config.
- `run.overwrite` moves the old stage folder aside (`.<stage>.replaced/` in the run directory); it is deleted when
  the new run has started (`Run.begin`) and put back when the new run stops before that (`restore_overwritten`).
  An overwrite applies once per intent: the same command run again after an interruption continues the run it
  started (the intent is the pipeline's attempt, RLHF_OVERWRITE_INTENT, or the command line itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from rlhf_cli.errors import UserError
from rlhf_cli.files import check_run_name, resume_step
from rlhf_cli.provenance import (
    STAGE_PREFIX,
    changes,
    completion_id,
    damage,
    input_specs,
    record_inputs,
    stale_reasons,
    upstream,
)
from rlhf_cli.run_dir import Run, aside_dir, lock_run_dir

INTENT_ENV = "RLHF_OVERWRITE_INTENT"
RECORD_FILE = ".manifest-record.json"  # the replaced stage's manifest record, inside the folder set aside


def overwrite_intent() -> str:
    """The pipeline attempt that runs this stage, or a digest of this command line."""
    return os.environ.get(INTENT_ENV) or hashlib.sha256(" ".join(sys.argv[1:]).encode()).hexdigest()[:16]


def has_saved_work(stage_dir: Path) -> bool:
    """Complete resume checkpoints under <stage>/checkpoints/ (one level down for rejection sampling's rounds)."""
    return resume_step(stage_dir) is not None


def open_run(run_cfg: Any, stage: str, is_main: bool = True, cfg: Any = None, check_only: bool = False) -> Run:
    """Open `<root>/<name>/` for `stage`: lock it (rank 0), check what the stage would read and what it would
    resume or replace (`decide`: with the composed `cfg`, provenance, staleness and the data files and
    model folders it names too), and under `run.overwrite` move the old stage folder aside until the new run has
    started (`Run.begin`). Every rank calls it; ranks then meet at a barrier before reading `latest_checkpoint()`, so
    they agree on where to resume. Only rank 0 checks and writes. A refusal leaves the run directory as it was (a
    run directory made for it is removed again). `check_only`: the checks alone, nothing moved and nothing left
    behind (before torchrun starts the ranks)."""
    check_run_name(run_cfg.name)  # again here, before anything is created or deleted: callers may skip compose()
    root = Path(run_cfg.root) / run_cfg.name
    run = Run(root=root, stage=stage, is_main=is_main)
    if not is_main:
        return run
    run.made, run._lock = lock_run_dir(root)
    try:
        restore_overwritten(run)  # a process that died before its overwrite began: the old output comes back
        run.stage_was_there = os.path.lexists(run.stage_dir)
        fresh = decide(run, run_cfg, cfg)
        if fresh and not check_only:
            set_aside(run)
        if not check_only:
            run.stage_dir.mkdir(parents=True, exist_ok=True)
    except BaseException:
        run.discard()
        raise
    if check_only:
        run.discard()
    return run


def decide(run: Any, run_cfg: Any, cfg: Any) -> bool:
    """Check the stage against its run directory (rank 0); True when it starts again from scratch (an overwrite).
    Without the composed `cfg` (tests of the lock alone) only the completed / overwrite rule is checked."""
    from rlhf_cli.registry import STAGES

    manifest = run.read_manifest()
    record = manifest["stages"].get(run.stage) or {}
    spec = STAGES.get(run.stage)
    run.overwrite_intent = overwrite_intent() if run_cfg.overwrite else None  # recorded by `begin`
    if cfg is not None and spec is not None:
        run.provenance = current_provenance(run, manifest, cfg, spec, getattr(run_cfg, "allow_stale_inputs", False))
    broken = damage(run.root, record) if record.get("status") == "completed" else None
    if broken:
        run.notes.append(f"{run.stage} was recorded as completed, but {broken}: it is not complete, training again")
    elif record.get("status") == "completed":
        if not run_cfg.overwrite:
            raise UserError(already_complete(run, manifest, record))
        return True
    if run_cfg.overwrite and record:
        if record.get("overwrite_intent") != overwrite_intent():
            return True
        run.notes.append(
            f"run.overwrite=true was applied when this command first ran ({record.get('started_at')}); "
            "continuing that run"
        )
    if run.provenance is not None and has_saved_work(run.stage_dir):
        check_resume(run, manifest, record, spec.resume_needs_same_config)
    return False


def current_provenance(run: Any, manifest: dict, cfg: Any, spec: Any, allow_stale: bool) -> dict:
    """{config, inputs} of the stage now; refuses an input stage that is missing, damaged or (unless `allow_stale`)
    stale."""
    from rlhf_cli.config.compose import config_hash

    specs = input_specs(cfg, spec.inputs, manifest)
    check_sources(specs)
    for key, name in upstream(specs).items():
        if completion_id(manifest, name, run.root) is None:
            if any(key == k or key.startswith(k + "[") for k in spec.optional_inputs):
                del specs[key]
                continue
            run.stage_output(name)  # the UserError that says what is wrong and which command fixes it
        reasons = stale_reasons(manifest, name, run.root)
        if reasons and not allow_stale:
            raise UserError(stale_input(run, key, name, reasons))
        if reasons:
            run.notes.append(f"using {name} although it is stale ({'; '.join(reasons)}): run.allow_stale_inputs=true")
    return {"config": config_hash(cfg, location=False), "inputs": record_inputs(specs, manifest, run.root)}


def check_sources(specs: dict[str, str]) -> None:
    """A data file or model folder the stage names that is not there is refused now, before any library loads and
    before anything is written, with the loader's own message (data/sources.py `load_rows`, models/source.py
    `resolve_source`, which raise it at once for such a name). Hub ids are left to the loaders."""
    from rlhf_cli.data.sources import load_rows
    from rlhf_cli.models.source import MODEL_MARKER, TOKENIZER_MARKERS, is_builtin, resolve_source

    for key, value in specs.items():
        if key == "data.source" and _missing_data(value):
            load_rows(value)  # raises the DataError that names the file and what to do
        elif key in ("model.name_or_path", "model.tokenizer") and not value.startswith(STAGE_PREFIX):
            if not is_builtin(value):  # an unknown builtin raises its UserError
                resolve_source(value, TOKENIZER_MARKERS if key == "model.tokenizer" else MODEL_MARKER)


def _missing_data(source: str) -> bool:
    """`load_rows` refuses it before reading anything: an unknown builtin, or a local path (by its suffix or its
    start, as the loader tells one from a hub id) with nothing there."""
    from rlhf_cli.data.sources import LOCAL_SUFFIXES, builtin_file

    if source.startswith("builtin:"):
        return builtin_file(source[len("builtin:") :]) is None
    local = source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~"))
    return local and not Path(source).expanduser().exists()


def stale_input(run: Any, key: str, name: str, reasons: list[str]) -> str:
    args = f"run.name={run.root.name}" + (f" run.root={run.root.parent}" if run.root.parent != Path("runs") else "")
    return (
        f"input `{name}` of {run.stage} ({key}=stage:{name}) is stale: {'; '.join(reasons)}; train it again with "
        f"`rlhf {name} {args} run.overwrite=true` (or run the pipeline), or add run.allow_stale_inputs=true to use "
        "it as it is"
    )


def already_complete(run: Any, manifest: dict, record: dict) -> str:
    reasons = stale_reasons(manifest, run.stage, run.root)
    prov = record.get("provenance") or {}
    if run.provenance and prov.get("config") and prov["config"] != run.provenance["config"]:
        reasons.append(f"the config changed (hash {prov['config']} -> {run.provenance['config']})")
    stale = f"; it is stale: {'; '.join(reasons)}" if reasons else ""
    from rlhf_cli.registry import completed_refusal

    return completed_refusal(run.stage, run.root, stale)


def check_resume(run: Any, manifest: dict, record: dict, same_config: bool) -> None:
    """Saved resume checkpoints are used only when they were written from the same inputs (and config)."""
    recorded = record.get("provenance")
    if not isinstance(recorded, dict):  # written before provenance was recorded: nothing to compare
        return
    now = run.provenance
    reasons = [
        f"{key} is now {entry['spec']}"
        for key, entry in now["inputs"].items()
        if key not in (recorded.get("inputs") or {})
    ]
    for key, entry in (recorded.get("inputs") or {}).items():
        if key not in now["inputs"]:
            reasons.append(f"{key} is no longer set")
        elif now["inputs"][key].get("fp") != entry.get("fp"):
            reasons += changes({key: entry}, manifest, run.root) or [f"{key} changed"]
    if same_config and recorded.get("config") != now["config"]:
        reasons.append(
            f"the config changed (hash {recorded.get('config')} -> {now['config']}); run the command that "
            "wrote them to resume"
        )
    if reasons:
        raise UserError(
            f"the resume checkpoints of `{run.stage}` in {run.checkpoints_dir} were written from other "
            f"inputs: {'; '.join(reasons)}; add run.overwrite=true to start {run.stage} again from "
            "scratch"
        )


def set_aside(run: Any) -> None:
    """Move the stage folder aside and record the overwrite's intent; its old record is kept beside it."""
    stage_dir, aside = run.stage_dir, aside_dir(run)
    record = run.stage_record()
    if stage_dir.is_symlink() or (stage_dir.exists() and stage_dir.resolve().parent != run.root.resolve()):
        raise UserError(
            f"refusing to replace {stage_dir} for run.overwrite=true: it resolves to {stage_dir.resolve()}, outside "
            f"the run directory {run.root}; remove it yourself or choose another run.name"
        )
    shutil.rmtree(aside, ignore_errors=True)
    if stage_dir.exists():
        stage_dir.rename(aside)
    else:
        aside.mkdir()
    (aside / RECORD_FILE).write_text(json.dumps(record))
    manifest = run.read_manifest()
    manifest["stages"][run.stage] = {
        "status": "running",
        "overwrite_intent": overwrite_intent(),
        "replacing": aside.name,
    }
    run.write_manifest(manifest)
    run.notes.append(
        f"run.overwrite=true: the previous {run.stage} (kept in {aside} until this run had started) is removed"
    )


def restore_overwritten(run: Any) -> bool:
    """Put back a stage folder set aside by an overwrite whose new run never started (refused, failed or killed
    before `Run.begin`); a leftover of a run that did start is removed. True when something was restored."""
    aside = aside_dir(run)
    if not aside.is_dir():
        return False
    record = run.stage_record()
    if "replacing" not in record:
        shutil.rmtree(aside, ignore_errors=True)
        return False
    saved = aside / RECORD_FILE
    old = json.loads(saved.read_text()) if saved.is_file() else {}
    saved.unlink(missing_ok=True)
    shutil.rmtree(run.stage_dir, ignore_errors=True)
    aside.rename(run.stage_dir)
    manifest = run.read_manifest()
    if old:
        manifest["stages"][run.stage] = old
    else:
        manifest["stages"].pop(run.stage, None)
    run.write_manifest(manifest)
    return True
