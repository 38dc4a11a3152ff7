"""Which rollout engine runs (`rollout.engine`), decided without torch so `rlhf explain` and a stage's start line
say the same thing (docs/rollout-engines.md)."""

from __future__ import annotations

import importlib.util

from rlhf_cli.errors import UserError

INSTALL_VLLM = (
    "install it with `make install-vllm` (its own venv, .venv-vllm, with the versions vLLM needs) or "
    "`pip install -e '.[vllm]'`, or use rollout.engine=hf"
)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(requested: str, gpu: bool) -> tuple[str, str]:
    """(the engine that runs, why): `hf` and `vllm` as asked (vllm not installed: a UserError saying how to install
    it); `auto` takes vllm when it is installed and a GPU is visible (`gpu`), else hf."""
    if requested == "hf":
        return "hf", "rollout.engine=hf"
    installed = vllm_installed()
    if requested == "vllm":
        if not installed:
            raise UserError(f"rollout.engine=vllm, but vllm is not installed: {INSTALL_VLLM}")
        return "vllm", "rollout.engine=vllm"
    if not installed:
        return "hf", "rollout.engine=auto: vllm not installed, using hf"
    if not gpu:
        return "hf", "rollout.engine=auto: no GPU (vllm on a CPU is not faster than hf), using hf"
    return "vllm", "rollout.engine=auto: vllm installed and a GPU visible"
