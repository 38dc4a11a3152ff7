"""`rlhf runs`, `rlhf plot` and the end-of-stage summary on a run directory damaged in every way run_damage.DAMAGE
lists: each lists or draws what it can, names what it cannot read, never raises, and leaves every byte it read as it
was (`rlhf plot` writes only the <stage>/metrics.png files it draws)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from run_damage import DAMAGE, fingerprint, healthy_run, replace

from rlhf_cli.cli import main
from rlhf_cli.run_dir import Run
from rlhf_cli.summary import print_summary

HEALTHY = {
    "sft": "demo sft completed eval_loss 3.1 -> 2.7 2026-11-30 10:00 2026-11-30 11:00",
    "ppo": "ppo interrupted (resumable at step 2) eval_score 0.2 -> 0.3, kl 0 -> 1.5 2026-11-30 10:10 2026-11-30 11:10",
    "eval": "eval completed reward sft 0.2 2026-11-30 10:20 2026-11-30 11:20",
}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _flat(text: str) -> str:
    """Each line with its runs of spaces (the table's alignment) made one space."""
    return "\n".join(" ".join(line.split()) for line in text.splitlines())


def _damaged(tmp_path: Path, case: str) -> Path:
    """A runs root holding `demo`, damaged by `case`, and an intact run `other`."""
    root = tmp_path / "runs"
    healthy_run(root, "other")
    DAMAGE[case].damage(healthy_run(root, "demo"))
    return root


def test_the_healthy_run_is_listed_and_drawn(tmp_path, capsys, monkeypatch):
    root = tmp_path / "runs"
    healthy_run(root)
    code, out, err = _cli(capsys, "runs", f"run.root={root}")
    assert code == 0 and not err
    assert _flat(out).splitlines()[2:] == [
        *HEALTHY.values(),
        "resume demo/ppo at step 2: rlhf ppo run.name=demo",
        f"evaluation table of demo: rlhf runs run.name=demo run.root={root}",
    ]
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, "plot", "run.name=demo")
    assert code == 0 and not err
    assert [line.split("  ")[0] for line in out.splitlines()] == [
        "sft: runs/demo/sft/metrics.png",
        "ppo: runs/demo/ppo/metrics.png",
    ]


@pytest.mark.parametrize("case", list(DAMAGE))
def test_runs_lists_a_damaged_run_and_names_the_damage(tmp_path, capsys, case):
    root = _damaged(tmp_path, case)
    before = fingerprint(root)
    code, out, err = _cli(capsys, "runs", f"run.root={root}")
    assert fingerprint(root) == before
    assert code == 0 and not err, err
    text = _flat(out)
    assert DAMAGE[case].runs_says in text, text
    assert HEALTHY["sft"].replace("demo", "other") in text  # the intact run beside it, in full
    assert HEALTHY["ppo"] in text


@pytest.mark.parametrize("case", [case for case, damage in DAMAGE.items() if damage.plot_says])
def test_plot_draws_what_it_can_of_a_damaged_run(tmp_path, capsys, monkeypatch, case):
    root = _damaged(tmp_path, case)
    monkeypatch.chdir(tmp_path)
    before = fingerprint(root, skip=("metrics.png",))
    code, out, err = _cli(capsys, "plot", "run.name=demo")
    assert fingerprint(root, skip=("metrics.png",)) == before
    assert code == 0 and all(": runs/demo/" in line for line in out.splitlines()), out + err
    assert DAMAGE[case].plot_says in out + err, out + err
    if "ppo: not drawn" in err:  # the stage alone: nothing drawn, one line that says why
        code, out, err = _cli(capsys, "plot", "run.name=demo", "stage=ppo")
        assert code == 2 and not out and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert fingerprint(root, skip=("metrics.png",)) == before


def test_plot_with_nothing_to_draw_says_why_in_one_line(tmp_path, capsys, monkeypatch):
    root = tmp_path / "runs"
    run = healthy_run(root)
    for damage in ("metrics binary garbage", "stage folder a dangling link"):
        DAMAGE[damage].damage(run)
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, "plot", "run.name=demo")
    assert code == 2 and not out and len(err.splitlines()) == 1, err
    assert err.startswith(
        "error: nothing drawn for run `demo`: ppo: nothing to plot for ppo: its metrics.jsonl has none of eval_gold,"
    ) and err.rstrip().endswith("(4 of its 4 lines are not rows)")


@pytest.mark.parametrize("case", list(DAMAGE))
def test_the_summary_of_a_damaged_stage_prints(tmp_path, case):
    root = _damaged(tmp_path, case)
    before = fingerprint(root)
    for stage in ("sft", "ppo", "eval"):
        screen = io.StringIO()
        for terminal in (False, True):
            print_summary(Console(file=screen, width=100), Run(root / "demo", stage), "run.name=demo", terminal)
        assert f"{stage} completed" in screen.getvalue()
    assert fingerprint(root) == before


# ---------------------------------------------------------------- the runs root itself


