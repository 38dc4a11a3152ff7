"""scripts/slurm_multinode.sbatch as SLURM jobs on the single-host test cluster (tests/slurm/conftest.py), on the small
tiny model without GPUs (--gpus-per-node=0, gloo): two torchrun agents as two nodes with ZeRO-2, preempted by an
administrator's `scancel --signal=USR1`, requeued and resumed; the time-limit warning (what --signal=B:USR1@300 sends,
brought forward with `scancel --batch --signal=USR1`) on one node with two processes; the scripts' --signal line
honoured by SLURM when the time limit is brought near with `scontrol update`; no requeue after `scancel`, after a
failure, or past MAX_REQUEUES."""

import subprocess
import time

import pytest
from slurm_support import FAST, SCRIPTS, Job, job_env, manifest, nodes_option, steps, submit

pytestmark = pytest.mark.slurm

STEPS = 120  # about 5 s of training: the signal comes a few steps in, well before the end
CPU = ["--gpus-per-node=0"]  # the scripts' GPU default (8 a node) asked away: these nodes have none


def _overrides(runs, name, *extra):
    return " ".join(
        [*FAST, f"run.root={runs}", f"run.name={name}", f"stage.max_steps={STEPS}", "stage.save_every=0", *extra]
    )


def _checkpoint_steps(run_dir):
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "sft" / "checkpoints").glob("step-*"))


