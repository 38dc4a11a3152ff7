"""scripts/slurm_pipeline.sbatch: `rlhf pipeline` (sft -> dpo -> eval on the small tiny model) as one SLURM job,
preempted in sft by the time-limit warning and in dpo (the middle stage) by an administrator's USR1, requeued twice,
finishing with every stage trained once and the same weights and evaluation as the same pipeline run uninterrupted
without SLURM; `rlhf runs` shows the job and the requeues of each stage."""

import json
import subprocess
import sys

import pytest
from slurm_support import FAST, job_env, manifest, steps, submit

pytestmark = pytest.mark.slurm

SFT_STEPS, DPO_STEPS = 80, 40
STAGES = {
    "sft": [*FAST, f"stage.max_steps={SFT_STEPS}", "stage.save_every=0"],
    "dpo": [*FAST, f"stage.max_steps={DPO_STEPS}", "stage.save_every=0"],
    "eval": ["stage.max_prompts=8", "stage.kl_samples=2", "stage.generation.max_new_tokens=8"],
}
THREADS = "2"  # both runs alike: the job's (its --cpus-per-task) and the uninterrupted run's


@pytest.fixture(scope="module")
def chain(slurm_cluster, tmp_path_factory):
    """The pipeline job, preempted twice, and the uninterrupted run: (job, its run dir, the uninterrupted run dir)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    spec = tmp / "chain.yaml"
    spec.write_text(json.dumps({"stages": list(STAGES), "overrides": STAGES}))  # JSON is YAML
    runs = tmp / "runs"
    args = f"pipeline={spec} run.root={runs} logging.progress=false"
    env = job_env(PIPELINE_ARGS=f"{args} run.name=job", PROCS_PER_NODE="1", MAX_REQUEUES="2", OMP_NUM_THREADS=THREADS)
    job = submit("slurm_pipeline.sbatch", tmp, env, "--gpus-per-node=0", "--cpus-per-task=2")
    run_dir = runs / "job"
    job.wait_until(lambda: len(steps(run_dir, "sft")) >= 3, "sft's training steps")
    job.signal("--batch", "--signal=USR1")  # the time-limit warning (--signal=B:USR1@300), brought forward
    job.wait_until(
        lambda: job.restarts == 1 and len(steps(run_dir, "dpo")) >= 3, "dpo's steps after a requeue", timeout=300
    )
    job.signal("--signal=USR1")  # an administrator's, to the job step (the pipeline and its stage)
    assert job.wait_done(timeout=400) == "COMPLETED", job.tail()
    ref = subprocess.run(
        [sys.executable, "-m", "rlhf_cli", "pipeline", *args.split(), "run.name=ref"],
        cwd=tmp,
        env=job_env(OMP_NUM_THREADS=THREADS),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    return job, run_dir, runs / "ref"


def test_pipeline_preempted_twice_requeued_finishes_like_an_uninterrupted_run(chain):
    from safetensors.torch import load_file

    job, run_dir, ref_dir = chain
    assert job.restarts == 2, job.tail()
    log = job.text()
    tries = log.split("requeueing job")
    assert len(tries) == 3, log  # two requeues, then the try that finished
    assert "USR1: the running stage saves a checkpoint and stops" in tries[0] and "stopped by SIGUSR1" in tries[0]
    assert "pipeline ended with exit code 75" in tries[0] and "pipeline ended with exit code 75" in tries[1], log
    # Each try skips what is done and resumes what was preempted; eval runs once, in the last.
    assert "sft (resumes) -> dpo (new) -> eval (new)" in tries[1], tries[1]
    assert "sft (skipped: completed with this config) -> dpo (resumes) -> eval (new)" in tries[2], tries[2]
    assert log.count("== rlhf sft") == 2 and log.count("== rlhf dpo") == 2 and log.count("== rlhf eval") == 1, log
    assert "pipeline ended with exit code 0" in tries[2] and "pipeline summary" in tries[2], log
    # Every stage trained once: each optimizer step once in its metrics, resumed from the preemption checkpoint.
    assert steps(run_dir, "sft") == list(range(1, SFT_STEPS + 1))
    assert steps(run_dir, "dpo") == list(range(1, DPO_STEPS + 1))
    records = manifest(run_dir)["stages"]
    assert all(records[s]["status"] == "completed" for s in STAGES), records
    assert "sft/checkpoints/step-" in records["sft"]["resumed_from"]
    assert "dpo/checkpoints/step-" in records["dpo"]["resumed_from"] and records["eval"]["resumed_from"] is None
    # The same result as the uninterrupted run with the same seed.
    for stage in ("sft", "dpo"):
        got, want = (load_file(str(d / stage / "final" / "model.safetensors")) for d in (run_dir, ref_dir))
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got), stage
    results = [json.loads((d / "eval" / "eval.json").read_text())["results"] for d in (run_dir, ref_dir)]
    assert results[0] == results[1]


def test_rlhf_runs_shows_each_stages_slurm_job_and_requeues(chain):
    job, run_dir, _ = chain
    records = manifest(run_dir)["stages"]
    assert [records[s].get("slurm", {}).get("runs") for s in STAGES] == [[0, 1], [1, 2], [2]], records
    res = subprocess.run(
        [sys.executable, "-m", "rlhf_cli", "runs", f"run.root={run_dir.parent}", "run.name=job"],
        capture_output=True,
        text=True,
        env=job_env(),
    )
    assert res.returncode == 0, res.stderr
    table = res.stdout.split("\n\n")[0].splitlines()  # the stages' table; the evaluation's table follows
    rows = {
        line.split()[1] if line.startswith("job ") else line.split()[0]: line
        for line in table
        if line.split()[:2] and any(s in line.split()[:2] for s in STAGES)
    }
    assert f"slurm job {job.id}, requeued 1 time" in rows["sft"], res.stdout
    assert f"slurm job {job.id}, requeued 1 time" in rows["dpo"], res.stdout
    assert f"slurm job {job.id}" in rows["eval"] and "requeued" not in rows["eval"], res.stdout