def test_odd_entries_in_the_runs_root(tmp_path, capsys, monkeypatch):
    """A run folder that is a symlink loop or a dangling link is named; a plain file is not a run; a folder whose
    name is not UTF-8 is listed under an escaped name."""
    root = tmp_path / "runs"
    healthy_run(root)
    (root / "loop").symlink_to("loop")
    (root / "gone").symlink_to("no-such-run")
    (root / "notes.txt").write_text("not a run\n")
    healthy_run(root, os.fsdecode(b"caf\xe9"))  # a Latin-1 name: not UTF-8, so Python holds it as a surrogate
    before = fingerprint(root)
    code, out, err = _cli(capsys, "runs", f"run.root={root}")
    assert fingerprint(root) == before
    assert code == 0 and not err, err
    text = _flat(out)
    assert "caf\\udce9 sft completed eval_loss 3.1 -> 2.7" in text and HEALTHY["sft"] in text
    assert "gone unreadable a symbolic link to nothing" in text and "loop unreadable a symbolic link to nothing" in text
    assert "notes.txt" not in text
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, "plot", "run.name=" + os.fsdecode(b"caf\xe9"), "stage=sft")
    assert code == 0 and out.startswith("sft: runs/caf\\udce9/sft/metrics.png") and not err, err
    code, out, err = _cli(capsys, "plot", "run.name=loop")
    assert code == 2 and err.startswith("error: no run directory runs/loop") and len(err.splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_files_without_read_permission_are_named(tmp_path, capsys, monkeypatch):
    root = tmp_path / "runs"
    (healthy_run(root) / "ppo" / "metrics.jsonl").chmod(0)
    (healthy_run(root, "locked") / "manifest.json").chmod(0)
    _unreadable_named(root, tmp_path, capsys, monkeypatch)


def _unreadable_named(root, tmp_path, capsys, monkeypatch):
    """`rlhf runs` names run `locked`'s manifest and demo's ppo metrics as unreadable; `rlhf plot` draws the rest."""
    code, out, _ = _cli(capsys, "runs", f"run.root={root}")
    assert code == 0 and "locked unreadable manifest.json: Permission denied" in _flat(out)
    assert "ppo interrupted (resumable at step 2) metrics.jsonl unreadable (Permission denied)" in _flat(out)
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, "plot", "run.name=demo")
    assert code == 0 and "ppo: not drawn: cannot read runs/demo/ppo/metrics.jsonl: Permission denied" in err
    assert out.startswith("sft: runs/demo/sft/metrics.png")


def test_read_errors_are_named_even_for_root(tmp_path, capsys, monkeypatch):
    """The same as above, for a test run as root: the reads fail as a chmod 000 file fails them for a user."""
    root = tmp_path / "runs"
    healthy_run(root)
    healthy_run(root, "locked")
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(("demo/ppo/metrics.jsonl", "locked/manifest.json")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    _unreadable_named(root, tmp_path, capsys, monkeypatch)


def test_the_program_itself_never_shows_a_traceback(tmp_path):
    """The real `rlhf` program, its stdout a pipe: a runs root with every damage above (one run each) and a run whose
    name is not UTF-8, then a plot of a run damaged three ways at once."""
    root = tmp_path / "runs"
    for i, damage in enumerate(DAMAGE.values()):
        damage.damage(healthy_run(root, f"d{i:02d}"))
    healthy_run(root, os.fsdecode(b"caf\xe9"))
    multi = healthy_run(root, "multi")
    for case in ("manifest a FIFO", "metrics garbage between rows"):
        DAMAGE[case].damage(multi)
    replace("sft/metrics.png", "folder")(multi)
    before = fingerprint(root, skip=("metrics.png",))

    # stdout strict, as under a UTF-8 locale: a C locale's stdout would write a name's stray bytes as they are.
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}

    def rlhf(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "rlhf_cli", *args, f"run.root={root}"],
            capture_output=True,
            text=True,
            errors="backslashreplace",
            timeout=120,
            cwd=tmp_path,
            env=env,
        )

    res = rlhf("runs")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    notes = (" ", "resume", "evaluation")  # a stage's row, the lines under the table
    listed = {line.split()[0] for line in res.stdout.splitlines()[2:] if line and not line.startswith(notes)}
    assert listed == {f"d{i:02d}" for i in range(len(DAMAGE))} | {"caf\\udce9", "multi"}
    res = rlhf("plot", "run.name=multi")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert (
        res.stdout == f"ppo: {root}/multi/ppo/metrics.png  (reward (score) and gold, KL to the reference, KL "
        "coefficient, proxy and gold reward vs KL, losses)\n"
    )
    assert res.stderr.splitlines() == [
        f"sft: not drawn: cannot write {root}/multi/sft/metrics.png: Is a directory",
        "manifest.json: not a regular file; the stages are drawn in the order of their names",
        "ppo: skipped 5 of 11 lines of metrics.jsonl (not JSON objects with a step)",
    ]
    assert fingerprint(root, skip=("metrics.png",)) == before
