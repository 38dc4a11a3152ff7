"""`python -m rlhf_cli ...` (what `torchrun -m rlhf_cli` runs on every rank)."""

import sys

from rlhf_cli.cli import main

sys.exit(main())
