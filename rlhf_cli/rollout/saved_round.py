"""Whether a rejection-sampling round's saved work still holds for the config it is resumed under (docs/stages.md
"Rejection sampling", Outputs and resume).

A round saves its candidates (chunk files while it draws them, then candidates.jsonl) with `drawn.json`, the record
of what they were drawn with: the policy that drew them, N, the sampling settings, the reward, the prompts and the
seed. Its selection (selected.jsonl, selection.json) carries the rule that chose it. A round that runs again (after
a failure, a preemption, a changed command) reuses its candidates only while that record equals the one the current
config makes, and its selection only while the candidates are reused and the rule is the same. Otherwise the
selection is made again from the saved candidates (cheap: no model), or the candidates are drawn again, and one line
says which and why. Without this, a failed round's advice ("a lower stage.threshold") could never take effect, and a
round resumed under another N would read chunks drawn with the old N in groups of the new one.

Rank 0 reconciles; the other ranks act on the files it leaves (stages/rounds.py `prepare_round`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.files import atomic_write_text
from rlhf_cli.rollout.best_of_n import CHUNK_GLOB, RoundFiles, finished_chunks

# Keys of the draw record that matter only while the round's chunks are unmerged (they say which prompts a chunk
# file holds); merged candidates are grouped by prompt, so a round may finish them under another value.
CHUNK_LAYOUT = ("stage.generation_batch_size",)
SHOWN = 3  # changed keys named in one line


@dataclass(frozen=True)
class Outcome:
    """What round k keeps of its saved work: `drawn` its candidates (merged or some chunks), `selected` its
    selection; `redone` when saved work was discarded (the round's fine-tuning then starts over); `line` for the log."""

    drawn: bool
    selected: bool
    redone: bool
    line: str | None


def selection_rule(st: Any) -> dict[str, Any]:
    """The keys the selection reads (stage.top_k only under top_k, stage.threshold only under threshold)."""
    rule: dict[str, Any] = {"stage.selection": st.selection}
    if st.selection == "top_k":
        rule["stage.top_k"] = st.top_k
    if st.selection == "threshold":
        rule["stage.threshold"] = st.threshold
    return rule


def differences(saved: dict | None, current: dict, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for each key whose value differs; a key absent on one side counts as
    changed (a record from another version of the tool). `saved` None: nothing to compare, everything differs."""
    saved = saved if isinstance(saved, dict) else {}
    keys = [k for k in current if k not in ignore] + [k for k in saved if k not in current and k not in ignore]
    missing = object()
    found = [(k, saved.get(k, missing), current.get(k, missing)) for k in keys]
    return [
        (k, None if old is missing else old, None if new is missing else new)
        for k, old, new in found
        if old is missing or new is missing or _canonical(old) != _canonical(new)
    ]


def _canonical(value: Any) -> str:
    """Values compared as JSON, as they are saved: a tuple equals the list it is read back as."""
    return json.dumps(value, sort_keys=True)


def describe(changed: list[tuple[str, Any, Any]]) -> str:
    """`stage.threshold changed (2.0 -> 0.5)`; several keys: `a (1 -> 2), b (x -> y) changed`, at most SHOWN named."""
    parts = [f"{key} ({_show(old)} -> {_show(new)})" for key, old, new in changed[:SHOWN]]
    if len(changed) > SHOWN:
        parts.append(f"{len(changed) - SHOWN} more")
    if len(changed) == 1:
        key, old, new = changed[0]
        return f"{key} changed ({_show(old)} -> {_show(new)})"
    return ", ".join(parts) + " changed"


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value)


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing or unreadable (torn, another format)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def count_rows(path: Path) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def record_drawing(files: RoundFiles, drawn_with: dict) -> None:
    """Write drawn.json before the first chunk is drawn, so every chunk on disk has its record."""
    files.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(files.drawn, json.dumps({"with": drawn_with}, indent=2) + "\n")


def record_throughput(files: RoundFiles, speed: dict[str, float]) -> None:
    """The drawing's throughput beside its record: a selection made again later logs it with its statistics."""
    saved = read_json(files.drawn) or {}
    atomic_write_text(files.drawn, json.dumps({**saved, "throughput": speed}, indent=2) + "\n")


def saved_throughput(files: RoundFiles) -> dict[str, float]:
    return dict((read_json(files.drawn) or {}).get("throughput") or {})


def discard(files: RoundFiles, selection_only: bool = False) -> None:
    """Remove the round's selection (selection.json first: it marks the selection done), and unless
    `selection_only` its candidates, chunks and draw record too."""
    for path in (files.selection, files.selected) + (() if selection_only else (files.candidates, files.drawn)):
        path.unlink(missing_ok=True)
    if not selection_only:
        shutil.rmtree(files.chunks, ignore_errors=True)


def reconcile(files: RoundFiles, round_no: int, drawn_with: dict, rule: dict, n_candidates: int) -> Outcome:
    """Rank 0, before round `round_no` runs: keep what was saved under the same draw record `drawn_with` and
    selection `rule`, discard the rest, and leave a draw record for what will be drawn. `n_candidates`: how many
    candidates the round has when its drawing is complete (prompts x N)."""
    merged, chunks = files.candidates.is_file(), finished_chunks(files)
    if merged and chunks:  # killed between writing candidates.jsonl and removing the chunks it merged
        for path in files.chunks.glob(CHUNK_GLOB):
            path.unlink()
    if not (merged or chunks or files.selection.is_file()):
        discard(files)
        record_drawing(files, drawn_with)
        return Outcome(drawn=False, selected=False, redone=False, line=None)
    have = saved_work(files, merged, len(chunks))
    why = draw_changed(files, drawn_with, merged, n_candidates)
    if why is None and files.selection.is_file():
        changed = differences((read_json(files.selection) or {}).get("rule"), rule)
        if not changed:
            both = have if have == "selection" else f"{have} and selection"
            line = f"round {round_no}: reusing the saved {both}, made with these settings"
            return Outcome(drawn=True, selected=True, redone=False, line=line)
        if merged:
            discard(files, selection_only=True)
            line = f"round {round_no}: {describe(changed)}: selecting again from the saved {have}"
            return Outcome(drawn=True, selected=False, redone=True, line=line)
        why = f"{describe(changed)} and the candidates to select from are gone ({files.candidates.name})"
    if why is None:  # candidates or chunks of this very draw, not selected yet: the round goes on from them
        return Outcome(drawn=True, selected=False, redone=False, line=None)
    discard(files)
    record_drawing(files, drawn_with)
    return Outcome(
        drawn=False,
        selected=False,
        redone=True,
        line=f"round {round_no}: {why}: drawing the candidates again ({have} discarded)",
    )


def saved_work(files: RoundFiles, merged: bool, n_chunks: int) -> str:
    """The round's saved work in words: `64 candidates`, `3 drawn chunk(s)`, or `selection` alone."""
    if merged:
        return f"{count_rows(files.candidates)} candidates"
    return f"{n_chunks} drawn chunk(s)" if n_chunks else "selection"


def draw_changed(files: RoundFiles, drawn_with: dict, merged: bool, n_candidates: int) -> str | None:
    """Why the saved candidates (merged or chunks) are not what `drawn_with` draws, or None when they are."""
    saved = read_json(files.drawn)
    if saved is None or not isinstance(saved.get("with"), dict):
        return "the saved candidates do not record what they were drawn with (an older rlhf wrote them)"
    changed = differences(saved["with"], drawn_with, ignore=CHUNK_LAYOUT if merged else ())
    if changed:
        return describe(changed)
    if merged and count_rows(files.candidates) != n_candidates:
        return f"{files.candidates} holds {count_rows(files.candidates)} candidates, not the round's {n_candidates}"
    return None


def source_identity(run: Any, spec: str) -> str:
    """A model named in the config, as a draw record holds it: a stage of this run with the time it completed (a
    stage trained again is another policy), a local folder with the names, sizes and times of its files, or a hub
    id as it is. The run-relative `stage:<name>` keeps a run directory that was moved or copied valid."""
    if spec.startswith("stage:"):
        record = run.stage_record(spec.split(":", 1)[1])
        return f"{spec} (completed {record.get('ended_at')})"
    path = Path(spec).expanduser()
    if path.is_dir():
        return f"{path.resolve()} (files {folder_stamp(path)})"
    return spec


def folder_stamp(path: Path) -> str:
    rows = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]


def prompts_digest(prompt_idx: list[int], prompts: list[Any]) -> str:
    """The round's prompts, in the order they are drawn, as token ids: another subset, order, data or template
    changes it."""
    ids = [[i, list(prompts[i].input_ids)] for i in prompt_idx]
    return f"{len(prompt_idx)} prompts, {hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:12]}"
