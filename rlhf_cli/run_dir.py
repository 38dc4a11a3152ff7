"""The run-directory contract: `runs/<name>/` with an atomic `manifest.json` and one folder per stage.

    runs/<name>/manifest.json             stage -> status, config hash, inputs, outputs, metrics, times
    runs/<name>/<stage>/config.yaml       resolved config of the stage
    runs/<name>/<stage>/metrics.jsonl     one JSON object per logged step
    runs/<name>/<stage>/checkpoints/step-N/   resume state (complete ones carry a COMPLETE marker)
    runs/<name>/<stage>/final/            Hugging Face folder handed to the next stage

Rank 0 alone writes; every write of the manifest goes to a temporary file that is then renamed, so a
crash never leaves a half-written manifest. The file helpers lower modules share (atomic writes, the checkpoint
folders, the run-name rule) are in files.py; a stage opens its run with stage_state.py `open_run`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf_cli import slurm
from rlhf_cli.errors import UserError
from rlhf_cli.files import TIME_FORMAT, atomic_write_text, complete_checkpoints, incomplete_checkpoints
from rlhf_cli.jsonsafe import json_safe, load_json
from rlhf_cli.provenance import damage, new_completion

_PACKAGES = ("torch", "transformers", "deepspeed", "datasets", "peft", "hydra-core", "omegaconf", "rlhf-cli")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def now() -> str:
    return time.strftime(TIME_FORMAT)


@dataclass
class Run:
    """One stage's view of a run directory. Build it with `open_run` (stage_state.py)."""

    root: Path
    stage: str
    is_main: bool = True
    _lock: Any = field(default=None, repr=False)
    # What the stage is built from now ({config, inputs}, provenance.py), set by `open_run` and recorded by `begin`.
    provenance: dict | None = None
    overwrite_intent: str | None = None  # under run.overwrite: this command's intent (stage_state.overwrite_intent)
    notes: list[str] = field(default_factory=list)  # lines for the stage's log, from `open_run`
    began: bool = False  # `begin` has recorded the stage as running: from then on a stop is recorded, not undone
    # What this command made, so a refusal can leave the run directory as it found it (`discard`): the run directory
    # and the folders above it that `open_run` created (innermost first), and whether the stage folder was there.
    made: list[Path] = field(default_factory=list)
    stage_was_there: bool = True

    @property
    def stage_dir(self) -> Path:
        return self.root / self.stage

    @property
    def checkpoints_dir(self) -> Path:
        return self.stage_dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.stage_dir / "final"

    @property
    def metrics_path(self) -> Path:
        return self.stage_dir / "metrics.jsonl"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict:
        if not os.path.lexists(self.manifest_path):
            return {"run": self.root.name, "stages": {}}
        try:
            manifest = load_json(self.manifest_path)
        except (OSError, ValueError) as err:
            raise UserError(
                f"{self.manifest_path} is not valid JSON ({err}); restore it or use another run.name"
            ) from None
        stages = manifest.get("stages") if isinstance(manifest, dict) else None
        if not isinstance(stages, dict) or not all(isinstance(r, dict) for r in stages.values()):
            raise UserError(
                f"{self.manifest_path} has no `stages` table of stage records (was it edited?); restore "
                "it or use another run.name"
            )
        return manifest

    def stage_record(self, stage: str | None = None) -> dict:
        return self.read_manifest()["stages"].get(stage or self.stage, {})

    def update_stage(self, **fields: Any) -> None:
        """Merge `fields` into this stage's manifest record (rank 0 only; atomic). Marking the stage completed also
        records its completion: a new id, which the stages built on it fingerprint, and a digest of its outputs."""
        if not self.is_main:
            return
        manifest = self.read_manifest()
        record = manifest["stages"].setdefault(self.stage, {})
        record.update(fields)
        if fields.get("status") == "completed":
            record["completion"] = new_completion(self.root, record.get("outputs") or {})
        self.write_manifest(manifest)

    def write_manifest(self, manifest: dict) -> None:
        text = json.dumps(json_safe(manifest), indent=2, sort_keys=True, allow_nan=False)
        atomic_write_text(self.manifest_path, text + "\n")

    def begin(self, config_yaml: str, config_hash: str, inputs: dict[str, str], resumed_from: Path | None) -> str:
        """Record the stage as running: its resolved config.yaml and the manifest entry (rank 0).
        Returns a line for the log: where it starts, with the notes of `open_run`. (A resume under another config is
        refused when the run is opened, stage_state.check_resume; rejection sampling checks its rounds itself.)"""
        self.began = True
        if self.is_main:
            atomic_write_text(self.stage_dir / "config.yaml", config_yaml)
            intent = {"overwrite_intent": self.overwrite_intent} if self.overwrite_intent else {}
            before = self.stage_record()
            job = slurm.stage_fields(before.get("slurm"))  # the SLURM job and its requeues, if any
            start = _start_record(config_hash, inputs, resumed_from)
            if "error" in before:  # a preempted or failed try's message does not outlive the try that resumes it
                start["error"] = None
            self.update_stage(**start, provenance=self.provenance, **intent, **job)
            commit_overwrite(self)
        notes = "".join(f"\n{line}" for line in self.notes)
        if resumed_from is None:
            return f"starting {self.stage} in {self.stage_dir}{notes}"
        line = f"resuming {self.stage} from {resumed_from}{notes}"
        skipped = incomplete_checkpoints(self.checkpoints_dir)
        if skipped:
            line += f" (skipping incomplete checkpoint(s): {', '.join(p.name for p in skipped)})"
        return line

    def latest_checkpoint(self) -> Path | None:
        done = complete_checkpoints(self.checkpoints_dir)
        return done[-1] if done else None

    def stage_output(self, stage: str, what: str = "final") -> Path:
        """Path of a completed stage's output in this run, or a UserError saying which command makes it. A stage
        recorded as completed whose outputs were deleted or changed on disk is not complete."""
        record = self.stage_record(stage)
        path = self.root / stage / what
        broken = damage(self.root, record) if record.get("status") == "completed" else None
        if broken:
            raise UserError(
                f"stage `{stage}` of run `{self.root.name}` is recorded as completed, but {broken}; train it again "
                f"with `rlhf {stage} run.name={self.root.name}`"
            )
        if record.get("status") != "completed" or not path.is_dir():
            state = record.get("status", "not run")
            raise UserError(
                f"stage `{stage}` of run `{self.root.name}` is {state} (no {path}); "
                f"run `rlhf {stage} run.name={self.root.name}` first"
            )
        return path

    def resolve_source(self, name_or_path: str) -> str:
        """`stage:<name>` -> that completed stage's final/ in this run; anything else unchanged."""
        if name_or_path.startswith("stage:"):
            return str(self.stage_output(name_or_path.split(":", 1)[1]))
        return name_or_path

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def discard(self) -> None:
        """Leave the run directory as this command found it, then release it: the stage was refused before it began
        (rank 0). What this command made goes (the run directory and the folders above it when it made them, else
        the stage folder when it was not there: rank logs, a round's files); nothing that was there before."""
        if self.is_main and not self.began:
            made = list(self.made)
            if made[:1] == [self.root]:  # all in it is this command's (it held the lock since it made it)
                # Its lock file goes while still held: a process that opened it sees it gone (`_take_lock`).
                shutil.rmtree(made.pop(0), ignore_errors=True)
            elif not self.stage_was_there:
                shutil.rmtree(self.stage_dir, ignore_errors=True)
            for folder in made:  # the folders made above it, innermost first; one that another run uses stays
                try:
                    folder.rmdir()
                except OSError:
                    break
        self.release()


