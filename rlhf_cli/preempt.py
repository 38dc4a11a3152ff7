"""Preemption: SLURM (and most schedulers) send SIGTERM or SIGUSR1 some time before they kill or requeue a
job. The handler only sets a flag; the training loop asks all ranks at the next step boundary
(`engine.any_rank`), they save one checkpoint together and the process exits with PREEMPTED_EXIT_CODE.
Re-running the same command (or the requeued job) resumes from that checkpoint."""

from __future__ import annotations

import signal
from types import FrameType

from rlhf_cli.errors import UserError

# EX_TEMPFAIL from sysexits.h: "try again later". Batch scripts requeue on it (scripts/slurm_multinode.sbatch).
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)  # nothing else: the loop acts at a step boundary, where state is consistent


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def requested() -> bool:
    return bool(_received)


def signal_name() -> str:
    return signal.Signals(_received[0]).name if _received else ""


class Preempted(UserError):
    """Raised after the preemption checkpoint is committed; the CLI exits with PREEMPTED_EXIT_CODE."""

    exit_code = PREEMPTED_EXIT_CODE
