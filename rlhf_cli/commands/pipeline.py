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
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_cli.commands.run_tables import summary_table
from rlhf_cli.errors import UserError
from rlhf_cli.stage_state import INTENT_ENV

DEFAULT = "default"


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

    from rlhf_cli.registry import STAGES

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
        raise UserError(
            f"{path}: `stages` must list distinct stages ({', '.join(STAGES)}) and `overrides` only "
            f"those; got stages {stages}, overrides for {list(overrides)}"
        )
    return Pipeline(
        path.stem, raw.get("description", ""), list(stages), {k: [str(v) for v in vs] for k, vs in overrides.items()}
    )


def split_args(args: list[str], pipeline_stages: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides for every stage, overrides per stage) from the command line (`pipeline=` already taken out)."""
    from rlhf_cli.registry import STAGES

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


def plan_steps(
    pipeline: Pipeline, common: list[str], per_stage: dict[str, list[str]], attempt: str | None = None
) -> list[Step]:
    """Compose and validate every stage, check the chain (`check_chain`), then decide for each (`stage_action`):
    skip, run (new, resume) or run from scratch (stale, overwritten, damaged), or refuse. `attempt`: this
    command's overwrite intent (`attempt_id`), so an overwrite already applied by an earlier try is not repeated."""
    from rlhf_cli.config.compose import compose

    composed = {s: compose(s, [*pipeline.overrides.get(s, []), *common, *per_stage[s]]) for s in pipeline.stages}
    runs = {s: str(Path(c.run.root) / c.run.name) for s, c in composed.items()}
    if len(set(runs.values())) > 1:  # an experiment file that names its run
        listed = ", ".join(f"{s}: {r}" for s, r in runs.items())
        raise UserError(
            f"the stages of pipeline {pipeline.name} would write to different runs ({listed}); give "
            "run.name=<name> on the command line"
        )
    first = next(iter(composed.values()))
    run_dir = Path(first.run.root) / first.run.name
    manifest = _full_manifest(run_dir)
    deps = check_chain(pipeline.name, composed, manifest, run_dir)
    steps: list[Step] = []
    will_run: list[str] = []
    for stage, cfg in composed.items():
        args = [*pipeline.overrides.get(stage, []), *common, *per_stage[stage]]
        action, why = stage_action(stage, cfg, manifest, run_dir, deps[stage], tuple(will_run), attempt)
        if action == "fresh":
            args = [*args, "run.overwrite=true"]
        steps.append(Step(run_dir, stage, args, "skip" if action == "skip" else "run", why))
        if action != "skip":
            will_run.append(stage)
    return steps


def check_chain(name: str, composed: dict[str, Any], manifest: dict, run_dir: Path) -> dict[str, set[str]]:
    """Every stage's inputs that are stages of the run (the registry's input keys) come from an earlier stage of the
    pipeline or from a completed, intact, up-to-date stage of the run; refused otherwise, naming the stage, the input
    and the fix, before the first stage trains. Returns stage -> the run stages it reads."""
    from rlhf_cli.provenance import completion_id, input_specs, stale_reasons, upstream
    from rlhf_cli.registry import STAGES

    order = list(composed)
    deps: dict[str, set[str]] = {}
    for i, (stage, cfg) in enumerate(composed.items()):
        spec = STAGES[stage]
        specs = upstream(input_specs(cfg, spec.inputs, manifest))
        if stage == "eval" and not cfg.stage.policies:  # every policy the run has by then, the earlier ones too
            specs.update({f"stage.policies[{s}]": s for s in order[:i] if not STAGES[s].scalar_head})
        deps[stage] = set()
        for key, dep in specs.items():
            optional = any(key == k or key.startswith(k + "[") for k in spec.optional_inputs)
            if dep in order[:i]:
                deps[stage].add(dep)
            elif dep in order:
                raise UserError(
                    f"pipeline {name}: {stage} reads {dep} ({key}=stage:{dep}), which the pipeline runs "
                    f"after it; list {dep} before {stage}"
                )
            elif completion_id(manifest, dep, run_dir) is not None:
                reasons = stale_reasons(manifest, dep, run_dir)
                if reasons and not cfg.run.allow_stale_inputs:
                    raise UserError(
                        f"pipeline {name}: {stage} reads {dep} ({key}=stage:{dep}), which is stale "
                        f"({'; '.join(reasons)}) and not in this pipeline; add {dep} to the pipeline's "
                        "stages, or add run.allow_stale_inputs=true"
                    )
                deps[stage].add(dep)
            elif not optional:
                raise UserError(missing_input(name, stage, key, dep, order, run_dir))
    return deps


