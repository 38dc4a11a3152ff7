"""Provenance on the real command path: an upstream stage that re-runs makes the work built on it stale (refused by
single-stage commands, retrained from scratch by the pipeline), an overwrite that is refused loses nothing, a
deleted output is not complete, and a pipeline requeued after SIGTERM trains every stage exactly once, an overwrite
on its command line included."""

import hashlib
import json
import signal
import subprocess
import sys
import time

from conftest import FAST, manifest, rlhf

from rlhf_cli.preempt import PREEMPTED_EXIT_CODE

SFT = ["stage.max_steps=3", "stage.save_every=0"]
RM = ["stage.max_steps=4", "stage.save_every=1"]


def _chain(tmp_path, stages):
    path = tmp_path / "chain.yaml"
    path.write_text(json.dumps({"stages": list(stages), "overrides": stages}))  # JSON is YAML
    return f"pipeline={path}"


def _tree(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _ok(res):
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    return res.stdout + res.stderr


def _refused(res, *parts):
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for part in parts:
        assert part in res.stderr, res.stderr


def test_an_upstream_rerun_makes_downstream_work_stale(runs, tmp_path):
    run_dir = runs / "p"
    base = [*FAST, f"run.root={runs}", "run.name=p"]
    _ok(rlhf("sft", *base, *SFT, cwd=tmp_path))
    _ok(rlhf("rm", *base, *RM, cwd=tmp_path))
    # dpo stops after 2 of its 4 steps, with checkpoints trained from this sft.
    _ok(rlhf("dpo", *base, *RM, "stage.stop_after_steps=2", cwd=tmp_path))
    _ok(rlhf("sft", *base, *SFT, "run.overwrite=true", cwd=tmp_path))
    # 1. Single-stage commands refuse stale work, each with the way out.
    _refused(rlhf("rm", *base, *RM, cwd=tmp_path), "already complete", "it is stale: sft re-ran after it")
    _refused(
        rlhf("dpo", *base, *RM, cwd=tmp_path),
        "resume checkpoints of `dpo`",
        "sft re-ran after it",
        "run.overwrite=true",
    )
    _refused(
        rlhf("ppo", *base, cwd=tmp_path),
        "input `rm` of ppo (stage.reward.model=stage:rm) is stale",
        "run.allow_stale_inputs=true",
    )
    assert not (run_dir / "ppo").exists()  # refused before the stage folder was made
    # 2. The pipeline retrains the stale rm and starts dpo again from scratch, saying why.
    out = _ok(rlhf("pipeline", _chain(tmp_path, {"sft": SFT, "rm": RM, "dpo": RM}), *base, cwd=tmp_path))
    assert (
        "sft (skipped: completed with this config) -> rm (stale: sft re-ran after it) -> dpo (its checkpoints "
        "are stale (sft re-ran after it): starting again)" in out
    )
    assert "starting dpo in" in out and "resuming dpo" not in out
    stages = manifest(run_dir)["stages"]
    assert stages["rm"]["provenance"]["inputs"]["model.name_or_path"]["fp"] == stages["sft"]["completion"]["id"]
    # 3. An overwrite refused by a typo (a data file that does not exist) leaves the completed rm as it was.
    before, record = _tree(run_dir / "rm"), stages["rm"]
    _refused(rlhf("rm", *base, *RM, "run.overwrite=true", "data.source=missing.jsonl", cwd=tmp_path), "missing.jsonl")
    assert _tree(run_dir / "rm") == before and manifest(run_dir)["stages"]["rm"] == record
    assert not (run_dir / ".rm.replaced").exists()
    # 4. A deleted weight file: rm is no longer complete, and what reads it is refused.
    (run_dir / "rm" / "final" / "model.safetensors").unlink()
    _refused(rlhf("ppo", *base, cwd=tmp_path), "recorded as completed, but", "changed after it completed")


def _start(args, cwd, log):
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)


def _rows(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_requeued_pipeline_with_an_overwrite_trains_every_stage_once(runs, tmp_path):
    """The same command, run again after each SIGTERM (a SLURM requeue), with run.overwrite=true on it: every stage
    is trained once, resumed where it stopped, never started again by the overwrite."""
    run_dir = runs / "q"
    chain = _chain(
        tmp_path,
        {"sft": ["stage.max_steps=40", "stage.save_every=0"], "rm": ["stage.max_steps=30", "stage.save_every=0"]},
    )
    args = ["pipeline", chain, *FAST, f"run.root={runs}", "run.name=q", "run.overwrite=true"]
    logs = []
    for stage in ("sft", "rm"):  # SIGTERM once the stage has logged two steps, then the same command again
        log = tmp_path / f"try-{len(logs)}.log"
        logs.append(log)
        proc = _start(args, tmp_path, log)
        deadline = time.time() + 240
        while _rows(run_dir / stage / "metrics.jsonl") < 2:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
        assert manifest(run_dir)["stages"][stage]["status"] == "preempted"
    out = "".join(log.read_text() for log in logs) + _ok(rlhf(*args, cwd=tmp_path, timeout=600))
    for stage in ("sft", "rm"):
        assert out.count(f"starting {stage} in") == 1, out[-4000:]
        assert manifest(run_dir)["stages"][stage]["status"] == "completed"
    assert out.count("resuming sft from") == 1 and out.count("resuming rm from") == 1
    assert "sft (skipped: completed with this config)" in out
