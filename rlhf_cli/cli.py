"""`rlhf <stage> [overrides]`: compose -> validate -> run directory -> the stage's `run(cfg, run)`.

The stages, their summaries and examples come from the registry (rlhf_cli/registry.py).

No training logic here. Every `UserError` ends as one red line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape

from rlhf_cli import launch, preempt
from rlhf_cli.errors import UserError
from rlhf_cli.files import checkpoint_step
from rlhf_cli.registry import STAGES
from rlhf_cli.run_dir import Run

STARTED = time.monotonic()  # for the wall time of the command in the end-of-stage summary
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)

# Tool -> (module with `main(args)`, what it does, examples: the first one is also in `rlhf --help`).
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "generate": (
        "rlhf_cli.commands.generate",
        "chat with the newest policy of a run, or any causal LM",
        (
            'rlhf generate run.name=demo prompt="What is the capital of France?"',
            'rlhf generate run.name=demo stage=sft prompt="Hi" temperature=0.7 top_p=0.9',
            'rlhf generate model=path/to/hf/folder prompt="Hi"',
        ),
    ),
    "explain": (
        "rlhf_cli.commands.explain",
        "batch algebra and GPU memory of a stage, without training",
        (
            "rlhf explain sft deepspeed=zero3 launcher.nproc_per_node=8",
            "rlhf explain ppo deepspeed=zero3 launcher.nproc_per_node=4",
        ),
    ),
    "score": (
        "rlhf_cli.commands.score",
        "score prompt/response pairs with a reward model or classifier",
        (
            'rlhf score run.name=demo prompt="What is 2 + 2?" response="2 + 2 = 4."',
            "rlhf score model=path/to/rm input=pairs.jsonl output=scored.jsonl",
        ),
    ),
    "pipeline": (
        "rlhf_cli.commands.pipeline",
        "the stages of a pipeline config in one run, then eval",
        (
            "rlhf pipeline pipeline=instructgpt run.name=chain ppo.stage.kl_coef=0.1",
            "rlhf pipeline pipeline=dpo run.name=d launcher.nproc_per_node=2",
        ),
    ),
    "runs": (
        "rlhf_cli.commands.runs",
        "the runs: stages, status, key metrics, times, what resumes",
        (
            "rlhf runs",
            "rlhf runs run.root=/scratch/runs",
        ),
    ),
    "plot": (
        "rlhf_cli.commands.plot",
        "draw a run's training curves again (<stage>/metrics.png)",
        (
            "rlhf plot run.name=demo",
            "rlhf plot run.name=demo stage=ppo run.root=/scratch/runs",
        ),
    ),
}

USAGE = """usage: rlhf <command> [key=value ...] [--cfg job] [--help]

Stages: each composes configs/config.yaml with Hydra; a key is set with
key=value (optim.lr=2e-5), a config group swapped with group=choice
(model=qwen2_5_0_5b), an experiment applied with +experiment=<name>.
{stages}

Tools:
{tools}

Options:
  --cfg job    print the composed, validated config of a stage; run nothing
  --help, -h   this help; `rlhf <command> --help`: a stage's groups and keys,
               a tool's arguments