def missing_input(name: str, stage: str, key: str, dep: str, order: list[str], run_dir: Path) -> str:
    fix = f"list {dep} before {stage} in the pipeline's stages, or run `rlhf {dep} run.name={run_dir.name}` first"
    if key.startswith("stage.reward"):
        fix += f", or give {stage}.stage.reward.function=module:function"
    return (
        f"pipeline {name}: {stage} reads {dep} ({key}=stage:{dep}), and neither an earlier stage of the pipeline "
        f"({', '.join(order)}) nor run `{run_dir.name}` provides it; {fix}"
    )


def stage_action(
    stage: str, cfg: Any, manifest: dict, run_dir: Path, deps: set[str], will_run: tuple[str, ...], attempt: str | None
) -> tuple[str, str]:
    """(skip | run | fresh, why) for one stage, given the stages that run before it in this command (`will_run`):
    a stage whose inputs changed since it completed (or since its checkpoints were written) runs from scratch."""
    from rlhf_cli.config.compose import config_hash
    from rlhf_cli.provenance import damage, stale_reasons
    from rlhf_cli.registry import STAGES
    from rlhf_cli.stage_state import has_saved_work

    now = manifest.get("stages", {}).get(stage) or {}
    record = replaced_record(run_dir, stage, now)
    overwrite = cfg.run.overwrite and (attempt is None or record.get("overwrite_intent") != attempt)
    reasons = stale_reasons(manifest, stage, run_dir, frozenset(will_run)) if record else []
    reasons += [f"{d} runs again" for d in will_run if d in deps and f"{d} runs again" not in reasons]
    # A record set aside with its folder (replaced_record) is checked on disk when it is back.
    broken = damage(run_dir, record) if record.get("status") == "completed" and record is now else None
    if record.get("status") == "completed" and not broken:
        if overwrite:
            return "fresh", "run.overwrite"
        if reasons:
            return "fresh", f"stale: {'; '.join(reasons)}"
        if not same_config(record, cfg):
            raise UserError(
                f"stage `{stage}` of run `{run_dir.name}` was completed with another config (hash "
                f"{record.get('config_hash')}, now {config_hash(cfg)}); add `{stage}.run.overwrite=true` to run it "
                f"again (the stages after it then run again too), or choose another run.name"
            )
        return "skip", "completed with this config"
    if not record:
        return "run", "new"
    lead = f"its recorded output is damaged ({broken}); " if broken else ""
    if overwrite:
        return "fresh", lead + "run.overwrite"
    saved = has_saved_work(run_dir / stage)
    old_config = "config_hash" in record and not same_config(record, cfg) and STAGES[stage].resume_needs_same_config
    if saved and (reasons or old_config):
        why = "; ".join(reasons + (["the config changed"] if old_config else []))
        return "fresh", f"{lead}its checkpoints are stale ({why}): starting again"
    return "run", lead + ("resumes" if saved else "starts again")


def same_config(record: dict, cfg: Any) -> bool:
    """The stage's recorded config is `cfg`'s: by the provenance's hash (where the run directory is left out), or
    for a record written before provenance existed, by the hash it kept."""
    from rlhf_cli.config.compose import config_hash

    prov = record.get("provenance")
    if isinstance(prov, dict) and prov.get("config"):
        return prov["config"] == config_hash(cfg, location=False)
    return record.get("config_hash") == config_hash(cfg)


def replaced_record(run_dir: Path, stage: str, record: dict) -> dict:
    """A stage whose overwrite was stopped before it began is put back when it is next opened (stage_state
    `restore_overwritten`): plan with the record it will have then."""
    from rlhf_cli.stage_state import RECORD_FILE

    saved = run_dir / str(record.get("replacing", "")) / RECORD_FILE
    if "replacing" in record and saved.is_file():
        try:
            return json.loads(saved.read_text())
        except ValueError:
            return {}
    return record


def _run_dir(pipeline: Pipeline, common: list[str], per_stage: dict[str, list[str]]) -> Path:
    """The run directory, from the first stage's config (plan_steps refuses stages that disagree)."""
    from rlhf_cli.config.compose import compose

    first = pipeline.stages[0]
    cfg = compose(first, [*pipeline.overrides.get(first, []), *common, *per_stage[first]])
    return Path(cfg.run.root) / cfg.run.name


