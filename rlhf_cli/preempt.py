"""Preemption: SLURM (and most schedulers) send SIGTERM or SIGUSR1 some time before they kill or requeue a
job. The handler only sets a flag; the training loop asks all ranks at the next step boundary
(`engine.any_rank`), they save one checkpoint together and the process exits with PREEMPTED_EXIT_CODE.
Re-running the same command (or the requeued job) resumes from that checkpoint.

Ctrl-C (SIGINT) during the training loop is the same request (`ctrl_c_saves`); a second Ctrl-C stops at once. Outside
the loop (loading, final evaluation, export) Ctrl-C stops at once, and cli.py `after_ctrl_c` says where the next run
starts."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from rlhf_cli.errors import UserError

# EX_TEMPFAIL from sysexits.h: "try again later". Batch scripts requeue on it (scripts/slurm_multinode.sbatch).
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # for the whole run; SIGINT only inside `ctrl_c_saves`

_received: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)  # nothing else: the loop acts at a step boundary, where state is consistent


def _ctrl_c(signum: int, frame: FrameType | None) -> None:
    if signal.SIGINT in _received:
        raise KeyboardInterrupt  # the second Ctrl-C: stop now, as users expect, without a new checkpoint
    _received.append(signum)
    try:
        print(
            "\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once, without one)",
            file=sys.stderr,
            flush=True,
        )
    except RuntimeError:  # the signal came in the middle of a write to stderr; the notice is only a courtesy
        pass


_stopped_while_loading: list[int] = []


def _ctrl_c_loading(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C outside the loop: stop at once. Remembered too, because a library may swallow the KeyboardInterrupt
    (a bare `except:` around an optional import while DeepSpeed or a model loads): `ctrl_c_saves` then stops the run
    before its first step instead of training on as if nothing had been pressed."""
    _stopped_while_loading.append(signum)
    raise KeyboardInterrupt


_early: list[bool] = []


def record_early() -> None:
    """The first thing `python -m rlhf_cli` does: TERM and USR1 are only recorded from then on. A scheduler may signal a
    stage before it has composed its config and opened its run (`install`), or `rlhf pipeline` before it starts the
    next stage: the stage then stops with a checkpoint at its first step boundary, the pipeline before that stage,
    both with PREEMPTED_EXIT_CODE, instead of dying of the default action (and not being requeued). Commands that
    train nothing take the default actions back with `release_early`."""
    _early.append(True)
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def release_early() -> None:
    """TERM and USR1 act by default again (a command that trains nothing), and one recorded since `record_early`
    acts now. Nothing where `record_early` was not called (a caller's own `cli.main([...])`)."""
    if not _early:
        return
    _early.clear()
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    for signum in _received[:1]:
        os.kill(os.getpid(), signum)


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    signal.signal(signal.SIGINT, _ctrl_c_loading)


@contextmanager
def ctrl_c_saves() -> Iterator[None]:
    """Inside: SIGINT asks for a checkpoint at the next step boundary, like SIGTERM. Torchrun starts every rank in a
    session of its own and forwards SIGINT to each once; ranks started by hand from a shell all get it from the
    terminal. Only inside the loop: before it there is nothing to save, after it the stage is nearly done."""
    if _stopped_while_loading:
        raise KeyboardInterrupt  # pressed while loading, and the first one was swallowed on the way here
    previous = signal.signal(signal.SIGINT, _ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def requested() -> bool:
    return bool(_received)


def signal_name() -> str:
    """What asked this rank to stop, as messages name it: `Ctrl-C (SIGINT)`, `SIGTERM`, ...; "" if nothing did."""
    if not _received:
        return ""
    return "Ctrl-C (SIGINT)" if _received[0] == signal.SIGINT else signal.Signals(_received[0]).name


class Preempted(UserError):
    """Raised after the preemption checkpoint is committed; the CLI exits with PREEMPTED_EXIT_CODE."""

    exit_code = PREEMPTED_EXIT_CODE
