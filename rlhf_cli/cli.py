"""`rlhf <stage> [overrides]`: compose -> validate -> run directory -> STAGES[stage](cfg, run).

No training logic here. Every `UserError` ends as one red line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from rlhf_cli import launch, preempt
from rlhf_cli.errors import UserError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)

# Stage name -> module with `run(cfg, run)`; one name per stage (CLI verb, config, module, run-dir folder).
STAGES: dict[str, str] = {
    "sft": "rlhf_cli.stages.sft",
    "rm": "rlhf_cli.stages.rm",
    "dpo": "rlhf_cli.stages.dpo",
    "ppo": "rlhf_cli.stages.ppo",
}
EXAMPLES: dict[str, str] = {
    "sft": "rlhf sft +experiment=dolly optim.lr=2e-5   # supervised fine-tuning (default: tiny built-in demo)",
    "rm": "rlhf rm +experiment=hh_rlhf                 # reward model on preference pairs, from this run's sft",
    "dpo": "rlhf dpo stage.loss=ipo stage.beta=0.5     # DPO family on preference pairs, from this run's sft",
    "ppo": "rlhf ppo stage.kl_coef=0.1                 # PPO with a critic: policy from sft, reward + critic from rm",
}
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("rlhf_cli.commands.generate", 'rlhf generate run=demo prompt="What is the capital of France?"'),
    "explain": ("rlhf_cli.commands.explain", "rlhf explain sft deepspeed=zero3 launcher.nproc_per_node=8"),
    "score": ("rlhf_cli.commands.score", 'rlhf score run=demo prompt="What is 2 + 2?" response="2 + 2 = 4."'),
}

USAGE = """usage: rlhf <command> [key=value ...] [--cfg job] [--help]

Stages (each composes configs/config.yaml with Hydra; any key can be overridden, e.g. optim.lr=2e-5,
a config group swapped, e.g. model=qwen2_5_0_5b, and an experiment applied with +experiment=<name>):
{stages}

Tools:
{tools}

Options:
  --cfg job    print the composed, validated config of a stage and exit without running
  --help       this help

The run directory is runs/<run.name>/ (run.root, run.name); an interrupted stage resumes when the same
command is run again, and a completed stage is kept unless run.overwrite=true.
"""


def usage() -> str:
    stages = "\n".join(f"  {name:<12}{EXAMPLES[name]}" for name in STAGES)
    tools = "\n".join(f"  {name:<12}{example}" for name, (_, example) in COMMANDS.items())
    return USAGE.format(stages=stages, tools=tools)


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

    if cfg.launcher.nproc_per_node > 1 and not launch.under_launcher():
        return launch.self_launch(cfg.launcher, stage, args, Path(cfg.run.root) / cfg.run.name / "manifest.json")

    from rlhf_cli import engine
    from rlhf_cli.config.compose import config_hash
    from rlhf_cli.run_dir import now, open_run

    preempt.install()
    dist = engine.init_distributed()
    if not engine.same_on_all_ranks(config_hash(cfg)):
        raise UserError("the ranks composed different configs; start every rank with the same command and configs/")
    run = open_run(cfg.run, stage, is_main=dist.is_main)
    engine.barrier()
    if not dist.is_main:
        launch.redirect_rank_output(run.stage_dir / "logs", dist.rank)
    try:
        out = importlib.import_module(STAGES[stage]).run(cfg, run)
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        status = {KeyboardInterrupt: "interrupted", preempt.Preempted: "preempted"}.get(type(exc), "failed")
        run.update_stage(status=status, error=reason, ended_at=now())
        # Preempted: every rank got here at the same step, so they can leave together.
        engine.shutdown(together=isinstance(exc, preempt.Preempted))
        raise
    finally:
        run.release()
    engine.shutdown()
    if dist.is_main:
        if out is None:
            err_console.print(f"stage {stage} stopped early; run the same command again to resume ({run.root})")
        else:
            try_next = {"rm": f'rlhf score run={run.root.name} root={cfg.run.root} prompt="What is 2 + 2?" '
                              'response="2 + 2 = 4."'}.get(stage, f"rlhf generate run={run.root.name} "
                              f'root={cfg.run.root} stage={stage} prompt="What is the capital of France?"')  # fmt: skip
            err_console.print(f"[green]done[/]: {out}\nrun directory: {run.root}\ntry: {try_next}")
    return 0


def dispatch(argv: list[str]) -> int:
    argv = launch.strip_local_rank(argv)  # the deepspeed launcher puts it before the verb
    if not argv or argv[0] in ("-h", "--help", "help"):
        out_console.print(usage(), markup=False)
        return 0 if argv else 2
    verb, args = argv[0], argv[1:]
    if verb in STAGES:
        if "--help" in args or "-h" in args:
            out_console.print(f"{EXAMPLES[verb]}\n\n`rlhf {verb} --cfg job` lists every key.", markup=False)
            return 0
        return run_stage(verb, args)
    if verb in COMMANDS:
        module: Callable = importlib.import_module(COMMANDS[verb][0])
        return module.main(args)
    import difflib

    close = difflib.get_close_matches(verb, list(STAGES) + list(COMMANDS), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    raise UserError(f"unknown command `{verb}`{hint} (`rlhf --help` lists them)")


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    engine = sys.modules.get("rlhf_cli.engine")
    if engine is not None:  # a rank of a multi-rank run ends here, without interpreter teardown
        engine.exit_now(code)
    return code


def _main(argv: list[str] | None) -> int:
    # Our own progress bar and log lines say what happens; the libraries' per-file bars only add noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return dispatch(sys.argv[1:] if argv is None else argv)
    except preempt.Preempted as exc:
        err_console.print(f"[yellow]preempted[/]: {exc} (exit code {exc.exit_code})")
        return exc.exit_code
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]; run the same command again to resume from the last checkpoint")
        return 130


if __name__ == "__main__":
    sys.exit(main())