The run directory is <run.root>/<run.name>/ (runs/demo/ by default; run= and
root= are accepted for run.name= and run.root=). An interrupted stage resumes
when the same command is run again; a completed stage is kept unless
run.overwrite=true.
"""


def usage() -> str:
    def entry(name: str, summary: str, example: str) -> str:
        head = f"  {name:<10}" if len(name) < 10 else f"  {name}\n{'':<12}"  # a long name gets a line of its own
        return f"{head}{summary}\n{'':<14}{example}"

    stages = "\n".join(entry(name, spec.summary, spec.example) for name, spec in STAGES.items())
    tools = "\n".join(entry(name, summary, examples[0]) for name, (_, summary, examples) in COMMANDS.items())
    return USAGE.format(stages=stages, tools=tools)


def command_help(verb: str, args: list[str]) -> str:
    """`rlhf <verb> --help`: generated from the stage's schema and configs/, or from the tool's arguments."""
    from rlhf_cli.commands.help import stage_help, tool_help

    if verb in STAGES:
        return stage_help(verb, [a for a in args if a not in ("--help", "-h")])
    module, _, examples = COMMANDS[verb]
    return tool_help(verb, importlib.import_module(module), examples)


def run_stage(stage: str, args: list[str]) -> int:
    from rlhf_cli.config.compose import compose, to_yaml

    show_cfg = False
    if "--cfg" in args:
        i = args.index("--cfg")
        if args[i + 1 : i + 2] != ["job"]:
            raise UserError("--cfg takes one value: job (e.g. `rlhf sft --cfg job`)")
        show_cfg = True
        args = args[:i] + args[i + 2 :]
    cfg = compose(stage, args)
    if show_cfg:
        out_console.print(to_yaml(cfg), end="", markup=False)
        return 0

    from rlhf_cli.stage_state import open_run

    if cfg.launcher.nproc_per_node > 1 and not launch.under_launcher():
        # A completed stage, a stale or missing input or a run in use is refused before torchrun starts any rank.
        open_run(cfg.run, stage, cfg=cfg, check_only=True)
        if preempt.requested():  # signalled before any rank started: nothing to save, nothing lost
            err_console.print(
                f"[yellow]preempted[/]: stopped by {preempt.signal_name()} before the ranks started; "
                "run the same command again",
                highlight=False,
            )
            return preempt.PREEMPTED_EXIT_CODE
        return launch.self_launch(cfg.launcher, stage, args, Path(cfg.run.root) / cfg.run.name / "manifest.json")
    single = os.environ.get("WORLD_SIZE", "1") == "1"
    if not single and os.environ.get("RANK") == "0":
        # Under a launcher the ranks open the run directory once they have joined the group, after torch and
        # DeepSpeed load (`train_stage`): rank 0 checks first, so a refusal comes at once there too.
        open_run(cfg.run, stage, cfg=cfg, check_only=True)
    # A single process locks and checks the run directory before DeepSpeed and the models are imported, so a refusal
    # is immediate. Signals are handled from here on: a Ctrl-C while DeepSpeed imports must not be lost (see preempt).
    preempt.install()
    return train_stage(stage, cfg, open_run(cfg.run, stage, cfg=cfg) if single else None)


def train_stage(stage: str, cfg: Any, run: Run | None) -> int:
    """Join the process group, open the run directory (unless this single process has: `run`), run the stage."""
    from rlhf_cli.config.compose import config_hash
    from rlhf_cli.stage_state import open_run

    try:
        from rlhf_cli import engine  # torch and DeepSpeed; in here, so a stop while they load goes to record_stop

        dist = engine.init_distributed()
        if not engine.same_on_all_ranks(config_hash(cfg)):
            raise UserError("the ranks composed different configs; start every rank with the same command and configs/")
        if run is None:
            run = open_run(cfg.run, stage, is_main=dist.is_main, cfg=cfg)
            engine.barrier()  # every rank has checked the manifest before rank 0 may change it
        if not dist.is_main:
            launch.redirect_rank_output(run.stage_dir / "logs", dist.rank)
        out = importlib.import_module(STAGES[stage].module).run(cfg, run)
    except BaseException as exc:
        if run is not None:
            record_stop(run, stage, exc)
        loaded = sys.modules.get("rlhf_cli.engine")  # None when importing it failed
        if loaded is not None:  # Preempted: every rank got here at the same step, so they can leave together
            loaded.shutdown(together=isinstance(exc, preempt.Preempted))
        raise
    finally:
        if run is not None:
            run.release()
    engine.shutdown()
    if dist.is_main:
        if out is None:
            err_console.print(f"stage {stage} stopped early; run the same command again to resume ({run.root})")
        else:
            from rlhf_cli.summary import print_summary

            run_args = f"run.name={cfg.run.name}" + (f" run.root={cfg.run.root}" if cfg.run.root != "runs" else "")
            wall = time.monotonic() - STARTED
            print_summary(err_console, run, run_args, terminal=err_console.is_terminal, wall_seconds=wall)
    return 0


def record_stop(run: Run, stage: str, exc: BaseException) -> None:
    """What a stage that stopped on `exc` leaves in its run directory (rank 0 writes). Refused before it began (a
    UserError before `Run.begin`): nothing, the run directory stays as it was found (a run directory made for it
    goes again, and `rlhf runs` does not list it). Otherwise its record says how it ended, unless it replaced an
    output under run.overwrite and stopped before it began: the replaced output comes back."""
    from rlhf_cli.run_dir import now
    from rlhf_cli.stage_state import restore_overwritten

    if run.is_main and restore_overwritten(run):
        err_console.print(
            f"run.overwrite=true: {stage} stopped before it started; the previous {stage} is back in {run.stage_dir}"
        )
    elif isinstance(exc, UserError) and not run.began:
        run.discard()
    else:
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        status = {KeyboardInterrupt: "interrupted", preempt.Preempted: "preempted"}.get(type(exc), "failed")
        run.update_stage(status=status, error=reason, ended_at=now())


def dispatch(argv: list[str]) -> int:
    argv = launch.strip_local_rank(argv)  # the deepspeed launcher puts it before the verb
    if argv[:1] == ["help"] and argv[1:2]:  # `rlhf help sft` = `rlhf sft --help`
        argv = [argv[1], "--help"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        out_console.print(usage(), markup=False)
        return 0 if argv else 2
    verb, args = argv[0], argv[1:]
    if verb not in STAGES and verb != "pipeline" or "--help" in args or "-h" in args:
        preempt.release_early()  # trains nothing: TERM and USR1 act by default (see preempt.record_early)
    if verb in {**STAGES, **COMMANDS} and ("--help" in args or "-h" in args):
        out_console.print(command_help(verb, args), markup=False)
        return 0
    if verb in STAGES:
        return run_stage(verb, args)
    if verb in COMMANDS:
        module: Callable = importlib.import_module(COMMANDS[verb][0])
        return module.main(args)
    import difflib

    close = difflib.get_close_matches(verb, list(STAGES) + list(COMMANDS), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    raise UserError(f"unknown command `{verb}`{hint} (`rlhf --help` lists them)")


# Commands that only read and print: when they return their work is done, and the interpreter's teardown of the torch
# and transformers module graph (about 0.8 s on 2 cores, longer than the tiny model's whole generation) buys nothing.
NO_TEARDOWN = frozenset({"generate", "score"})


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    engine = sys.modules.get("rlhf_cli.engine")
    if engine is not None:  # a rank of a multi-rank run ends here, without interpreter teardown
        engine.exit_now(code)
    if argv is None and sys.argv[1:2] and sys.argv[1] in NO_TEARDOWN:  # the program itself, not a caller's main([...])
        exit_without_teardown(code)
    return code


def exit_without_teardown(code: int) -> None:
    """End the process as `sys.exit(code)` would, less the module teardown: the exit handlers still run (logging's
    flush, temporary folders, file locks, the hub session), then the standard streams are flushed."""
    import atexit

    atexit._run_exitfuncs()  # CPython's own exit sequence runs these; os._exit below would skip them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def after_ctrl_c(exc: KeyboardInterrupt) -> str:
    """Where the same command starts again after a Ctrl-C that stopped at once: the newest complete checkpoint of the
    stage, or step 0. The stage's run is taken from the traceback: the interrupt crossed the frame that opened it
    (`run_stage`) unless it came before, when nothing of the run is known yet."""
    run = _run_in(exc.__traceback__)
    if run is None:
        return "the same command resumes from the newest checkpoint of the stage, if there is one"
    newest = run.latest_checkpoint()
    if newest is None:
        return "no checkpoint yet: the next run starts at step 0"
    return f"the next run resumes from step {checkpoint_step(newest)} ({newest})"


def _run_in(tb: TracebackType | None) -> Run | None:
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, Run):
                return value
        tb = tb.tb_next
    return None


def _main(argv: list[str] | None) -> int:
    # Our own progress bar and log lines say what happens; the libraries' per-file bars only add noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return dispatch(sys.argv[1:] if argv is None else argv)
    except preempt.Preempted as exc:
        err_console.print(f"[yellow]preempted[/]: {exc} (exit code {exc.exit_code})")
        return exc.exit_code
    except UserError as exc:
        # The message as written: a path, a key such as stage.policies[ppo] or a user's source line is not markup.
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        return exc.exit_code
    except KeyboardInterrupt as exc:  # a Ctrl-C that stopped at once (inside the training loop the first one saves)
        err_console.print(f"[yellow]interrupted[/]: {after_ctrl_c(exc)}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
