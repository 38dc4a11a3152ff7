"""Helpers for end-to-end runs of the `rlhf` CLI in its own process, on a smaller tiny model."""

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from filelock import FileLock

# The environment pytest started with, taken before this process imports torch. Libraries that the tests import here
# add to os.environ (TORCHINDUCTOR_CACHE_DIR, for one), which a user's shell would not pass to `rlhf`.
_START_ENV = dict(os.environ)

from safetensors.torch import load_file  # noqa: E402

# A 2-layer, 64-wide Llama: the same code path as the default, a few times faster.
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
    "logging.plots=false",  # the PNG costs about 0.5 s a stage; test_runs_plot_cli checks it with plots on
    "optim.lr=3e-3",
]


def sft_rm_base(root: Path) -> Path:
    """A run `base` under `root` with short `sft` and `rm` stages on the FAST model, for online stages to copy."""
    for stage, steps in (("sft", 20), ("rm", 10)):
        res = rlhf(
            stage,
            *FAST,
            f"run.root={root}",
            "run.name=base",
            f"stage.max_steps={steps}",
            "stage.save_every=0",
            cwd=root,
        )
        assert res.returncode == 0, res.stderr
    return root / "base"


def copy_run(base: Path, runs: Path, name: str, stage: str) -> list[str]:
    """Copy the run `base` to `runs/name` without `stage`'s folder; the run-name overrides of the copy."""
    shutil.copytree(base, runs / name, ignore=shutil.ignore_patterns(stage, ".lock"))
    return [f"run.root={runs}", f"run.name={name}"]


def _cli_env() -> dict:
    env = dict(_START_ENV, PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


class _Zygote:
    """tests/integration/zygote.py, started on the first CLI call: each call is a fork of a process that has already
    imported torch, transformers and DeepSpeed, which takes about 5 s of the 5-15 s of every call here. Off with
    RLHF_TEST_ZYGOTE=0."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.log = Path(tempfile.mkdtemp(prefix="rlhf-zygote-"))
        atexit.register(shutil.rmtree, self.log, ignore_errors=True)

    def start(self, env: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("zygote.py"))],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(self.log / "zygote.err").open("w"),
            bufsize=0,  # unbuffered: a select on the pipe must not miss a line already read into a buffer
        )
        atexit.register(self.proc.kill)

    def _line(self, deadline: float | None) -> str | None:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([self.proc.stdout], [], [], wait)[0]:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote ended; its stderr: {(self.log / 'zygote.err').read_text()[-3000:]}")
        return line.decode()

    def run(
        self, args: tuple[str, ...], cwd: Path, env: dict, timeout: float, ranks: list[dict] | None = None
    ) -> subprocess.CompletedProcess:
        """`rlhf ARGS` in a forked child; with `ranks` (per rank: its extra environment), one child per rank, whose
        outputs come back rank after rank and whose exit code is the first non-zero one."""
        if self.proc is None or self.proc.poll() is not None:
            self.start(env)
        files = [(self.log / f"out{i}", self.log / f"err{i}") for i in range(len(ranks or [None]))]
        request = {"argv": list(args), "cwd": str(cwd), "env": env, "out": str(files[0][0]), "err": str(files[0][1])}
        if ranks:
            pairs = zip(ranks, files, strict=True)
            request["ranks"] = [{"env": extra, "out": str(o), "err": str(e)} for extra, (o, e) in pairs]
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        pids = [int(p) for p in self._line(None).split()]
        codes = self._line(time.monotonic() + timeout)
        out = "".join(o.read_text() for o, _ in files)
        err = "".join(e.read_text() for _, e in files)
        if codes is None:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            self._line(None)
            raise subprocess.TimeoutExpired(["rlhf", *args], timeout, out, err)
        code = next((int(c) for c in codes.split() if int(c) != 0), 0)
        return subprocess.CompletedProcess(["rlhf", *args], code, out, err)


_ZYGOTE = _Zygote()


def rlhf(
    *args: str, cwd: Path, timeout: float = 300, env: dict | None = None, fresh: bool = False
) -> subprocess.CompletedProcess:
    """`python -m rlhf_cli ARGS` in `cwd`, with pytest's starting environment plus `env`: its exit code, stdout and
    stderr. A fork of the zygote (above); a new interpreter with `fresh`, or where `env` adds variables (some are read
    at import)."""
    full = dict(_cli_env(), **(env or {}))
    if not (fresh or env or os.environ.get("RLHF_TEST_ZYGOTE") == "0"):
        return _ZYGOTE.run(args, cwd, full, timeout)
    return subprocess.run(
        [sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout
    )


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def metrics(run_dir: Path, stage: str = "sft") -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(args: list[str], world_size: int, cwd: Path, port: int | None = None) -> list[subprocess.Popen]:
    """Start `world_size` ranks of `rlhf` by hand, the way any launcher does (RANK, WORLD_SIZE, ...)."""
    port = port or free_port()
    procs = []
    for rank in range(world_size):
        env = dict(
            _cli_env(),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "rlhf_cli", *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def ranks(args: list[str], cwd: Path, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=NPROC -m rlhf_cli ARGS` as the ranks see it (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR / MASTER_PORT, one thread each), forked from the zygote: NPROC processes joining one gloo
    group, without NPROC interpreter start-ups (about 5 s each). For tests of what several ranks compute; the
    launchers themselves (torchrun, `launcher.nproc_per_node`, the deepspeed launcher, signals through them) are tested
    with the real ones. stdout / stderr: the ranks', rank 0's first (ranks > 0 also write their run's rank-N.log)."""
    if os.environ.get("RLHF_TEST_ZYGOTE") == "0":
        return torchrun(["-m", "rlhf_cli", *args], cwd, nproc, timeout=timeout)
    shared = {
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    env = [{**shared, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(nproc)]
    return _ZYGOTE.run(tuple(args), cwd, _cli_env(), timeout, ranks=env)


def torchrun(args: list[str], cwd: Path, nproc: int = 2, extra: tuple[str, ...] = (), timeout: float = 300):
    env = _cli_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        *(extra or ("--standalone",)),
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def shared_run(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str]) -> Path:
    """The run directory of `rlhf ARGS` (run.name=demo under a root of its own), made once per test session even under
    pytest-xdist: the workers share the session's base folder, and a lock there makes the first that asks build it
    while the others wait. Tests copy it before they train on it."""
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent  # the folder above the workers' own
    root = base / f"shared-{name}"
    with FileLock(f"{root}.lock"):
        if not (root / "MADE").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            res = rlhf(*args, f"run.root={root}", "logging.progress=false", cwd=root, timeout=900)
            assert res.returncode == 0, res.stderr[-3000:]
            (root / "MADE").write_text("")
    return root / "demo"


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    """The default `rlhf sft` (the tiny model on the built-in sample: `make demo`'s first stage), for the learning
    tests."""
    return shared_run(tmp_path_factory, "sft", ["sft"])


@pytest.fixture(scope="session")
def sft_run_seed_2(tmp_path_factory) -> Path:
    """A second start for the learning tests: `rlhf sft seed=2`, the learning benchmark's seed-2 sft policy."""
    return shared_run(tmp_path_factory, "sft-seed-2", ["sft", "seed=2"])


def copy_start(sft_run: Path, tmp_path: Path) -> Path:
    """A copy of a shared sft run as `tmp_path/runs/demo`; returns the runs root."""
    runs = tmp_path / "runs"
    shutil.copytree(sft_run, runs / "demo", ignore=shutil.ignore_patterns(".lock"))
    return runs
