"""`rlhf runs` and `rlhf plot`, in process, on one real tiny SFT run (which also shows the end-of-stage PNG) and on
hand-made run directories: interrupted, killed, running, failed, unreadable."""

from __future__ import annotations

import fcntl
import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import FAST, manifest, rlhf
from rich.console import Console

from rlhf_cli.cli import main
from rlhf_cli.commands import runs as runs_cmd

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> tuple[Path, str]:
    """(runs root, stderr) of a completed 4-step SFT run `done` with evaluations at steps 2 and 4."""
    root = tmp_path_factory.mktemp("listing") / "runs"
    fast = [a for a in FAST if not a.startswith(("stage.eval_every=", "logging.plots="))]  # plots on: the default
    res = rlhf(
        "sft",
        *fast,
        f"run.root={root}",
        "run.name=done",
        "stage.max_steps=4",
        "stage.eval_every=2",
        "stage.save_every=0",
        cwd=root.parent,
    )
    assert res.returncode == 0, res.stderr
    return root, res.stderr


def _stage(root: Path, run: str, stage: str, record: dict, rows: list[dict], checkpoints: tuple[int, ...] = ()):
    """Add `stage` to the hand-made run `run`: its manifest record, metrics.jsonl and complete checkpoints step-N."""
    folder = root / run / stage
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step in checkpoints:
        (folder / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (folder / "checkpoints" / f"step-{step}" / "COMPLETE").write_text("")
    path = root / run / "manifest.json"
    data = json.loads(path.read_text()) if path.is_file() else {"run": run, "stages": {}}
    data["stages"][stage] = record
    path.write_text(json.dumps(data, sort_keys=True))


def _hand_made(root: Path) -> None:
    """Next to `done`: `stopped` (sft completed, dpo interrupted at step 6 with checkpoints 3 and 6), `killed` (still
    `running`, nobody holds the lock), `broken` (failed rm), `corrupt` (manifest not JSON), `bare` (no manifest)."""
    sft_rows = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 5)] + [{"step": 4, "eval_loss": 2.5}]
    dpo_rows = [{"step": s, "loss": 0.69 - 0.01 * s, "reward_accuracy": 0.5} for s in range(1, 7)]
    times = {"started_at": "2026-11-30T10:00:00+0000", "ended_at": "2026-11-30T10:05:00+0000"}
    done = {"status": "completed", **times, "summary": {"headline": {"eval_loss": [3.1, 2.5]}}}
    _stage(root, "stopped", "sft", done, sft_rows)
    _stage(
        root,
        "stopped",
        "dpo",
        {
            "status": "interrupted",
            "started_at": "2026-11-30T10:06:00+0000",
            "ended_at": "2026-11-30T10:07:00+0000",
            "command": "rlhf dpo run.name=stopped",
        },
        dpo_rows,
        checkpoints=(3, 6),
    )
    _stage(
        root,
        "killed",
        "sft",
        {"status": "running", "started_at": times["started_at"], "ended_at": None},
        sft_rows[:2],
        checkpoints=(2,),
    )
    _stage(
        root,
        "broken",
        "rm",
        {"status": "failed", **times, "error": "eval_accuracy 0.51 < stage.min_eval_accuracy 0.6"},
        [{"step": 1, "loss": 0.7}],
    )
    (root / "corrupt").mkdir()
    (root / "corrupt" / "manifest.json").write_text('{"run": "corrupt", "stages": {"sft": {"sta')
    (root / "bare").mkdir()


def _rows(out: str) -> dict[str, list[str]]:
    """Plain output -> {run: its lines}; a run's later stages are on lines that start with spaces."""
    runs: dict[str, list[str]] = {}
    name = None
    for line in out.splitlines()[2:]:  # after the title and the header
        if line.startswith("resume "):
            break
        if not line.startswith(" "):
            name = line.split()[0]
        runs.setdefault(name, []).append(" ".join(line.split()))
    return runs


# ---------------------------------------------------------------- the end-of-stage PNG


def test_a_completed_stage_leaves_its_curves_png(sft_run):
    root, stderr = sft_run
    png = root / "done" / "sft" / "metrics.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    summary = manifest(root / "done")["stages"]["sft"]["summary"]
    assert summary["plot"] == str(png) and f"curves: {png}" in stderr


# ---------------------------------------------------------------- rlhf plot


