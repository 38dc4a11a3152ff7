"""A process that imports what every `rlhf` run imports (torch, transformers, DeepSpeed, rlhf_cli: 5-6 s on 2 cores)
once, then forks one child per CLI invocation that the integration tests make (tests/integration/conftest.py).

Each child is what `python -m rlhf_cli ARGS` is, less the imports: its own process, cwd, environment, stdout and
stderr files, exit status and interpreter teardown; it runs `rlhf_cli.__main__` afresh through runpy. The tests
of start-up itself (which modules a command imports, how long it takes) do not come here: they start a real
interpreter (tests/unit/test_startup.py), as do the tests that signal a running process.

Protocol, one JSON line per request on stdin: {"argv", "cwd", "env", "out", "err"}; the answer on stdout is the
child's pid, then its exit status as subprocess reports it (negative: killed by that signal). A request with "ranks"
(a list of {"env", "out", "err"}, one per rank) forks one child per rank at once, each with the request's environment
plus its own (RANK, ...) and its own output files: the ranks of one distributed run, as a launcher starts them; the
answers are then the pids on one line, then the exit statuses on the next.
"""

import json
import os
import sys


def _preload() -> None:
    # What `_main` sets before anything imports huggingface_hub (which reads it at import).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import importlib
    import pkgutil

    import deepspeed  # noqa: F401
    import hydra.core.override_parser.overrides_parser  # noqa: F401  (config composition)
    import peft  # noqa: F401  (LoRA and DPO's adapter reference)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401  (the lazy model code, the largest part)

    import rlhf_cli

    for module in pkgutil.walk_packages(rlhf_cli.__path__, "rlhf_cli."):
        if not module.name.endswith("__main__"):  # runpy runs that one in the child
            importlib.import_module(module.name)


def _serve(answers) -> dict:
    """Answer requests until stdin closes (then exit); return a request in each forked child."""
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pids = []
        for rank in request.pop("ranks", None) or [{}]:
            pid = os.fork()
            if pid == 0:
                answers.close()
                return {**request, **rank, "env": {**request["env"], **rank.get("env", {})}}
            pids.append(pid)
        print(*pids, file=answers, flush=True)
        print(*(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids), file=answers, flush=True)
    sys.exit(0)


def _become(request: dict) -> None:
    """Turn this forked child into `python -m rlhf_cli ARGV` started in `cwd` with `env`."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, mode in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        opened = os.open(path, mode, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.path[0] = os.getcwd()  # as `python -m` does: the cwd's modules (reward functions) are importable
    sys.argv = [sys.argv[0], *request["argv"]]


if __name__ == "__main__":
    # Answers go to the stdout we were given; what the imports print (DeepSpeed's accelerator line) goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _preload()
    _become(_serve(answers))
    import runpy

    runpy.run_module("rlhf_cli", run_name="__main__", alter_sys=True)