def _full_manifest(run_dir: Path) -> dict[str, Any]:
    """The run's manifest ({"stages": {}} for a new run); a damaged manifest is the Run's own UserError."""
    from rlhf_cli.run_dir import Run

    manifest = Run(root=run_dir, stage="").read_manifest()
    if not isinstance(manifest.get("stages"), dict):
        raise UserError(f"{run_dir / 'manifest.json'} has no `stages` table; restore it or use another run.name")
    return manifest


def attempt_id(run_dir: Path, args: list[str]) -> str:
    """This command's overwrite intent: the previous try's when the same pipeline command stopped before its end (a
    kill, a preemption, a failed stage), so its overwrites are not applied twice; a new one otherwise."""
    import uuid

    previous = _full_manifest(run_dir).get("pipeline")
    if isinstance(previous, dict) and previous.get("args") == args and not previous.get("finished"):
        return str(previous.get("attempt"))
    return uuid.uuid4().hex[:16]


def record_attempt(run_dir: Path, args: list[str], attempt: str, finished: bool) -> None:
    from rlhf_cli.run_dir import Run

    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(root=run_dir, stage="")
    manifest = _full_manifest(run_dir)
    manifest["pipeline"] = {"args": args, "attempt": attempt, "finished": finished}
    run.write_manifest(manifest)


def forget_if_nothing_ran(run_dir: Path, created: Path | None) -> None:
    """A pipeline whose first stage was refused before it began leaves no run behind (as a refused stage does): when
    this command made the run directory (`created`: the outermost folder it made, run.root included) and no stage
    recorded anything in it, that folder goes."""
    from rlhf_cli.jsonsafe import load_json

    if not created:
        return
    try:
        manifest = load_json(run_dir / "manifest.json")
    except (OSError, ValueError):
        return
    stages = manifest.get("stages") if isinstance(manifest, dict) else True
    if not stages and not [p for p in run_dir.iterdir() if p.name not in ("manifest.json", ".lock")]:
        shutil.rmtree(created, ignore_errors=True)


def main(args: list[str]) -> int:
    from rlhf_cli import launch, preempt
    from rlhf_cli.metrics import console

    if launch.under_launcher():
        raise UserError(
            "run `rlhf pipeline` once per node, not under torchrun / srun ranks: it starts each stage's "
            "ranks itself with launcher.nproc_per_node=N (and launcher.nnodes / node_rank / master_addr)"
        )
    spec = next((a.split("=", 1)[1] for a in args if a.startswith("pipeline=")), DEFAULT)
    pipeline = load_pipeline(spec)
    common, per_stage = split_args([a for a in args if not a.startswith("pipeline=")], pipeline.stages)
    run_dir = _run_dir(pipeline, common, per_stage)
    attempt = attempt_id(run_dir, args)
    steps = plan_steps(pipeline, common, per_stage, attempt)
    created = next((d for d in reversed([run_dir, *run_dir.parents]) if not d.exists()), None)
    record_attempt(run_dir, args, attempt, finished=False)
    os.environ[INTENT_ENV] = attempt  # the stages it starts record it with an overwrite they apply
    console.print(
        f"pipeline {pipeline.name}: "
        + " -> ".join(f"{s.stage} ({s.why})" if s.action == "run" else f"{s.stage} (skipped: {s.why})" for s in steps),
        markup=False,
        highlight=False,
    )
    for step in steps:
        if step.action == "skip":
            continue
        if preempt.requested():  # signalled between stages (preempt.record_early): stop before starting this one
            forget_if_nothing_ran(run_dir, created)
            console.print(
                f"pipeline {pipeline.name} stopped by {preempt.signal_name()} before {step.stage} (exit code "
                f"{preempt.PREEMPTED_EXIT_CODE}); run the same command again to continue from there",
                markup=False,
                highlight=False,
            )
            return preempt.PREEMPTED_EXIT_CODE
        console.print(f"\n== rlhf {step.stage} ({step.why})", markup=False, highlight=False)
        rc = launch.wait_forwarding([sys.executable, "-m", "rlhf_cli", step.stage, *step.args])
        if rc != 0:
            forget_if_nothing_ran(run_dir, created)
            console.print(
                f"pipeline {pipeline.name} stopped at {step.stage} (exit code {rc}); run the same command "
                "again to continue from there",
                markup=False,
                highlight=False,
            )
            return rc
    record_attempt(run_dir, args, attempt, finished=True)
    console.print("\n".join(summary_table(steps[0].run_dir, [s.stage for s in steps])), markup=False, highlight=False)
    return 0
