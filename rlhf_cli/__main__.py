"""`python -m rlhf_cli ...` (what `torchrun -m rlhf_cli` runs on every rank)."""

import sys

from rlhf_cli import preempt

preempt.record_early()  # before anything slow: a scheduler's signal in the first second is kept (see preempt)

from rlhf_cli.cli import main  # noqa: E402

sys.exit(main())
