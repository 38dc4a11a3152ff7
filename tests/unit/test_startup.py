"""Start-up: a refused stage and `rlhf explain` answer without loading the libraries they do not need, and DeepSpeed's
build notice is dropped while everything else it prints is kept. These check what is imported, not how long it takes
(`make bench` times the start-up)."""

import fcntl
import json
import os
import subprocess
import sys

import pytest
import torch

from rlhf_cli.errors import UserError

HEAVY = ("torch", "transformers", "deepspeed", "peft")
# Runs the CLI in a fresh interpreter, then names the heavy libraries it imported.
PROBE = f"""
import sys
from rlhf_cli.cli import main
code = main(sys.argv[1:])
print("LOADED", *[m for m in {HEAVY!r} if m in sys.modules])
sys.exit(code)
"""


def run_cli(args: list[str], cwd) -> tuple[int, set[str], str]:
    """(exit code, heavy libraries imported, stderr) of `rlhf <args>` in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, env=env)
    loaded = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("LOADED")]
    assert loaded, res.stderr
    return res.returncode, set(loaded[-1]), res.stderr


@pytest.fixture
def run_root(tmp_path):
    root = tmp_path / "runs" / "x"
    root.mkdir(parents=True)
    return root


def test_completed_stage_is_refused_before_any_heavy_import(run_root):
    (run_root / "manifest.json").write_text(json.dumps({"run": "x", "stages": {"sft": {"status": "completed"}}}))
    code, loaded, err = run_cli(["sft", f"run.root={run_root.parent}", "run.name=x"], run_root)
    assert code == 2 and "already complete" in err and not loaded


def test_run_in_use_is_refused_before_any_heavy_import(run_root):
    with open(run_root / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 1 on test-host")
        lock.flush()
        code, loaded, err = run_cli(["sft", f"run.root={run_root.parent}", "run.name=x"], run_root)
    assert code == 2 and "in use by pid 1 on test-host" in err and not loaded


def test_explain_of_an_offline_stage_loads_no_heavy_library(run_root):
    # The built-in model's parameters are counted from its config (models/shapes.py), not a meta-device model.
    code, loaded, err = run_cli(["explain", "sft", f"run.root={run_root.parent}"], run_root)
    assert code == 0, err
    assert not loaded


def test_explain_with_lora_builds_the_meta_model_with_peft(run_root):
    code, loaded, err = run_cli(["explain", "sft", f"run.root={run_root.parent}", "model.lora.enabled=true"], run_root)
    assert code == 0, err
    assert loaded == {"torch", "transformers", "peft"}  # no DeepSpeed


def test_joining_the_cpu_process_group_builds_no_cpp_op(tmp_path):
    """DeepSpeed's shm all-reduce op (AutoTP inference only) is neither compiled nor loaded on CPU: with an empty
    extension cache and no C++ compiler on the PATH the group still starts, and the cache stays empty."""
    code = (
        "from rlhf_cli import engine; import deepspeed.comm.comm as c; engine.init_distributed(); "
        "assert c.cdb.shm_comm_op is None, c.cdb.shm_comm_op; engine.shutdown()"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "CXX")}
    bin_dir = tmp_path / "bin"  # the interpreter alone: no c++, g++ or ninja
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PATH=str(bin_dir))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "built successfully" not in res.stdout + res.stderr
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").rglob("*.so"))


def test_offload_without_a_compiler_is_one_clear_message(monkeypatch):
    from rlhf_cli import engine

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    config = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "optimizer": {"params": {}}}
    with pytest.raises(UserError, match=r"deepspeed.offload_optimizer=true .*no C\+\+ compiler was found"):
        engine.initialize(None, config, None, 1)  # with a GPU: DeepSpeed's CPU Adam, compiled on first use


def test_offload_on_a_cpu_only_host_steps_with_torch_adamw_and_needs_no_compiler(monkeypatch):
    from rlhf_cli import engine
    from rlhf_cli.config.compose import compose

    cfg = compose("sft", ["deepspeed=zero3_offload"])
    config = engine.ds_config(cfg.deepspeed, cfg.optim, 1, 1, 1)
    assert config["zero_optimization"]["offload_optimizer"] and config["optimizer"]["params"]["torch_adam"] is True
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    calls = []
    monkeypatch.setattr(engine.deepspeed, "initialize", lambda **kw: calls.append(kw) or (None, None, None, None))
    engine.initialize(torch.nn.Linear(2, 2), config, cfg.optim, 1)  # no compiler asked for
    assert len(calls) == 1


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_explain_of_an_online_stage_counts_prompts_without_torch(stage, run_root):
    # Counting the prompts the stage keeps needs the tokenizer; the built-in one loads without AutoTokenizer, whose
    # config classes import torch (models/tokenizer.py).
    code, loaded, err = run_cli(["explain", stage, f"run.root={run_root.parent}"], run_root)
    assert code == 0, err
    assert loaded == {"transformers"}


# `rlhf generate` / `rlhf score` as the program (sys.argv, main()): a module-level object's finaliser stands for the
# interpreter's teardown, an exit handler for what must still run.
EXIT_PROBE = """
import atexit, sys
from rlhf_cli.cli import main

class Teardown:
    def __del__(self):
        print("TEARDOWN", file=sys.stderr, flush=True)

witness = Teardown()
atexit.register(lambda: print("HANDLER", file=sys.stderr, flush=True))
sys.argv = ["rlhf", *sys.argv[1:]]
sys.exit(main(None if sys.argv[1] != "in-process" else sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("args", "teardown"),
    [(["generate"], False), (["score"], False), (["explain", "sft"], True), (["in-process", "generate"], True)],
)
def test_read_only_tools_skip_the_interpreter_teardown_but_run_the_exit_handlers(tmp_path, args, teardown):
    """generate / score end without the module teardown (about 0.8 s after importing torch and transformers); their exit
    handlers and output still happen. Other commands, and main([...]) called by a program, end as usual."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    tool = [f"root={tmp_path}", "run=missing", "prompt=hi", *(["response=hello"] if "score" in args else [])]
    cli = [*args, *(tool if "explain" not in args else [f"run.root={tmp_path}"])]
    res = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, *cli], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    if "explain" in args:
        assert res.returncode == 0 and "sft" in res.stdout, res.stderr
    else:  # refused before any model: the error line is flushed out before the process ends
        assert res.returncode == 2 and "error:" in res.stderr and "missing" in res.stderr, res.stderr
    assert "HANDLER" in res.stderr
    assert ("TEARDOWN" in res.stderr) is teardown, res.stderr
