"""rlhf_cli/slurm.py: the SLURM job a stage records (from the environment SLURM sets) and shows in `rlhf runs`, and the
training step's outcome the batch scripts requeue on; the scripts themselves parse (bash -n) and agree with it."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from rlhf_cli import slurm
from rlhf_cli.preempt import PREEMPTED_EXIT_CODE
from rlhf_cli.run_dir import TIME_FORMAT

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_JOB_PARTITION": "gpu",
    "SLURM_JOB_NAME": "rlhf",
}


def test_no_job_outside_slurm():
    assert slurm.job({}) is None and slurm.job({"SLURM_JOB_ID": " "}) is None
    assert slurm.stage_fields({"job_id": "1", "runs": [0]}, {}) == {}


def test_the_job_and_its_restart_count_from_the_environment():
    assert slurm.job(JOB) == {
        "job_id": "4242",
        "restarts": 0,
        "nodes": "gpu[01-02]",
        "partition": "gpu",
        "name": "rlhf",
    }
    assert slurm.job({**JOB, "SLURM_RESTART_COUNT": "3"})["restarts"] == 3
    assert slurm.job({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "x"}) == {"job_id": "7", "restarts": 0}
    array = {**JOB, "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2"}
    assert slurm.job(array)["job_id"] == "4240_2"


def test_a_stage_counts_the_requeues_it_ran_through_in_one_job():
    first = slurm.stage_fields(None, JOB)["slurm"]
    assert first["runs"] == [0] and slurm.describe(first) == "slurm job 4242"
    again = slurm.stage_fields(first, {**JOB, "SLURM_RESTART_COUNT": "1"})["slurm"]
    assert again["runs"] == [0, 1] and again["restarts"] == 1
    assert slurm.describe(again) == "slurm job 4242, requeued 1 time"
    third = slurm.stage_fields(again, {**JOB, "SLURM_RESTART_COUNT": "3"})["slurm"]
    assert slurm.requeues(third) == 2 and slurm.describe(third) == "slurm job 4242, requeued 2 times"
    # A stage begun after an earlier stage's requeue was not requeued itself; another job starts the count again.
    assert slurm.describe(slurm.stage_fields(None, {**JOB, "SLURM_RESTART_COUNT": "2"})["slurm"]) == "slurm job 4242"
    other = slurm.stage_fields(third, {**JOB, "SLURM_JOB_ID": "5000"})["slurm"]
    assert other["runs"] == [0] and slurm.describe(other) == "slurm job 5000"


@pytest.mark.parametrize(
    "value",
    [None, "4242", [1], {}, {"job_id": ""}, {"job_id": "1", "runs": "x"}, {"job_id": "1", "runs": [True, "a", 0]}],
)
def test_a_hand_edited_slurm_record_reads_as_what_it_holds(value):
    text = slurm.describe(value)
    assert text in ("", "slurm job 1")
    assert slurm.stage_fields(value, JOB)["slurm"]["runs"] == [0]


def _run(tmp_path: Path, status: str, ended: float) -> list[str]:
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    stamp = time.strftime(TIME_FORMAT, time.localtime(ended))
    record = {"status": status, "ended_at": stamp}
    (run_dir / "manifest.json").write_text(json.dumps({"run": "r", "stages": {"sft": record}}))
    return [f"run.root={tmp_path / 'runs'}", "run.name=r"]


def test_outcome_is_75_only_for_a_preemption_recorded_during_the_step(tmp_path):
    now = time.time()
    overrides = _run(tmp_path, "preempted", now)
    assert slurm.outcome(1, "sft", overrides, since=now - 5) == PREEMPTED_EXIT_CODE == slurm.PREEMPTED_EXIT_CODE
    assert slurm.outcome(0, "sft", overrides, since=now - 5) == 0
    # The record is from an earlier try of the job: this step failed before the stage started again.
    assert slurm.outcome(1, "sft", overrides, since=now + 5) == 1
    assert slurm.outcome(1, "rm", overrides, since=now - 5) == 1  # another stage
    assert slurm.outcome(2, "sft", ["not-an-override"], since=now - 5) == 2  # a config that does not compose


def test_outcome_of_a_failed_stage_and_of_a_run_that_does_not_exist(tmp_path):
    now = time.time()
    assert slurm.outcome(1, "sft", _run(tmp_path, "failed", now), since=now - 5) == 1
    assert slurm.outcome(1, "sft", [f"run.root={tmp_path}", "run.name=none"], since=now - 5) == 1


def test_main_prints_the_outcome_and_refuses_other_arguments(tmp_path, capsys):
    now = time.time()
    overrides = _run(tmp_path, "preempted", now)
    assert slurm.main(["outcome", "1", str(int(now) - 5), "sft", *overrides]) == 0
    assert capsys.readouterr().out.strip() == "75"
    assert slurm.main(["outcome", "x", "0", "sft"]) == 2 and slurm.main([]) == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["slurm_multinode.sbatch", "slurm_pipeline.sbatch", "slurm_cluster.sh"])
def test_the_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_the_sbatch_scripts_default_to_the_gpu_cluster_and_requeue_on_75_only():
    for name in ("slurm_multinode.sbatch", "slurm_pipeline.sbatch"):
        text = (SCRIPTS / name).read_text()
        for line in (
            "#SBATCH --gpus-per-node=8",
            "#SBATCH --cpus-per-task=32",
            "#SBATCH --signal=B:USR1@300",
            "#SBATCH --requeue",
            "PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}",
            "MAX_REQUEUES=${MAX_REQUEUES:-10}",
            '[ "$RESTARTS" -lt "$MAX_REQUEUES" ]',
            f'if [ "$rc" = {PREEMPTED_EXIT_CODE} ] && [ "$CANCELLED" = 0 ]',
        ):
            assert line in text, (name, line)


def test_the_test_clusters_config():
    res = subprocess.run(
        ["bash", str(SCRIPTS / "slurm_cluster.sh"), "config"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "SLURM_LOCAL_NODES": "1"},
    )
    assert res.returncode == 0, res.stderr
    conf = res.stdout
    for line in (
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "PartitionName=local Nodes=ALL Default=YES",
    ):
        assert line in conf.splitlines() or any(ln.startswith(line) for ln in conf.splitlines()), line
    nodes = [ln for ln in conf.splitlines() if ln.startswith("NodeName=")]
    host = subprocess.check_output(["hostname", "-s"], text=True).strip()
    assert len(nodes) == 1 and nodes[0].startswith(f"NodeName={host} "), nodes
