"""`rlhf pipeline [pipeline=<name or file.yaml>] [key=value ...] [<stage>.key=value ...]`: the stages a pipeline config
lists (configs/pipeline/<name>.yaml), in order, in one run directory, each taking its inputs from the earlier ones
(`stage:<name>` sources) and ending with `rlhf eval`. Shipped: `default` (sft, rm, ppo, dpo, rejection_sampling,
eval: `make demo`), `instructgpt` (sft, rm, ppo), `dpo` (sft, dpo), `llama2` (sft, rm, rejection_sampling, ppo).

Overrides: `key=value` goes to every stage (run.name=x, seed=1, launcher.nproc_per_node=2, deepspeed=zero2);
`<stage>.key=value` to that stage only (ppo.stage.kl_coef=0.1, sft.+experiment=dolly, rm.run.overwrite=true),
after the pipeline file's own overrides of that stage. Every stage's config is composed and validated before the
first one runs.

Each stage runs as `rlhf <stage> ...` in a child process (its own memory, DeepSpeed state and, with
launcher.nproc_per_node > 1, its own torchrun): a stage already completed with the same resolved config is skipped;
an interrupted or preempted one resumes; a completed one whose config changed is refused, naming the override that
re-runs it. Once a stage has run again, the completed stages after it run again too (their inputs changed). Signals
are passed on to the running stage (wait_forwarding), so SIGUSR1 / SIGTERM / Ctrl-C stop it with a checkpoint and
the pipeline exits 75 like the stage; re-running the same command continues where it stopped (SLURM requeue too).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_cli.errors import UserError

DEFAULT = "default"
# The summary table's metrics per stage (first -> last); a stage not listed shows every headline metric.
KEY_METRICS = {
    "sft": ("eval_loss",), "rm": ("eval_accuracy",), "dpo": ("eval_reward_accuracy", "eval_loss"),
    "ppo": ("eval_score", "eval_gold", "kl"), "rejection_sampling": ("eval_score", "eval_gold"),
    **dict.fromkeys(("grpo", "rloo", "reinforce_pp"), ("eval_score", "eval_gold", "kl")),
}  # fmt: skip


@dataclass
class Pipeline:
    name: str
    description: str
    stages: list[str]
    overrides: dict[str, list[str]] = field(default_factory=dict)  # stage -> key=value, from the pipeline file


@dataclass
class Step:
    """What the pipeline does with one stage: run it (fresh or resuming), or skip it (completed, same config)."""

    run_dir: Path
    stage: str
    args: list[str]
    action: str  # "run", "skip"
    why: str


def pipeline_files() -> dict[str, Path]:
    from rlhf_cli.config.compose import config_dir

    return {p.stem: p for p in sorted((config_dir() / "pipeline").glob("*.yaml"))}


def load_pipeline(spec: str) -> Pipeline:
    """configs/pipeline/<spec>.yaml, or a YAML file at the path `spec`: {description, stages: [...], overrides:
    {stage: [key=value, ...]}}; every listed stage must exist and overrides may only name listed stages."""
    from omegaconf import OmegaConf

    from rlhf_cli.stages import STAGES

    files = pipeline_files()
    path = files.get(spec) or Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"unknown pipeline `{spec}`; pipelines: {', '.join(files)} (or a path to a .yaml file)")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # noqa: BLE001 - any YAML error becomes one message naming the file
        raise UserError(f"{path}: not a valid pipeline YAML file ({err})") from None
    stages, overrides = raw.get("stages") or [], raw.get("overrides") or {}
    unknown = [s for s in [*stages, *overrides] if s not in STAGES]
    if not stages or unknown or not set(overrides) <= set(stages) or len(set(stages)) != len(stages):
        raise UserError(f"{path}: `stages` must list distinct stages ({', '.join(STAGES)}) and `overrides` only "
                        f"those; got stages {stages}, overrides for {list(overrides)}")  # fmt: skip
    return Pipeline(path.stem, raw.get("description", ""), list(stages),
                    {k: [str(v) for v in vs] for k, vs in overrides.items()})  # fmt: skip


def split_args(args: list[str], pipeline_stages: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides for every stage, overrides per stage) from the command line (`pipeline=` already taken out)."""
    from rlhf_cli.stages import STAGES

    common: list[str] = []
    per_stage: dict[str, list[str]] = {s: [] for s in pipeline_stages}
    for arg in args:
        head, dot, rest = arg.partition(".")
        if dot and head in STAGES:
            if head not in per_stage:
                listed = ", ".join(pipeline_stages)
                raise UserError(f"`{arg}`: stage `{head}` is not in this pipeline (stages: {listed})")
            if rest.split("=", 1)[0].lstrip("+~") in ("run.name", "run.root", "run"):
                raise UserError(f"`{arg}`: every stage of a pipeline shares one run; set run.name= for all of them")
            per_stage[head].append(rest)
        else:
            common.append(arg)
    return common, per_stage


