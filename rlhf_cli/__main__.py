"""`python -m rlhf_cli ...` (what `torchrun -m rlhf_cli` runs on every rank) and the `rlhf` command (`entry`)."""

import sys

from rlhf_cli import preempt


def entry() -> int:
    """The program: TERM and USR1 recorded before anything slow (a scheduler's signal in the first second is kept,
    see preempt.record_early), then the CLI."""
    preempt.record_early()
    from rlhf_cli.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(entry())
