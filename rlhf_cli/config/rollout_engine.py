"""Which rollout engine runs (`rollout.engine`), decided without torch so `rlhf explain` and a stage's start line
say the same thing (docs/rollout-engines.md)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

from rlhf_cli.errors import UserError

INSTALL_VLLM = (
    "install it with `make install-vllm` (its own venv, .venv-vllm, with the versions vLLM needs) or "
    "`pip install -e '.[vllm]'`, or use rollout.engine=hf"
)


def vllm_installed() -> bool:
    """vLLM's package is importable (a folder named vllm without an __init__.py on sys.path is not it)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin not in (None, "namespace")


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


def gpu_visible() -> bool:
    """Whether a CUDA GPU is there: torch's answer once torch is loaded (the stages), else a look for the NVIDIA
    driver's tool without loading torch (`rlhf explain` answers in a fraction of a second)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].cuda.is_available()
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return shutil.which("nvidia-smi") is not None


def engine_lines(rollout_cfg: object) -> list[str]:
    """`rlhf explain`'s lines on the rollout engine: which runs and why, and what vLLM adds to the memory table."""
    name, why = choose_engine(rollout_cfg.engine, gpu_visible())
    lines = [f"rollout engine: {name} ({why})"]
    if name == "vllm":
        share = rollout_cfg.vllm_gpu_memory_utilization
        lines.append(
            f"  vllm: its copy of the policy's weights and its KV cache take up to {share:g} of each GPU's memory "
            "(rollout.vllm_gpu_memory_utilization), on top of the table above"
        )
    return lines
