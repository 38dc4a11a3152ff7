"""What an in-process vLLM engine does to the process it shares with the trainer, undone (rollout/vllm_engine.py):
its start-up re-seeds the global RNGs and replaces `torch.set_num_threads`; its teardown destroys the default
process group, which is the trainer's."""

from __future__ import annotations

import contextlib
import random
import weakref
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def fenced_process_state() -> Iterator[None]:
    """vLLM's start-up seeds Python's, numpy's and torch's global RNGs and replaces `torch.set_num_threads` (its
    CPU worker): in the training process both would change what the trainer does next. Put them back."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)


def own_teardown(llm: Any) -> Any:
    """Replace vLLM's teardown of its in-process engine (when collected, at exit) by one that leaves the default
    process group alone: vLLM's destroys it, and here it is the trainer's (in use, or gone already: "Invalid
    process group specified" at exit). Returns the finalizer (call it to shut down now)."""
    client = llm.llm_engine.engine_core  # InprocClient: `_finalizer` runs EngineCore.shutdown
    client._finalizer.detach()
    client._finalizer = weakref.finalize(client, _shutdown_keeping_groups, client.engine_core)
    return client._finalizer


def _shutdown_keeping_groups(core: Any) -> None:
    """EngineCore.shutdown (executor, scheduler, vLLM's own process groups, memory) without destroying the default
    process group, and without failing on vLLM's groups when the trainer has already left the default one."""
    destroy = torch.distributed.destroy_process_group

    def vllm_groups_only(group: Any = None) -> None:
        if group is not None and torch.distributed.is_initialized():
            with contextlib.suppress(ValueError):  # a group torch already dropped
                destroy(group)

    torch.distributed.destroy_process_group = vllm_groups_only
    try:
        core.shutdown()
    finally:
        torch.distributed.destroy_process_group = destroy
