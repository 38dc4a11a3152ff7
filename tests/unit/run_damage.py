"""A small run directory written the way the stages write it (run_dir.py, summary.py, metrics.py), the ways a hand
edit or a crash damages one, and a fingerprint of a folder tree, for tests that check `rlhf runs` and `rlhf plot`
survive the damage and change nothing they read."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STARTS = {"sft": "2026-11-30T10:00:00+0000", "ppo": "2026-11-30T10:10:00+0000", "eval": "2026-11-30T10:20:00+0000"}


def _record(run: str, stage: str, status: str, **extra: Any) -> dict[str, Any]:
    """A stage's manifest record as run_dir._start_record and summary.complete_stage leave it."""
    return {
        "command": f"rlhf {stage} run.name={run}",
        "config_hash": "e73ce51b1db4fcb2",
        "git_commit": None,
        "inputs": {"model": "builtin:tiny-llama"},
        "resumed_from": None,
        "started_at": STARTS[stage],
        "ended_at": STARTS[stage].replace("T10:", "T11:"),
        "status": status,
        "versions": {"torch": "2.13.0"},
        **extra,
    }


def _summary(headline: dict[str, list[float]], plot: str | None) -> dict[str, Any]:
    out = {
        "checkpoints_kept": False,
        "disk_bytes": {"checkpoints": 7000, "run": 9000, "stage": 8000},
        "headline": headline,
        "stage_seconds": 300.0,
        "tokens_per_second": 841.2,
    }
    return {**out, "plot": plot} if plot else out


SFT_ROWS = [{"step": s, "time": 1796622495.0 + s, "loss": 3.0 - 0.1 * s, "lr": 1e-3 * s} for s in range(1, 5)] + [
    {"step": 2, "eval_loss": 3.1, "eval_perplexity": 22.2},
    {"step": 4, "eval_loss": 2.7, "eval_perplexity": 14.9},
]
PPO_ROWS = (
    [{"step": 0, "eval_score": 0.2}]
    + [
        {
            "step": s,
            "score_mean": 0.1 * s,
            "kl": 0.5 * (s - 1),
            "kl_coef": 0.05 * s,
            "policy_loss": -0.01 * s,
            "value_loss": 0.2,
        }
        for s in range(1, 5)
    ]
    + [{"step": 2, "eval_score": 0.3}]
)  # every panel changes: all drawn
EVAL_JSON = {
    "reference": "builtin:tiny-llama",
    "policies": {"sft": "runs/demo/sft/final"},
    "prompts": 8,
    "n_samples": 1,
    "temperature": 0.0,
    "kl_samples": 2,
    "reward": None,
    "gold": "length",
    "results": {"reference": {"reward_mean": 0.1, "reward_mean_se": 0.01}},
}


def healthy_run(root: Path, name: str = "demo") -> Path:
    """`root/name`: sft completed (its summary, metrics.jsonl), ppo interrupted (metrics so far, a complete checkpoint
    step-2 and an incomplete step-4), eval completed (eval.json, no metrics), and the lock file of a stage that
    ended."""
    run = root / name
    for stage, rows in (("sft", SFT_ROWS), ("ppo", PPO_ROWS)):
        (run / stage).mkdir(parents=True)
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / stage / "config.yaml").write_text(f"stage:\n  name: {stage}\n")
    for step in (2, 4):
        (run / "ppo" / "checkpoints" / f"step-{step}").mkdir(parents=True)
    (run / "ppo" / "checkpoints" / "step-2" / "COMPLETE").write_text("")
    (run / "sft" / "final").mkdir()
    (run / "sft" / "final" / "model.safetensors").write_bytes(b"weights")
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps(EVAL_JSON, indent=2) + "\n")
    stages = {
        "sft": _record(
            name,
            "sft",
            "completed",
            metrics={"loss": 2.6, "eval_loss": 2.7, "train_seconds": 1.5},
            outputs={"final": "sft/final"},
            summary=_summary({"eval_loss": [3.1, 2.7], "loss": [2.9, 2.6]}, f"{run}/sft/metrics.png"),
        ),
        "ppo": _record(name, "ppo", "interrupted", error="interrupted by Ctrl-C"),
        "eval": _record(
            name,
            "eval",
            "completed",
            metrics={"sft/reward_mean": 0.2},
            outputs={"eval": "eval/eval.json"},
            summary=_summary({}, None),
        ),
    }
    (run / "manifest.json").write_text(json.dumps({"run": name, "stages": stages}, indent=2, sort_keys=True) + "\n")
    (run / ".lock").write_text("pid 4242 on node1")
    return run


