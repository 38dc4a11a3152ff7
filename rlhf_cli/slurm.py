"""SLURM: what a stage records of the job it runs in (`rlhf runs` shows the job id and how often the stage was
requeued), and what the batch scripts ask once their training step has ended (`outcome`).

Read from the variables SLURM sets in a job's environment, which srun, torchrun and `rlhf pipeline` pass on to every
rank: SLURM_JOB_ID (SLURM_ARRAY_JOB_ID / SLURM_ARRAY_TASK_ID for an array task), SLURM_RESTART_COUNT (how many times
the job was requeued; unset before the first requeue), SLURM_JOB_NODELIST, SLURM_JOB_PARTITION, SLURM_JOB_NAME.

`python -m rlhf_cli.slurm outcome RC SINCE STAGE [OVERRIDE ...]` (scripts/slurm_multinode.sbatch): the exit code the
training step really ended with. torchrun does not pass a rank's exit code on (after a preemption its agents exit 1),
so a step whose stage recorded `preempted` at or after SINCE (epoch seconds, the step's start) is 75, the code of a
preemption checkpoint (preempt.PREEMPTED_EXIT_CODE); anything else keeps RC. A `preempted` left by an earlier try
of the job does not count: a requeued try that fails before the stage starts again (a refused config, a missing
file) is a failure, not a preemption, and is not requeued again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from rlhf_cli.files import TIME_FORMAT
from rlhf_cli.preempt import PREEMPTED_EXIT_CODE


def job(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The SLURM job this process runs in: {"job_id": "1234" (or "1234_7" for an array task), "restarts": 2,
    "nodes": "gpu[01-02]", "partition": "gpu", "name": "rlhf"} (the last three only where set), or None outside
    SLURM."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        return None
    array, task = env.get("SLURM_ARRAY_JOB_ID", "").strip(), env.get("SLURM_ARRAY_TASK_ID", "").strip()
    out: dict[str, Any] = {
        "job_id": f"{array}_{task}" if array and task else job_id,
        "restarts": _count(env.get("SLURM_RESTART_COUNT")),
    }
    for key, var in (("nodes", "SLURM_JOB_NODELIST"), ("partition", "SLURM_JOB_PARTITION"), ("name", "SLURM_JOB_NAME")):
        if env.get(var, "").strip():
            out[key] = env[var].strip()
    return out


def _count(text: Any) -> int:
    try:
        return max(0, int(str(text).strip()))
    except ValueError:
        return 0


def stage_fields(previous: Any, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The manifest fields a stage records when it starts or resumes (`Run.begin`): {"slurm": job(...) plus "runs",
    the job's restart counts under which this stage began}, or {} outside SLURM (a record keeps what an earlier
    run under SLURM wrote). `previous`: the stage's record's "slurm" value so far (anything: a hand edit is ignored);
    its runs carry on when it is the same job, so a stage preempted in the job's first run and finished after one
    requeue has runs [0, 1]."""
    now = job(env)
    if now is None:
        return {}
    runs = _runs(previous) if isinstance(previous, dict) and previous.get("job_id") == now["job_id"] else []
    now["runs"] = sorted({*runs, now["restarts"]})
    return {"slurm": now}


def _runs(value: Any) -> list[int]:
    runs = value.get("runs") if isinstance(value, dict) else None
    return [r for r in runs if isinstance(r, int) and not isinstance(r, bool)] if isinstance(runs, list) else []


def requeues(value: Any) -> int:
    """How many times the stage of a record's "slurm" value was requeued: the job's runs it began in, less one."""
    return max(0, len(set(_runs(value))) - 1)


def describe(value: Any) -> str:
    """A record's "slurm" value as `rlhf runs` shows it: `slurm job 1234`, `slurm job 1234, requeued 2 times`; ""
    when there is none or it is not a table."""
    if not isinstance(value, dict) or value.get("job_id") in (None, ""):
        return ""
    n = requeues(value)
    return f"slurm job {value['job_id']}" + (f", requeued {n} time{'s' if n != 1 else ''}" if n else "")


def _ended_since(record: dict, since: float) -> bool:
    try:
        ended = datetime.strptime(str(record.get("ended_at")), TIME_FORMAT).timestamp()
    except ValueError:
        return False
    return ended >= int(since)


def outcome(rc: int, stage: str, overrides: list[str], since: float) -> int:
    """The exit code of a training step that ran `rlhf <stage> <overrides>` (under torchrun: exit code `rc`) and
    started at `since` (epoch seconds): PREEMPTED_EXIT_CODE when the stage's record says it stopped with a
    preemption checkpoint during this step, else `rc`."""
    if rc == 0:
        return 0
    from rlhf_cli.config.compose import compose
    from rlhf_cli.jsonsafe import load_json

    try:
        cfg = compose(stage, overrides)
        manifest = load_json(Path(cfg.run.root) / cfg.run.name / "manifest.json")
    except Exception:  # noqa: BLE001 - a config or a run that cannot be read: the step's own exit code stands
        return rc
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    record = stages.get(stage) if isinstance(stages, dict) else None
    if isinstance(record, dict) and record.get("status") == "preempted" and _ended_since(record, since):
        return PREEMPTED_EXIT_CODE
    return rc


USAGE = "usage: python -m rlhf_cli.slurm outcome RC SINCE STAGE [OVERRIDE ...]"


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "outcome":
        print(USAGE, file=sys.stderr)
        return 2
    try:
        rc, since = int(argv[1]), float(argv[2])
    except ValueError:
        print(USAGE, file=sys.stderr)
        return 2
    print(outcome(rc, argv[3], argv[4:], since))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