def plan_steps(pipeline: Pipeline, common: list[str], per_stage: dict[str, list[str]]) -> list[Step]:
    """Compose and validate every stage, then decide for each: skip (completed, same config hash), run (new,
    interrupted, failed, overwritten, or after a stage that runs again), or refuse (completed, config changed)."""
    from rlhf_cli.config.compose import compose, config_hash

    composed = {s: compose(s, [*pipeline.overrides.get(s, []), *common, *per_stage[s]]) for s in pipeline.stages}
    runs = {s: str(Path(c.run.root) / c.run.name) for s, c in composed.items()}
    if len(set(runs.values())) > 1:  # an experiment file that names its run
        listed = ", ".join(f"{s}: {r}" for s, r in runs.items())
        raise UserError(f"the stages of pipeline {pipeline.name} would write to different runs ({listed}); give "
                        "run.name=<name> on the command line")  # fmt: skip
    first = next(iter(composed.values()))
    run_dir = Path(first.run.root) / first.run.name
    manifest = _manifest(run_dir)
    steps, rerun = [], False
    for stage, cfg in composed.items():
        args = [*pipeline.overrides.get(stage, []), *common, *per_stage[stage]]
        record = manifest.get(stage, {})
        if record.get("status") != "completed":
            steps.append(Step(run_dir, stage, args, "run", "resumes" if record else "new"))
            rerun = rerun or bool(record)
            continue
        if cfg.run.overwrite or rerun:
            why = "run.overwrite" if cfg.run.overwrite else "an earlier stage ran again"
            steps.append(Step(run_dir, stage, [*args, "run.overwrite=true"], "run", why))
            rerun = True
        elif record.get("config_hash") == config_hash(cfg):
            steps.append(Step(run_dir, stage, args, "skip", "completed with this config"))
        else:
            raise UserError(
                f"stage `{stage}` of run `{first.run.name}` was completed with another config (hash "
                f"{record.get('config_hash')}, now {config_hash(cfg)}); add `{stage}.run.overwrite=true` to run it "
                f"again (the stages after it then run again too), or choose another run.name")  # fmt: skip
    return steps


def _manifest(run_dir: Path) -> dict[str, Any]:
    """The stage records of the run's manifest ({} for a new run); a damaged manifest is the Run's own UserError."""
    from rlhf_cli.run_dir import Run

    return Run(root=run_dir, stage="").read_manifest()["stages"]


def main(args: list[str]) -> int:
    from rlhf_cli import launch
    from rlhf_cli.metrics import console

    if launch.under_launcher():
        raise UserError(
            "run `rlhf pipeline` once per node, not under torchrun / srun ranks: it starts each stage's "
            "ranks itself with launcher.nproc_per_node=N (and launcher.nnodes / node_rank / master_addr)"
        )
    spec = next((a.split("=", 1)[1] for a in args if a.startswith("pipeline=")), DEFAULT)
    pipeline = load_pipeline(spec)
    common, per_stage = split_args([a for a in args if not a.startswith("pipeline=")], pipeline.stages)
    steps = plan_steps(pipeline, common, per_stage)
    console.print(f"pipeline {pipeline.name}: " + " -> ".join(
        f"{s.stage} ({s.why})" if s.action == "run" else f"{s.stage} (skipped: {s.why})" for s in steps),
        markup=False, highlight=False)  # fmt: skip
    for step in steps:
        if step.action == "skip":
            continue
        console.print(f"\n== rlhf {step.stage} ({step.why})", markup=False, highlight=False)
        rc = launch.wait_forwarding([sys.executable, "-m", "rlhf_cli", step.stage, *step.args])
        if rc != 0:
            console.print(f"pipeline {pipeline.name} stopped at {step.stage} (exit code {rc}); run the same command "
                          "again to continue from there", markup=False, highlight=False)  # fmt: skip
            return rc
    console.print("\n".join(summary_table(steps[0].run_dir, [s.stage for s in steps])),
                  markup=False, highlight=False)  # fmt: skip
    return 0


def summary_table(run_dir: Path, stages: list[str]) -> list[str]:
    """Plain lines: per stage its status, wall time and headline metrics (first -> last), then the eval table."""
    records = _manifest(run_dir)
    lines = [f"\npipeline summary: {run_dir}", f"  {'stage':<20} {'status':<10} {'time':>8}  headline"]
    for stage in stages:
        rec = records.get(stage, {})
        summary = rec.get("summary", {})
        seconds = summary.get("stage_seconds")
        wall = "-" if seconds is None else f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
        headline = summary.get("headline", {})
        keys = [k for k in KEY_METRICS.get(stage, ()) if k in headline] or list(headline)
        heads = ", ".join(f"{k} {_num(headline[k][0])} -> {_num(headline[k][1])}" for k in keys)
        lines.append(f"  {stage:<20} {rec.get('status', 'not run'):<10} {wall:>8}  {heads}")
    report = run_dir / "eval" / "eval.json"
    if "eval" in stages and report.is_file():
        from rlhf_cli.rollout.comparison import table

        ev = json.loads(report.read_text())
        how = "greedy" if not ev["temperature"] else f"{ev['n_samples']} samples at temperature {ev['temperature']:g}"
        lines += ["", f"held-out evaluation: {ev['prompts']} prompts, answers {how}, KL from {ev['kl_samples']} "
                  f"samples per prompt; reference {ev['reference']}; mean +- standard error",
                  *table(ev["results"])]  # fmt: skip
    return lines


def _num(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
