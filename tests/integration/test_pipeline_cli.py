"""`rlhf pipeline` end to end on the tiny model: sft -> rm -> ppo -> eval killed (SIGKILL) during rm and resumed by the
same command, re-run skipping every completed stage, a changed config of a completed stage refused with the way out;
sft -> dpo -> eval stopped by SIGUSR1 (exit 75) and finished by the same command."""

import json
import signal
import subprocess
import sys
import time

from conftest import FAST, manifest, rlhf

from rlhf_cli.files import complete_checkpoints
from rlhf_cli.preempt import PREEMPTED_EXIT_CODE

SMALL_PPO = [
    "stage.rollout_batch_size=8",
    "stage.ppo_epochs=1",
    "stage.generation.max_new_tokens=8",
    "stage.eval_batch_size=8",
    "data.eval_fraction=0.04",
    "stage.max_steps=2",
]
EVAL = ["stage.max_prompts=8", "stage.kl_samples=2", "stage.generation.max_new_tokens=8"]


def _pipeline_file(tmp_path, stages: dict[str, list[str]]):
    path = tmp_path / "chain.yaml"
    path.write_text(json.dumps({"stages": list(stages), "overrides": stages}))  # JSON is YAML
    return f"pipeline={path}"


def _start(args, cwd, log):
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)


def _wait_until(ready, proc, log, timeout=240):
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _rows(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_chain_killed_during_rm_resumes_then_skips_then_refuses_a_changed_stage(runs, tmp_path):
    chain = _pipeline_file(
        tmp_path,
        {
            "sft": [*FAST, "stage.max_steps=20", "stage.save_every=0"],
            "rm": [*FAST, "stage.max_steps=12", "stage.save_every=3"],
            "ppo": [*FAST, *SMALL_PPO],
            "eval": EVAL,
        },
    )
    args = ["pipeline", chain, f"run.root={runs}", "run.name=chain", "logging.progress=false"]
    run_dir, log = runs / "chain", tmp_path / "first.log"
    proc = _start(args, tmp_path, log)
    # 1. SIGKILL of the whole job (the rm stage and the pipeline) once rm has a checkpoint.
    _wait_until(
        lambda: complete_checkpoints(run_dir / "rm" / "checkpoints") and _rows(run_dir / "rm" / "metrics.jsonl") >= 4,
        proc,
        log,
    )
    rm_pid = int((run_dir / ".lock").read_text().split()[1])  # the stage process holds the run's lock
    for pid in (rm_pid, proc.pid):
        subprocess.run(["kill", "-9", str(pid)], check=False)
    proc.wait(60)
    assert manifest(run_dir)["stages"]["sft"]["status"] == "completed"
    # 2. The same command: sft skipped, rm resumed from its checkpoint, then ppo and eval.
    res = rlhf(*args, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    out = res.stdout + res.stderr
    assert "sft (skipped: completed with this config)" in out and "rm (resumes)" in out and "resuming rm from" in out
    stages = manifest(run_dir)["stages"]
    assert all(stages[s]["status"] == "completed" for s in ("sft", "rm", "ppo", "eval"))
    assert "pipeline summary" in out and "held-out evaluation" in out and (run_dir / "eval" / "eval.json").is_file()
    # 3. Again: nothing to do.
    res = rlhf(*args, cwd=tmp_path)
    assert res.returncode == 0 and all(f"{s} (skipped" in res.stderr + res.stdout for s in ("sft", "rm", "ppo", "eval"))
    # 4. A changed rm: refused before anything runs, with the override that re-runs it.
    res = rlhf(*args, "rm.stage.max_steps=13", cwd=tmp_path)
    assert res.returncode == 2 and "stage `rm` of run `chain` was completed with another config" in res.stderr
    assert "`rm.run.overwrite=true`" in res.stderr and "Traceback" not in res.stderr


def test_sigusr1_stops_the_pipeline_with_exit_75_and_the_same_command_finishes(runs, tmp_path):
    chain = _pipeline_file(
        tmp_path,
        {"sft": [*FAST, "stage.max_steps=40", "stage.save_every=0"], "dpo": [*FAST, "stage.max_steps=3"], "eval": EVAL},
    )
    args = ["pipeline", chain, f"run.root={runs}", "run.name=usr1", "logging.progress=false"]
    run_dir, log = runs / "usr1", tmp_path / "first.log"
    proc = _start(args, tmp_path, log)
    _wait_until(lambda: _rows(run_dir / "sft" / "metrics.jsonl") >= 3, proc, log)
    proc.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit, sent to the job's main process
    assert proc.wait(120) == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
    assert manifest(run_dir)["stages"]["sft"]["status"] == "preempted"
    res = rlhf(*args, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    assert "resuming sft from" in res.stderr
    results = json.loads((run_dir / "eval" / "eval.json").read_text())["results"]
    assert list(results) == ["reference", "sft", "dpo"] and results["dpo"]["kl"] > 0
