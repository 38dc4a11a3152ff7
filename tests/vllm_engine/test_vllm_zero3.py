"""ZeRO-3 on 2 ranks with vLLM rollouts (tests/vllm_engine/zero3_vllm_check.py under torchrun; `make test-vllm`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# A submodule, not `vllm` itself: where tests/ is on sys.path (pytest's rootdir conftest), this folder is a
# namespace package named `vllm` that `import vllm` finds when vLLM is not installed.
pytest.importorskip(
    "vllm.sampling_params", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm"
)


def test_zero3_ranks_generate_with_gathered_weights(tmp_path):
    """Parameters partitioned (persistence threshold 0); each rank's vLLM gets the gathered weights, its greedy ids
    equal one unpartitioned process's, and after an optimizer step they equal the stepped engine's."""
    script = Path(__file__).with_name("zero3_vllm_check.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "ZERO3-VLLM OK rank 0" in res.stdout and "ZERO3-VLLM OK rank 1" in res.stdout