# ---------------------------------------------------------------- the damage


def _edit(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    """Damage that rewrites the manifest: `change` edits the parsed manifest in place."""

    def damage(run: Path) -> None:
        manifest = json.loads((run / "manifest.json").read_text())
        change(manifest)
        (run / "manifest.json").write_text(json.dumps(manifest, indent=2))

    return damage


def _set(stage: str, key: str, value: Any) -> Callable[[Path], None]:
    return _edit(lambda m: m["stages"][stage].__setitem__(key, value))


def _fail(error: Any) -> Callable[[Path], None]:
    return _edit(lambda m: m["stages"]["ppo"].update(status="failed", error=error))


def _headline(value: Any) -> Callable[[Path], None]:
    return _edit(lambda m: m["stages"]["sft"]["summary"].__setitem__("headline", value))


def _write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / rel
        path.unlink(missing_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return damage


def _append(rel: str, data: bytes) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        with open(run / rel, "ab") as fh:
            fh.write(data)

    return damage


def replace(rel: str, kind: str) -> Callable[[Path], None]:
    """Put a folder, a file, a symlink loop, a dangling link, a FIFO, or nothing where `rel` is."""

    def damage(run: Path) -> None:
        path = run / rel
        if path.is_dir() and not path.is_symlink():
            for sub in sorted(path.rglob("*"), reverse=True):
                sub.rmdir() if sub.is_dir() and not sub.is_symlink() else sub.unlink()
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
        if kind == "folder":
            path.mkdir()
        elif kind == "file":
            path.write_text("not a folder\n")
        elif kind == "loop":
            path.symlink_to(path.name)  # a link to itself: every stat of it fails with ELOOP
        elif kind == "dangling":
            path.symlink_to("no-such-target")
        elif kind == "fifo":  # a plain open() of it waits for a writer: a reader must not hang
            os.mkfifo(path)

    return damage


def _checkpoints(*names: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        for name in names:
            (run / "ppo" / "checkpoints" / name).mkdir()
            (run / "ppo" / "checkpoints" / name / "COMPLETE").write_text("")

    return damage


def _lines(stage: str, *lines: bytes) -> Callable[[Path], None]:
    """Append raw lines to a stage's metrics.jsonl, after its good rows."""
    return _append(f"{stage}/metrics.jsonl", b"".join(line + b"\n" for line in lines))


GARBAGE = bytes(range(256)) * 3  # every byte value, newlines among them
NAN_ROWS = (b'{"step": 5, "score_mean": NaN, "kl": Infinity}', b'{"step": 6, "score_mean": -Infinity, "kl": NaN}')


@dataclass(frozen=True)
class Damage:
    damage: Callable[[Path], None]
    runs_says: str = ""  # what `rlhf runs` must print about it (in its table)
    # What `rlhf plot` must say about it (stdout or stderr); "": the damage is to nothing `rlhf plot` reads, and the
    # case is not drawn (at about a second a case).
    plot_says: str = ""


PPO = "eval_score 0.2 -> 0.3, kl 0 -> 1.5 2026-11-30 10:10"  # the healthy ppo row's metrics and start
NOT_ROWS = "lines of metrics.jsonl (not JSON objects with a step)"
NO_STAGES = "demo unreadable manifest.json has no `stages` table of stage records"
IN_NAME_ORDER = "; the stages are drawn in the order of their names"
SFT = "sft: runs/demo/sft/metrics.png  (loss, eval perplexity, learning rate)"
SFT_THEN_PPO = f"{SFT}\nppo: runs/demo/ppo/metrics.png"

DAMAGE: dict[str, Damage] = {
    # The manifest, hand-edited: fields of the wrong type, shown as they are.
    "status a number": Damage(_set("sft", "status", 5), "demo sft 5 eval_loss 3.1 -> 2.7"),
    "status a list": Damage(_set("sft", "status", ["completed"]), "demo sft ['completed'] eval_loss 3.1 -> 2.7"),
    "status null": Damage(_set("ppo", "status", None), f"ppo unknown (resumable at step 2) {PPO}"),
    "started_at a list": Damage(_set("ppo", "started_at", [2026, 11, 30]), "kl 0 -> 1.5 [2026, 11, 30] 2026-11-30"),
    "started_at a number": Damage(
        _set("sft", "started_at", 1796622495),
        "eval_loss 3.1 -> 2.7 1796622495 2026-11",
        "losses)\nsft: runs/demo/sft/metrics.png",
    ),  # sft last: no start time
    "ended_at an object": Damage(_set("sft", "ended_at", {"t": 1}), "eval_loss 3.1 -> 2.7 2026-11-30 10:00 {'t': 1}"),
    # A summary that is not one: the headline is read from metrics.jsonl instead, as for a stage still running.
    "summary a string": Damage(_set("sft", "summary", "fine"), "demo sft completed eval_loss 3.1 -> 2.7"),
    "summary null": Damage(_set("sft", "summary", None), "demo sft completed eval_loss 3.1 -> 2.7"),
    "headline a list": Damage(_headline([3.1, 2.7]), "demo sft completed eval_loss 3.1 -> 2.7"),
    "headline values not pairs": Damage(
        _headline({"eval_loss": 3.1, "loss": [1.0, 2.0, 3.0]}), "demo sft completed eval_loss 3.1 2026"
    ),
    "headline values strings": Damage(_headline({"eval_loss": ["a", "b"]}), "sft completed eval_loss a -> b 2026"),
    "headline values null": Damage(_headline({"eval_loss": [None, 2.7]}), "sft completed eval_loss n/a -> 2.7"),
    # json.dumps writes NaN and Infinity tokens, which json.loads reads back.
    "headline NaN tokens": Damage(_headline({"eval_loss": [float("nan"), float("inf")]}), "eval_loss nan -> inf"),
    "metrics a list": Damage(_set("sft", "metrics", [1, 2]), "demo sft completed eval_loss 3.1 -> 2.7"),
    "outputs a list": Damage(_set("eval", "outputs", ["eval.json"]), "eval completed reward sft 0.2 2026-11-30 10:20"),
    "error an object": Damage(_fail({"why": "oom"}), f"ppo failed (resumable at step 2) {PPO[:-17]}; error: {{'why"),
    "error many lines": Damage(_fail("line one\nline two\n\tthree"), "1.5; error: line one line two three 2026"),
    "command a list": Damage(_set("ppo", "command", ["rlhf", "ppo"]), "resume demo/ppo at step 2: ['rlhf', 'ppo']"),
    # A stage record that is not one: that stage unreadable, the others listed.
    "stage record null": Damage(
        _edit(lambda m: m["stages"].__setitem__("ppo", None)),
        "ppo unreadable its manifest record is null, not a table",
        SFT_THEN_PPO,
    ),
    "stage record a string": Damage(
        _edit(lambda m: m["stages"].__setitem__("ppo", "done")),
        "ppo unreadable its manifest record is a string, not a table",
    ),
    "stage name not a folder": Damage(
        _edit(lambda m: m["stages"].__setitem__("../../x", {"status": "completed"})),
        "../../x unreadable not a stage folder name",
    ),
    "stage name with NUL and a lone surrogate": Damage(
        _edit(lambda m: m["stages"].update({"a\0b": {"status": "failed"}, "\udcff": {"status": "failed"}})),
        "a\\x00b unreadable not a stage folder name\n\\udcff failed no folder \\udcff/",
        SFT_THEN_PPO,
    ),
    "stages a list": Damage(
        _edit(lambda m: m.__setitem__("stages", [1])), NO_STAGES, f"manifest.json has no `stages` table{IN_NAME_ORDER}"
    ),
    "stages null": Damage(_edit(lambda m: m.__setitem__("stages", None)), NO_STAGES),
    "manifest a list": Damage(_write("manifest.json", "[]"), NO_STAGES, "losses)\nsft: runs/demo/sft/metrics.png"),
    "manifest a number": Damage(_write("manifest.json", "7"), NO_STAGES),
    # The manifest, damaged as a file: the run unreadable, with the reason; `rlhf plot` draws its folders by name.
    "manifest empty": Damage(
        _write("manifest.json", b""),
        "demo unreadable manifest.json: Expecting value",
        f"manifest.json: Expecting value: line 1 column 1 (char 0){IN_NAME_ORDER}",
    ),
    "manifest truncated": Damage(
        _write("manifest.json", '{"run": "demo", "stages": {"sft": {"sta'),
        "demo unreadable manifest.json: Unterminated string starting at",
        "manifest.json: Unterminated string starting at",
    ),
    "manifest not UTF-8": Damage(
        _write("manifest.json", b'{"run": "d\xff\xfe"}'),
        "demo unreadable manifest.json: 'utf-8' codec can't decode byte 0xff",
        "manifest.json: 'utf-8' codec can't decode byte 0xff",
    ),
    "manifest binary garbage": Damage(
        _write("manifest.json", GARBAGE), "demo unreadable manifest.json: ", IN_NAME_ORDER
    ),
    "manifest nested too deep": Damage(
        _write("manifest.json", "[" * 200_000),
        "demo unreadable manifest.json: nested too deeply to parse",
        "manifest.json: nested too deeply to parse",
    ),
    "manifest a folder": Damage(
        replace("manifest.json", "folder"),
        "demo unreadable manifest.json: Is a directory",
        f"manifest.json: Is a directory{IN_NAME_ORDER}",
    ),
    "manifest a symlink loop": Damage(
        replace("manifest.json", "loop"),
        "demo unreadable manifest.json: Too many levels of symbolic links",
        "manifest.json: Too many levels of symbolic links",
    ),
    "manifest a FIFO": Damage(
        replace("manifest.json", "fifo"),
        "demo unreadable manifest.json: not a regular file",
        "manifest.json: not a regular file",
    ),
    "manifest missing": Damage(
        replace("manifest.json", "none"), "demo unreadable no manifest.json", "losses)\nsft: runs/demo/sft/metrics.png"
    ),  # by name, without a word: nothing to read
    # metrics.jsonl: `rlhf runs` reads ppo's (the stage is not completed); `rlhf plot` reads both.
    "metrics binary garbage": Damage(
        _write("ppo/metrics.jsonl", GARBAGE),
        "ppo interrupted (resumable at step 2) 2026-11-30 10:10",
        "ppo: not drawn: nothing to plot for ppo: its metrics.jsonl has none of eval_gold",
    ),
    "metrics garbage between rows": Damage(
        _lines("ppo", GARBAGE[:100], GARBAGE[200:]), PPO, f"ppo: skipped 5 of 11 {NOT_ROWS}"
    ),
    "metrics truncated last line": Damage(
        _append("ppo/metrics.jsonl", b'{"step": 5, "score_me'), PPO, f"ppo: skipped 1 of 7 {NOT_ROWS}"
    ),
    "metrics lines not objects": Damage(
        _lines("ppo", b"[1, 2]", b'"row"', b"null", b"5", b"{}"), PPO, f"ppo: skipped 5 of 11 {NOT_ROWS}"
    ),
    "metrics NaN and Infinity tokens": Damage(
        _lines("ppo", *NAN_ROWS), "eval_score 0.2 -> 0.3, kl 0 -> nan", "ppo: runs/demo/ppo/metrics.png"
    ),
    "metrics values strings": Damage(
        _lines("ppo", b'{"step": 5, "score_mean": "0.9", "kl": "high"}'), PPO, "ppo: runs/demo/ppo/metrics.png"
    ),
    "metrics steps odd": Damage(
        _lines(
            "ppo",
            b'{"step": "6", "kl": 1}',
            b'{"step": 6.5, "kl": 1}',
            b'{"step": true, "kl": 1}',
            b'{"step": null, "kl": 1}',
            b'{"step": 1' + b"0" * 400 + b', "kl": 1}',
        ),
        PPO,
        f"ppo: skipped 5 of 11 {NOT_ROWS}",
    ),
    "metrics numbers out of range": Damage(
        _lines("ppo", b'{"step": 5, "kl": 1e400, "score_mean": 1' + b"0" * 400 + b"}"),
        "eval_score 0.2 -> 0.3, kl 0 -> inf",
        "ppo: runs/demo/ppo/metrics.png",
    ),
    "metrics values near the float limit": Damage(
        _lines("ppo", b'{"step": 5, "kl": 1.7e308}', b'{"step": 6, "kl": -1.7e308}'),
        "eval_score 0.2 -> 0.3, kl 0 -> -1.7e+308",
        "ppo: runs/demo/ppo/metrics.png",
    ),
    "metrics UTF-8 BOM and NULs": Damage(
        _lines("ppo", b"\xef\xbb\xbf" + b'{"step": 5, "kl": 2.0}', b"\0" * 64),
        "eval_score 0.2 -> 0.3, kl 0 -> 2 2026",
        f"ppo: skipped 1 of 8 {NOT_ROWS}",
    ),
    "metrics empty": Damage(
        _write("ppo/metrics.jsonl", b""),
        "ppo interrupted (resumable at step 2) 2026-11-30 10:10",
        "ppo: not drawn: nothing to plot for ppo",
    ),
    "metrics missing": Damage(
        replace("ppo/metrics.jsonl", "none"),
        "ppo interrupted (resumable at step 2) 2026-11",
        "sft: runs/demo/sft/metrics.png",
    ),
    "metrics a folder": Damage(
        replace("ppo/metrics.jsonl", "folder"),
        "ppo interrupted (resumable at step 2) metrics.jsonl unreadable (Is a directory) 2026-11-30 10:10",
        "ppo: not drawn: cannot read runs/demo/ppo/metrics.jsonl: Is a directory",
    ),
    "metrics a symlink loop": Damage(
        replace("ppo/metrics.jsonl", "loop"),
        "metrics.jsonl unreadable (Too many levels of symbolic links)",
        "ppo: not drawn: cannot read runs/demo/ppo/metrics.jsonl: Too many levels of symbolic links",
    ),
    "metrics a FIFO": Damage(
        replace("ppo/metrics.jsonl", "fifo"),
        "metrics.jsonl unreadable (not a regular file)",
        "ppo: not drawn: cannot read runs/demo/ppo/metrics.jsonl: not a regular file",
    ),
    # Folders and the files in them.
    "stage folder missing": Damage(replace("ppo", "none"), "ppo interrupted no folder ppo/ 2026-11-30 10:10", SFT),
    "stage folder a file": Damage(replace("ppo", "file"), "ppo interrupted no folder ppo/ 2026-11-30 10:10", SFT),
    "stage folder a symlink loop": Damage(
        replace("ppo", "loop"), "ppo interrupted no folder ppo/ 2026-11-30 10:10", SFT
    ),
    "stage folder a dangling link": Damage(
        replace("sft", "dangling"),
        "sft/final is missing) eval_loss 3.1 -> 2.7; no folder sft/ 2026-11-30 10:00",  # incomplete (<run>/...
        "ppo: runs/demo/ppo/metrics.png",
    ),
    "checkpoints odd names": Damage(
        _checkpoints("step-abc", "step-", "step-\u00b2", "step--1", "step-3.5"),
        f"ppo interrupted (resumable at step 2) {PPO}",
    ),
    "checkpoints a file": Damage(replace("ppo/checkpoints", "file"), f"ppo interrupted {PPO}"),
    "checkpoint a symlink loop": Damage(
        replace("ppo/checkpoints/step-4", "loop"), f"ppo interrupted (resumable at step 2) {PPO}"
    ),
    "COMPLETE a folder": Damage(replace("ppo/checkpoints/step-2/COMPLETE", "folder"), f"ppo interrupted {PPO}"),
    "lock a folder": Damage(replace(".lock", "folder"), f"ppo interrupted (resumable at step 2) {PPO}"),
    "lock a symlink loop": Damage(replace(".lock", "loop"), f"ppo interrupted (resumable at step 2) {PPO}"),
    "lock a FIFO": Damage(replace(".lock", "fifo"), f"ppo interrupted (resumable at step 2) {PPO}"),
    "metrics.png a folder": Damage(
        replace("ppo/metrics.png", "folder"),
        f"(resumable at step 2) {PPO}",
        "ppo: not drawn: cannot write runs/demo/ppo/metrics.png: Is a directory",
    ),
    "eval.json damaged": Damage(_write("eval/eval.json", GARBAGE), "eval completed reward sft 0.2 2026-11-30 10:20"),
    "eval folder missing": Damage(
        replace("eval", "none"), "eval/eval.json is missing) reward sft 0.2; no folder eval/ 2026-11-30 10:20"
    ),
    "eval metrics damaged": Damage(
        _set("eval", "metrics", {"sft/reward_mean": "high", "x": None}), "eval completed 2026-11-30 10:20"
    ),
}


# ---------------------------------------------------------------- what must not change


def fingerprint(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> type, mode and content hash (files) or target (links) of everything under `root`, links not
    followed; paths with a part in `skip` (what a command is meant to write) left out."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = os.fsencode(path.relative_to(root)).decode("utf-8", "backslashreplace")
            if any(part in skip for part in path.relative_to(root).parts):
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"link {os.readlink(path)}"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = f"{st.st_mode:o} {hashlib.sha256(path.read_bytes()).hexdigest()}"
            else:
                out[rel] = f"{st.st_mode:o}"
    return out
