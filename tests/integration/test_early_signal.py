"""A scheduler's TERM / USR1 that comes in a command's first moments, before the stage has composed its config and
installed its handlers (preempt.record_early): a stage stops with a checkpoint at its first step boundary and exit 75,
`rlhf pipeline` stops before the stage it was about to start, and a command that trains nothing still dies of it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, _cli_env, manifest

from rlhf_cli.preempt import PREEMPTED_EXIT_CODE

MODULE = [sys.executable, "-m", "rlhf_cli"]
SCRIPT = [str(Path(sys.executable).with_name("rlhf"))]  # the console script (pyproject's [project.scripts])


def start_and_signal(args: list[str], cwd, after: float = 0.3, command=MODULE) -> subprocess.CompletedProcess:
    """`python -m rlhf_cli ARGS` (or `rlhf ARGS`), sent SIGUSR1 `after` seconds in: while the CLI still imports and
    composes."""
    proc = subprocess.Popen(
        [*command, *args], cwd=cwd, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(after)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_stage_signalled_while_it_starts_saves_at_its_first_step_and_exits_75(tmp_path):
    runs = tmp_path / "runs"
    res = start_and_signal(
        ["sft", *FAST, f"run.root={runs}", "run.name=early", "stage.max_steps=6", "stage.save_every=0"], tmp_path
    )
    assert res.returncode == PREEMPTED_EXIT_CODE, res.stderr[-3000:]
    record = manifest(runs / "early")["stages"]["sft"]
    assert record["status"] == "preempted"
    assert [p.name for p in (runs / "early" / "sft" / "checkpoints").iterdir()] == ["step-1"]


@pytest.mark.parametrize("command", [MODULE, SCRIPT], ids=["python -m rlhf_cli", "rlhf"])
def test_a_pipeline_signalled_before_a_stage_does_not_start_it(tmp_path, command):
    runs = tmp_path / "runs"
    res = start_and_signal(["pipeline", f"run.root={runs}", "run.name=early"], tmp_path, command=command)
    assert res.returncode == PREEMPTED_EXIT_CODE, res.stdout[-3000:] + res.stderr[-3000:]
    assert "stopped by SIGUSR1 before sft" in res.stdout + res.stderr
    assert not (runs / "early" / "sft").exists()


def test_a_command_that_trains_nothing_still_dies_of_the_signal(tmp_path):
    code = (
        "import os, signal, time\nfrom rlhf_cli import preempt\npreempt.record_early()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\ntime.sleep(0.1)\n"
        "print('recorded', preempt.requested(), flush=True)\n"
        "preempt.release_early()\ntime.sleep(0.1)\nprint('survived')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_cli_env(), timeout=60)
    assert res.returncode == -signal.SIGUSR1, (res.returncode, res.stdout, res.stderr)
    assert "recorded True" in res.stdout and "survived" not in res.stdout
