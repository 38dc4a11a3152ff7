"""Submitting the sbatch scripts to the test cluster and watching the jobs (tests/slurm)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
VENV = REPO / ".venv"

# tests/integration/conftest.py FAST (not imported: every test folder's conftest is a module named `conftest`): a
# 2-layer, 64-wide Llama.
FAST = [
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=176",
    "model.tiny.num_hidden_layers=2",
    "model.tiny.num_attention_heads=4",
    "model.tiny.num_key_value_heads=2",
    "stage.micro_batch_size=4",
    "stage.gradient_accumulation_steps=2",
    "stage.eval_every=0",
    "logging.progress=false",
    "logging.plots=false",
    "optim.lr=3e-3",
]
FINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def job_env(**variables: str) -> dict[str, str]:
    """The environment sbatch passes to the job (--export=ALL): this one without launcher, SLURM and thread settings,
    plus `variables`."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "PYTEST_")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and not k.startswith(drop)
    }
    return dict(env, VENV=str(VENV), PYTHONUNBUFFERED="1", **variables)


@dataclass
class Job:
    id: str
    log: Path

    def info(self) -> dict[str, str]:
        res = subprocess.run(["scontrol", "-o", "show", "job", self.id], capture_output=True, text=True, check=True)
        return dict(re.findall(r"(\w+)=(\S*)", res.stdout))

    @property
    def state(self) -> str:
        return self.info()["JobState"]

    @property
    def restarts(self) -> int:
        return int(self.info()["Restarts"])

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log yet)"

    def tail(self) -> str:
        return f"job {self.id} {self.info().get('JobState')}; log {self.log}:\n" + self.text()[-4000:]

    def in_queue(self) -> bool:
        res = subprocess.run(["squeue", "-h", "-j", self.id, "-o", "%T"], capture_output=True, text=True)
        return bool(res.stdout.strip())

    def wait_until(self, ready, what: str, timeout: float = 180) -> None:
        """Poll `ready()` until it holds; fail, with the log, when the job ends first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not ready():
            state = self.state
            assert state not in FINAL, f"job ended ({state}) before {what}\n{self.tail()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s\n{self.tail()}"
            time.sleep(0.05)

    def wait_done(self, timeout: float = 300) -> str:
        """Wait until the job has ended for good (a final state, nothing left running); its state."""
        deadline = time.monotonic() + timeout
        while self.state not in FINAL or self.in_queue():
            assert time.monotonic() < deadline, f"job not done after {timeout:.0f} s\n{self.tail()}"
            time.sleep(0.2)
        return self.state

    def signal(self, *how: str) -> None:
        subprocess.run(["scancel", *how, self.id], check=True)


def submit(script: str, cwd: Path, env: dict[str, str], *options: str) -> Job:
    """`sbatch [options] scripts/<script>` from `cwd` (the job's SLURM_SUBMIT_DIR), its log in cwd/job-<id>.out."""
    res = subprocess.run(
        ["sbatch", "--parsable", "-o", str(cwd / "job-%j.out"), *options, str(SCRIPTS / script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    return Job(job_id, cwd / f"job-{job_id}.out")


def steps(run_dir: Path, stage: str) -> list[int]:
    """The training steps of `stage`'s metrics.jsonl, in file order (a row per optimizer step)."""
    path = run_dir / stage / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    return [r["step"] for r in rows if "loss" in r]


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def nodes_option(nodes: list[str]) -> list[str]:
    """Two torchrun agents: one on each of two nodes where the cluster has them, else two tasks of one node."""
    return ["--nodes=2", "--ntasks-per-node=1"] if len(nodes) >= 2 else ["--nodes=1", "--ntasks-per-node=2"]