def test_two_nodes_zero2_preempted_by_an_administrators_usr1_requeue_and_resume(slurm_cluster, tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "two"
    env = job_env(STAGE="sft", OVERRIDES=_overrides(runs, "two", "deepspeed=zero2"), PROCS_PER_NODE="1")
    job = submit("slurm_multinode.sbatch", tmp_path, env, *nodes_option(slurm_cluster), *CPU, "--cpus-per-task=1")
    job.wait_until(lambda: len(steps(run_dir, "sft")) >= 3, "training steps")
    job.signal("--signal=USR1")  # an administrator's: every process of the job's steps, not the batch script
    assert job.wait_done() == "COMPLETED", job.tail()
    assert job.restarts == 1, job.tail()
    log = job.text()
    assert "2 torchrun agent(s) x 1 process(es)" in log and "x 2 rank(s)" in log, log
    if len(slurm_cluster) >= 2:
        assert f"on {slurm_cluster[0].rsplit('-', 1)[0]}-[1-2]" in log, log  # two nodes, one agent each
    assert "USR1: the training step" not in log  # it did not go through the batch script's trap
    assert "stopped by SIGUSR1" in log and "training step ended with exit code 75" in log, log
    assert "requeueing job" in log and "(requeue 1 of at most 10)" in log and "requeued 1 times" in log, log
    assert "resuming sft from" in log and "sft completed" in log, log
    assert steps(run_dir, "sft") == list(range(1, STEPS + 1))  # every step once: the resume went on from the checkpoint
    record = manifest(run_dir)["stages"]["sft"]
    assert record["status"] == "completed" and "/checkpoints/step-" in record["resumed_from"]
    assert (run_dir / "sft" / "logs" / "rank-1.log").is_file()  # the second node's rank


def test_the_time_limit_warning_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "warned"
    env = job_env(STAGE="sft", OVERRIDES=_overrides(runs, "warned", "deepspeed=zero2"), PROCS_PER_NODE="2")
    job = submit("slurm_multinode.sbatch", tmp_path, env, "--nodes=1", *CPU, "--cpus-per-task=2")
    job.wait_until(lambda: len(steps(run_dir, "sft")) >= 3, "training steps")
    job.signal("--batch", "--signal=USR1")  # what --signal=B:USR1@300 makes SLURM send 5 minutes before the limit
    assert job.wait_done() == "COMPLETED", job.tail()
    assert job.restarts == 1, job.tail()
    log = job.text()
    assert "1 torchrun agent(s) x 2 process(es)" in log and "x 2 rank(s)" in log, log
    assert "USR1: the training step saves a checkpoint and stops" in log, log
    assert "requeueing job" in log and "resuming sft from" in log and "sft completed" in log, log
    assert steps(run_dir, "sft") == list(range(1, STEPS + 1))
    assert manifest(run_dir)["stages"]["sft"]["status"] == "completed"


def test_slurm_sends_the_scripts_time_limit_warning_to_the_batch_script(slurm_cluster, tmp_path):
    """The scripts' `#SBATCH --signal=B:USR1@300` as SLURM reads it: once the time limit is brought within 5 minutes
    (`scontrol update TimeLimit=5`), SLURM sends USR1 to the batch script (its time-limit check runs every 30 s)."""
    lines = {
        p.name: [ln for ln in p.read_text().splitlines() if ln.startswith("#SBATCH --signal")]
        for p in (SCRIPTS / "slurm_multinode.sbatch", SCRIPTS / "slurm_pipeline.sbatch")
    }
    assert list(lines.values()) == [["#SBATCH --signal=B:USR1@300"]] * 2, lines
    script = tmp_path / "warned.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --signal=B:USR1@300\n#SBATCH --time=30\n"
        "trap 'echo \"USR1 after $SECONDS s\"; exit 0' USR1\necho started\n"
        "while true; do sleep 0.2; done\n"
    )
    res = subprocess.run(
        ["sbatch", "--parsable", "-o", str(tmp_path / "warned.out"), str(script)],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    job = Job(res.stdout.strip(), tmp_path / "warned.out")
    job.wait_until(lambda: "started" in job.text(), "the script's start")
    time.sleep(1)  # the warning is due as soon as fewer than 300 s are left
    subprocess.run(["scontrol", "update", f"JobId={job.id}", "TimeLimit=5"], check=True)
    job.wait_until(lambda: "USR1 after" in job.text(), "USR1", timeout=60)
    assert job.wait_done() == "COMPLETED", job.tail()


def test_no_requeue_after_scancel_after_a_failure_or_past_max_requeues(slurm_cluster, tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "stops"
    env = job_env(STAGE="sft", OVERRIDES=_overrides(runs, "stops"), PROCS_PER_NODE="1")
    one_node = ["--nodes=1", *CPU, "--cpus-per-task=1"]
    # 1. Cancelled outright: SIGTERM to the steps and the batch script; the rank still saves a checkpoint (KillWait).
    job = submit("slurm_multinode.sbatch", tmp_path, env, *one_node)
    job.wait_until(lambda: len(steps(run_dir, "sft")) >= 3, "training steps")
    job.signal()
    assert job.wait_done() == "CANCELLED", job.tail()
    assert job.restarts == 0 and "requeueing" not in job.text(), job.tail()
    assert "SIGTERM (scancel or the time limit)" in job.text(), job.tail()
    assert manifest(run_dir)["stages"]["sft"]["status"] == "preempted" and _checkpoint_steps(run_dir)
    # 2. A failure: the same run with another config, whose resume is refused before the stage starts. The record
    # still says `preempted` (from the try above), which must not read as a preemption of this try.
    failing = job_env(
        STAGE="sft", OVERRIDES=_overrides(runs, "stops", "data.source=/nonexistent.jsonl"), PROCS_PER_NODE="1"
    )
    job = submit("slurm_multinode.sbatch", tmp_path, failing, *one_node)
    assert job.wait_done() == "FAILED", job.tail()
    assert job.restarts == 0 and "requeueing" not in job.text(), job.tail()
    assert job.info()["ExitCode"] != "75:0", job.tail()
    assert manifest(run_dir)["stages"]["sft"]["status"] == "preempted"
    # 3. Preempted once more with no requeue left (MAX_REQUEUES=0): it ends FAILED with exit code 75 and says so.
    saved = _checkpoint_steps(run_dir)[-1]
    job = submit("slurm_multinode.sbatch", tmp_path, dict(env, MAX_REQUEUES="0"), *one_node)
    job.wait_until(
        lambda: "resuming sft from" in job.text() and max(steps(run_dir, "sft"), default=0) >= saved + 3,
        "training steps after the resume",
    )
    job.signal("--batch", "--signal=USR1")
    assert job.wait_done() == "FAILED", job.tail()
    assert job.restarts == 0 and job.info()["ExitCode"] == "75:0", job.tail()
    assert "not requeued, the job was requeued 0 times (MAX_REQUEUES=0)" in job.text(), job.tail()
    assert manifest(run_dir)["stages"]["sft"]["status"] == "preempted" and _checkpoint_steps(run_dir)[-1] > saved