def test_plot_redraws_every_stage_of_a_run(sft_run, tmp_path, capsys):
    root = tmp_path / "runs"
    shutil.copytree(sft_run[0] / "done", root / "done")
    (root / "done" / "sft" / "metrics.png").unlink()
    code, out, err = _cli(capsys, "plot", "run=done", f"root={root}")
    assert code == 0 and not err, err
    assert out == f"sft: {root}/done/sft/metrics.png  (loss, eval perplexity, learning rate)\n"
    assert (root / "done" / "sft" / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE
    _hand_made(root)
    code, out, err = _cli(capsys, "plot", "run.name=stopped", f"run.root={root}")
    assert code == 0 and [line.split(":")[0] for line in out.splitlines()] == ["sft", "dpo"]  # the order they ran
    code, out, err = _cli(capsys, "plot", "run.name=stopped", f"run.root={root}", "stage=dpo")
    assert code == 0 and out.startswith("dpo: ") and out.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["run=nope"], "error: no run directory {root}/nope; check run.name="),
        (["run=stopped", "stage=ppo"], "error: run `stopped` has no stage `ppo` (its stages: sft, dpo)"),
        (["run=bare"], "error: run `bare` has no stage with metrics to plot"),
        ([], "error: no run directory {root}/demo; check run.name="),  # the stages' default run
        (["run=stopped", "stages=dpo"], "error: unknown argument `stages`; did you mean `stage`?"),
    ],
)
def test_plot_refuses_bad_input_in_one_line(tmp_path, capsys, args, message):
    root = tmp_path / "runs"
    _hand_made(root)
    code, out, err = _cli(capsys, "plot", f"root={root}", *args)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1
    assert err.startswith(message.format(root=root)), err


# ---------------------------------------------------------------- rlhf runs


def test_runs_lists_completed_interrupted_failed_and_unreadable_runs(sft_run, tmp_path, capsys):
    root = tmp_path / "runs"
    shutil.copytree(sft_run[0] / "done", root / "done")
    _hand_made(root)
    code, out, err = _cli(capsys, "runs", f"root={root}")
    assert code == 0 and not err, err
    assert out.splitlines()[:2] == [f"runs under {root}/", out.splitlines()[1]]
    assert out.splitlines()[1].split() == ["run", "stage", "status", "key", "metrics", "started", "ended"]
    rows = _rows(out)
    assert list(rows) == ["bare", "broken", "corrupt", "done", "killed", "stopped"]
    assert rows["done"][0].startswith("done sft completed eval_loss ")  # from the run's own summary
    assert " -> " in rows["done"][0]
    assert rows["stopped"] == [
        "stopped sft completed eval_loss 3.1 -> 2.5 2026-11-30 10:00 2026-11-30 10:05",
        "dpo interrupted (resumable at step 6) loss 0.68 -> 0.63, reward_accuracy 0.5 2026-11-30 10:06 "
        "2026-11-30 10:07",  # not completed: its headline so far, from metrics.jsonl
    ]
    # Recorded as running, but no process holds the lock: it was killed; its metrics so far are shown.
    assert rows["killed"] == ["killed sft interrupted (resumable at step 2) loss 2.9 -> 2.8 2026-11-30 10:00"]
    assert rows["broken"] == [
        "broken rm failed loss 0.7; error: eval_accuracy 0.51 < stage.min_eval_accuracy 0.6 "
        "2026-11-30 10:00 2026-11-30 10:05"
    ]
    assert rows["corrupt"][0].startswith("corrupt unreadable manifest.json: Unterminated string")
    assert rows["bare"] == ["bare unreadable no manifest.json"]
    resume = [line for line in out.splitlines() if line.startswith("resume ")]
    assert resume == [
        "resume killed/sft at step 2: rlhf sft ...",
        "resume stopped/dpo at step 6: rlhf dpo run.name=stopped",
    ]


def test_runs_shows_a_locked_run_as_running(tmp_path, capsys):
    root = tmp_path / "runs"
    _hand_made(root)
    with open(root / "killed" / ".lock", "a+") as lock:  # what a live stage holds (run_dir._take_lock)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, out, _ = _cli(capsys, "runs", f"run.root={root}")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # still ours: the probe took nothing away
    assert code == 0 and _rows(out)["killed"] == ["killed sft running loss 2.9 -> 2.8 2026-11-30 10:00"]
    assert "resume killed/sft" not in out


@pytest.mark.parametrize("make", [False, True])
def test_runs_with_no_runs_says_so_in_one_line(tmp_path, capsys, make):
    root = tmp_path / "runs"
    if make:
        root.mkdir()
    code, out, err = _cli(capsys, "runs", f"root={root}")
    why = "it is empty" if make else "it does not exist"
    assert (
        code == 0
        and not err
        and out == f"no runs under {root}/ ({why}); a stage run with run.name=<name> creates {root}/<name>/\n"
    )


def test_a_terminal_gets_a_rich_table_that_keeps_square_brackets(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    _hand_made(root)
    _stage(root, "broken", "rm", {"status": "failed", "error": "expected [chosen, rejected]"}, [])
    screen = io.StringIO()
    monkeypatch.setattr("rich.console.Console", lambda **kw: Console(file=screen, force_terminal=True, width=200, **kw))
    assert runs_cmd.main([f"root={root}"]) == 0
    out = screen.getvalue()
    assert "\x1b[" in out and "error: expected [chosen, rejected]" in out  # styled, and the error's text intact
    assert "resume stopped/dpo at step 6: rlhf dpo run.name=stopped" in out