def _make_dirs(path: Path) -> list[Path]:
    """Make `path` and the missing folders above it; the ones this call made, innermost first ([]: it was there)."""
    missing = []
    while not path.is_dir() and path != path.parent:
        missing.append(path)
        path = path.parent
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by another command: not ours to remove
            continue
        made.append(folder)
    return made[::-1]


def lock_run_dir(root: Path) -> tuple[list[Path], Any]:
    """Make the run directory where needed and lock it: (the folders made, innermost first; the lock)."""
    for _ in range(10):
        made = _make_dirs(root)
        lock = _take_lock(root)
        if lock is not None:
            return made, lock
    raise UserError(f"run directory {root} keeps being removed while this command opens it; try again")


def _take_lock(root: Path) -> Any:
    """An exclusive advisory lock held for the life of the process, so two runs never share a folder. None when the
    lock file was removed or replaced meanwhile (a refused command removing the run directory it had made): the
    caller makes the folder again and retries, so two commands never hold locks on different files."""
    try:
        fh = open(root / ".lock", "a+")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise UserError(
            f"run directory {root} is in use by {holder}; wait for it to finish or pick another run.name"
        ) from None
    if not _same_file(fh, root / ".lock"):
        fh.close()
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
    fh.flush()
    return fh


def _same_file(fh: Any, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def aside_dir(run: Run) -> Path:
    """Where `run.overwrite` keeps the old stage folder until the new run has started (stage_state.set_aside)."""
    return run.root / f".{run.stage}.replaced"


def commit_overwrite(run: Run) -> None:
    """The new run of an overwritten stage has started: the old output set aside by `open_run` (stage_state.py) goes
    for good."""
    record = run.stage_record()
    if "replacing" in record:
        manifest = run.read_manifest()
        manifest["stages"][run.stage].pop("replacing", None)
        run.write_manifest(manifest)
    shutil.rmtree(aside_dir(run), ignore_errors=True)


def _start_record(config_hash: str, inputs: dict[str, str], resumed_from: Path | None) -> dict[str, Any]:
    """Manifest fields written when a stage starts or resumes."""
    return {
        "status": "running",
        "config_hash": config_hash,
        "inputs": inputs,
        "started_at": now(),
        "ended_at": None,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "command": " ".join(["rlhf"] + sys.argv[1:]),
    }
