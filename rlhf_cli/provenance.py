"""What each stage was built from, and whether that still holds (docs/run-directory.md, "Provenance").

Every stage records in its manifest record a `provenance`: the fingerprint of its own config (`config_hash`) and,
for each input its config names (the registry's `inputs` keys: the starting model, the data, the reference, the
reward and gold sources...), the input's spec and a fingerprint that changes when the input changes:

    stage:<name>          that stage's completion id, a new random id each time the stage completes
    builtin:<name>        the packaged file's bytes (the tiny model: the name, its shape is in the config)
    a local file / folder the size + modification time of every file under it
    module:function       the bytes of the module's source file
    anything else         the text itself (a hub id: its revision, when pinned, is part of the config)

A completed stage also records a digest of its outputs' file names and sizes, so a `final/` that was deleted or
truncated after it completed is seen as not complete. Staleness is computed from the records alone: a stage is
stale when an input's fingerprint now differs from the one it recorded. Torch-free: read before any model loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import uuid
from pathlib import Path
from typing import Any

STAGE_PREFIX = "stage:"


def digest(items: list) -> str:
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def files_under(path: Path) -> list[Path]:
    """The files of a folder (recursively, in a fixed order), or the file itself; hidden lock / temp files out."""
    if path.is_file():
        return [path]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith((".lock", ".tmp"))]
    return found


def path_fingerprint(path: Path) -> str:
    """Size + modification time of every file under `path` (names relative to it)."""
    rows = []
    for f in files_under(path):
        try:
            st = f.stat()
        except OSError:
            continue
        rows.append((str(f.relative_to(path)) if f != path else f.name, st.st_size, st.st_mtime_ns))
    return "files:" + digest(rows)


def content_fingerprint(path: Path) -> str:
    """A small file by its bytes (a packaged data file, a reward function's module): a reinstall or a fresh clone,
    which give every file a new time, leaves it unchanged."""
    try:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return path_fingerprint(path)


def output_digest(root: Path, outputs: dict[str, str]) -> str:
    """Names and sizes of the files of a stage's outputs (paths relative to the run directory): a deleted or
    truncated file changes it. Modification times stay out, so a run directory copied elsewhere still matches."""
    rows = []
    for rel in sorted(str(v) for v in outputs.values()):
        base = root / rel
        rows += [(rel, str(f.relative_to(base)) if f != base else "", f.stat().st_size) for f in files_under(base)]
    return digest(rows)


def new_completion(root: Path, outputs: dict[str, str]) -> dict[str, str]:
    """The record that marks one completion of a stage: a fresh id (what downstream stages fingerprint) and the
    digest of its outputs as written."""
    return {"id": uuid.uuid4().hex[:16], "outputs": output_digest(root, outputs)}


def damage(root: Path, record: dict) -> str | None:
    """Why a stage recorded as completed is not complete on disk (an output missing, or its files changed), or None.
    A record without a completion digest (written before provenance existed) is checked for its outputs only."""
    outputs = record.get("outputs") if isinstance(record.get("outputs"), dict) else {}
    for rel in outputs.values():
        if not (root / str(rel)).exists():
            return f"{root / str(rel)} is missing"
    done = record.get("completion")
    if isinstance(done, dict) and done.get("outputs") and outputs:
        if output_digest(root, outputs) != done["outputs"]:
            return f"the files of {', '.join(str(root / str(v)) for v in outputs.values())} changed after it completed"
    return None


def completion_id(manifest: dict, stage: str, root: Path) -> str | None:
    """The completion id of `stage` if it is completed and intact on disk, else None."""
    record = manifest.get("stages", {}).get(stage)
    if not isinstance(record, dict) or record.get("status") != "completed" or damage(root, record):
        return None
    done = record.get("completion")
    # A stage completed before completions were recorded: its end time stands in for the id.
    return str(done.get("id")) if isinstance(done, dict) else f"ended:{record.get('ended_at')}"


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part, None) if node is not None else None
    return node


def input_specs(cfg: Any, keys: tuple[str, ...], manifest: dict | None = None) -> dict[str, str]:
    """Config key -> input spec, for the registry's input keys of a stage. `stage.reward` is the reward source the
    stages use (functions, else function, else model); `stage.policies` names stages (empty: every completed stage
    of the run that makes a policy, from `manifest`)."""
    out: dict[str, str] = {}
    for key in keys:
        value = _get(cfg, key)
        if key.endswith(".reward") and value is not None:
            fns = [f.fn for f in (getattr(value, "functions", None) or [])]
            if fns:
                out.update({f"{key}.functions[{i}]": fn for i, fn in enumerate(fns)})
            elif getattr(value, "function", None):
                out[f"{key}.function"] = value.function
            elif getattr(value, "model", None):
                out[f"{key}.model"] = value.model
        elif key == "stage.policies":
            names = list(value or []) or default_policies(manifest or {})
            out.update({f"{key}[{n}]": STAGE_PREFIX + n for n in names})
        elif isinstance(value, str) and value:
            out[key] = value
    return out


def default_policies(manifest: dict) -> list[str]:
    """`rlhf eval` with no stage.policies: every completed stage of the run that trains a policy."""
    from rlhf_cli.registry import STAGES

    stages = manifest.get("stages", {})
    return [
        s
        for s, rec in stages.items()
        if isinstance(rec, dict)
        and rec.get("status") == "completed"
        and s in STAGES
        and not STAGES[s].scalar_head
        and s != "eval"
    ]


def upstream(specs: dict[str, str]) -> dict[str, str]:
    """Config key -> run-dir stage name, for the inputs that are stages of this run."""
    return {k: v[len(STAGE_PREFIX) :] for k, v in specs.items() if v.startswith(STAGE_PREFIX)}


def fingerprint(spec: str, manifest: dict, root: Path) -> str:
    """The current fingerprint of one input (see the module docstring); `missing` for a stage not complete."""
    if spec.startswith(STAGE_PREFIX):
        return completion_id(manifest, spec[len(STAGE_PREFIX) :], root) or "missing"
    if spec.startswith("builtin:"):
        from rlhf_cli.data.sources import builtin_file

        found = builtin_file(spec[len("builtin:") :])
        return content_fingerprint(found) if found else spec
    path = Path(spec).expanduser()
    if path.exists():
        return path_fingerprint(path)
    module, colon, name = spec.partition(":")
    if colon and name and "/" not in spec:
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is not None and found.origin and os.path.isfile(found.origin):
            return content_fingerprint(Path(found.origin))
    return "id:" + spec


def record_inputs(specs: dict[str, str], manifest: dict, root: Path) -> dict[str, dict[str, str]]:
    """key -> {spec, path (a local file or folder, absolute, so staleness can be checked from anywhere), fp}."""
    out = {}
    for key, spec in specs.items():
        entry = {"spec": spec, "fp": fingerprint(spec, manifest, root)}
        path = Path(spec).expanduser()
        if not spec.startswith((STAGE_PREFIX, "builtin:")) and path.exists():
            entry["path"] = str(path.resolve())
        out[key] = entry
    return out


def changes(recorded: dict, manifest: dict, root: Path, will_run: frozenset[str] = frozenset()) -> list[str]:
    """What changed since `recorded` (a provenance's `inputs`) was written, in words: `sft re-ran after it`, `sft
    runs again` (a stage in `will_run`), `sft is not complete`, `data.source data/x.jsonl changed`."""
    reasons = []
    for key, entry in recorded.items():
        if not isinstance(entry, dict) or "spec" not in entry:
            continue
        spec = str(entry["spec"])
        if spec.startswith(STAGE_PREFIX):
            name = spec[len(STAGE_PREFIX) :]
            now = fingerprint(spec, manifest, root)
            if name in will_run:
                reasons.append(f"{name} runs again")
            elif now == "missing":
                reasons.append(f"{name} is not complete")
            elif now != entry.get("fp"):
                reasons.append(f"{name} re-ran after it")
        elif fingerprint(entry.get("path") or spec, manifest, root) != entry.get("fp"):
            reasons.append(f"{key} {spec} changed")
    return reasons


def stale_reasons(manifest: dict, stage: str, root: Path, will_run: frozenset[str] = frozenset()) -> list[str]:
    """Why `stage`'s recorded work no longer matches its inputs ([] when it does, or it recorded no provenance)."""
    record = manifest.get("stages", {}).get(stage)
    prov = record.get("provenance") if isinstance(record, dict) else None
    if not isinstance(prov, dict) or not isinstance(prov.get("inputs"), dict):
        return []
    return changes(prov["inputs"], manifest, root, will_run)
