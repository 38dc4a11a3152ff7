"""Interrupting `rlhf sft`: Ctrl-C in training saves a checkpoint and stops like SIGTERM (exit 75), Ctrl-C while
loading stops at once (exit 130) and says where the next run starts, and after a resume metrics.jsonl has exactly
one row per step."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import FAST, free_port, manifest, metrics, rlhf

from rlhf_cli.files import checkpoint_step, complete_checkpoints
from rlhf_cli.preempt import PREEMPTED_EXIT_CODE


def _start(args: list[str], cwd: Path, log: Path, own_group: bool = False) -> subprocess.Popen:
    """`rlhf` in the background, its output in `log` (a pipe nobody reads could fill up and block it); with
    `own_group` in a process group of its own, as a shell starts a foreground job."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # a plain single-process run
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    with open(log, "w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "rlhf_cli", *args],
            cwd=cwd,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=own_group,
        )


def _wait_until(ready, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"rlhf ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.005)


def _rows(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _holds_lock(run_dir: Path, proc: subprocess.Popen):
    """True once `proc` has opened the run (its pid in the lock file): it is loading, not yet training."""
    lock = run_dir / ".lock"
    return lambda: lock.exists() and lock.read_text().startswith(f"pid {proc.pid} ")


def _ctrl_c_while_loading(args, run_dir, tmp_path, log) -> str:
    proc = _start(args, tmp_path, log)
    _wait_until(_holds_lock(run_dir, proc), proc, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130, log.read_text()[-3000:]
    out = log.read_text()
    assert "Traceback" not in out, out[-3000:]
    return out


def test_ctrl_c_saves_a_checkpoint_in_training_and_says_where_the_next_run_starts_while_loading(runs, tmp_path):
    args = ["sft", *FAST, f"run.root={runs}", "run.name=ctrl-c", "stage.max_steps=60", "stage.save_every=0"]
    run_dir, log = runs / "ctrl-c", tmp_path / "rlhf.log"
    # 1. While loading, before any checkpoint: stops at once, the next run starts at step 0.
    out = _ctrl_c_while_loading(args, run_dir, tmp_path, log)
    assert "interrupted: no checkpoint yet: the next run starts at step 0" in out, out[-3000:]
    # 2. In training: the step finishes, a checkpoint is saved, the message names it; exit 75 as for SIGTERM.
    proc = _start(args, tmp_path, log)
    _wait_until(lambda: _rows(run_dir / "sft" / "metrics.jsonl") >= 3, proc, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
    (ckpt,) = complete_checkpoints(run_dir / "sft" / "checkpoints")
    step = checkpoint_step(ckpt)
    out = log.read_text()
    assert 3 <= step < 60 and f"stopped by Ctrl-C (SIGINT) after step {step}; checkpoint saved at step {step}" in out
    assert manifest(run_dir)["stages"]["sft"]["status"] == "preempted"
    # 3. While loading again: the next run resumes from that checkpoint.
    out = _ctrl_c_while_loading(args, run_dir, tmp_path, log)
    assert f"interrupted: the next run resumes from step {step} ({ckpt})" in out, out[-3000:]
    # 4. The same command resumes from it and finishes, every step logged once.
    resumed = rlhf(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming sft from {ckpt}" in resumed.stderr
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, 61))


def test_metrics_have_one_row_per_step_after_a_resume(runs, tmp_path):
    """Killed 3+ steps after the checkpoint of step 10: the resumed run replays them, and their first rows go."""
    args = ["sft", *FAST, f"run.root={runs}", "run.name=kill", "stage.max_steps=30", "stage.save_every=10"]
    run_dir, log = runs / "kill", tmp_path / "rlhf.log"
    proc = _start(args, tmp_path, log)
    _wait_until(lambda: _rows(run_dir / "sft" / "metrics.jsonl") >= 13, proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = checkpoint_step(complete_checkpoints(run_dir / "sft" / "checkpoints")[-1])
    assert _rows(run_dir / "sft" / "metrics.jsonl") > newest  # rows of steps that run again
    resumed = rlhf(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming sft from {run_dir / 'sft' / 'checkpoints' / f'step-{newest}'}" in resumed.stderr
    assert [r["step"] for r in metrics(run_dir)] == [*range(1, 31), 30]  # the final evaluation shares step 30


def test_ctrl_c_at_the_terminal_of_a_self_launched_two_rank_run_waits_for_the_checkpoint(runs, tmp_path):
    """`launcher.nproc_per_node=2`: the terminal sends SIGINT to the foreground process group. The command must wait
    while both ranks finish the step and save (not return at once with the ranks still running), and exit 75."""
    args = [
        "sft",
        *FAST,
        f"run.root={runs}",
        "run.name=two",
        "stage.max_steps=200",
        "stage.save_every=0",
        "deepspeed=zero2",
        "launcher.nproc_per_node=2",
        f"launcher.master_port={free_port()}",
    ]
    run_dir, log = runs / "two", tmp_path / "rlhf.log"
    proc = _start(args, tmp_path, log, own_group=True)
    _wait_until(lambda: _rows(run_dir / "sft" / "metrics.jsonl") >= 2, proc, log)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at the terminal
    assert proc.wait(180) == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
    (ckpt,) = complete_checkpoints(run_dir / "sft" / "checkpoints")  # both ranks' shards written before the exit
    step = checkpoint_step(ckpt)
    assert 2 <= step < 200 and f"checkpoint saved at step {step}" in log.read_text()
    assert manifest(run_dir)["stages"]["sft"]["status"] == "preempted"
    assert sorted(p.name for p in ckpt.rglob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
