"""Starting the ranks: `launcher.nproc_per_node=N` makes `rlhf` run itself under torchrun; the usual
launchers (`torchrun -m rlhf_cli`, the `deepspeed` launcher, srun + torchrun) work without it.
Also: per-rank log files, so the output of ranks other than 0 is kept but does not flood the console."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from rlhf_cli.preempt import PREEMPTED_EXIT_CODE

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_launcher() -> bool:
    return all(k in os.environ for k in LAUNCHER_ENV)


def strip_local_rank(args: list[str]) -> list[str]:
    """The `deepspeed` launcher appends `--local_rank=N`; take it into LOCAL_RANK and drop it from the overrides."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg == "--local_rank" and i + 1 < len(args):
            os.environ.setdefault("LOCAL_RANK", args[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def torchrun_command(launcher: Any, stage: str, args: list[str]) -> list[str]:
    """torchrun's command line for a self-launch; one node uses --standalone (a free local port)."""
    if launcher.nnodes == 1:
        where = ["--standalone"]
    else:
        where = [
            f"--nnodes={launcher.nnodes}",
            f"--node_rank={launcher.node_rank}",
            f"--master_addr={launcher.master_addr}",
            f"--master_port={launcher.master_port}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={launcher.nproc_per_node}",
        *where,
        # Forward USR1 too (SLURM's usual warning signal) and give the ranks time to save a checkpoint.
        "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown_timeout=600",
        "-m",
        "rlhf_cli",
        stage,
        *args,
    ]


# What the parent passes on to torchrun, which passes them on to the ranks (torchrun_command's --signals_to_handle).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGQUIT)


def self_launch(launcher: Any, stage: str, args: list[str], manifest: Path) -> int:
    """Run the stage under torchrun and wait for it, whatever signal comes: SIGTERM / SIGUSR1 / Ctrl-C sent to this
    process are passed to torchrun, which forwards them to the ranks, so preemption and Ctrl-C work as with a
    direct launch, and the command returns only once the ranks have saved and stopped (`wait_forwarding`).
    Returns the exit code: PREEMPTED_EXIT_CODE when the ranks stopped with a checkpoint (preemption or the first
    Ctrl-C), 130 when a Ctrl-C stopped them at once."""
    rc = wait_forwarding(torchrun_command(launcher, stage, args))
    status = _stage_status(manifest, stage) if rc != 0 else None
    return {"preempted": PREEMPTED_EXIT_CODE, "interrupted": 130}.get(status, rc)


def wait_forwarding(command: list[str]) -> int:
    """Run `command` in a session of its own and return its exit code, passing every FORWARDED signal this process
    gets on to it once (also one that comes before it has started). Its own session: a Ctrl-C at the terminal
    reaches this process only, which passes each one on once (in the terminal's process group the child would get it
    twice, and a stage takes the second Ctrl-C as "stop at once, without a checkpoint")."""
    child: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if child:
            child[0].send_signal(signum)
        else:
            pending.append(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        child.append(subprocess.Popen(command, start_new_session=True))
        for signum in pending:
            child[0].send_signal(signum)
        return child[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stage_status(manifest: Path, stage: str) -> str | None:
    try:
        return json.loads(manifest.read_text())["stages"][stage]["status"]
    except (OSError, ValueError, KeyError):
        return None


def redirect_rank_output(log_dir: Path, rank: int) -> Path:
    """Send this rank's stdout and stderr (Python and C level) to `log_dir/rank-N.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"rank-{rank}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path
