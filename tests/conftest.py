"""Settings for the whole suite (`make test`: two pytest-xdist workers; `make test-fast`; see the Makefile).

- Every torch process of the suite uses one thread (OMP_NUM_THREADS=1 in each worker, inherited by the `rlhf` runs it
  starts): two workers then keep two cores busy without OpenMP's spinning threads fighting, and the learning tests'
  numbers do not depend on the machine's core count (a learning path moves with rounding, which moves with threads).
- `learning`: the learning tests (tests/integration/test_learning_*.py, test_rm_learning.py), the longest files of
  the suite: collected first, so that the workers start on them and finish together.
- `slow`: every end-to-end test but the smoke tests in SMOKE; `make test-fast` leaves them out.
"""

import os
from pathlib import Path

import pytest

# Before any test module imports torch: torch reads it when it starts its thread pool. Two workers with torch's default
# of one thread per core would put four busy threads on two cores.
os.environ["OMP_NUM_THREADS"] = "1"

INTEGRATION = Path(__file__).parent / "integration"

# The end-to-end tests of the fast loop: the refusals and the help, then one run of each stage family on the small
# model (sft, dpo, the rm -> ppo chain, rejection sampling, grpo, eval).
SMOKE = (
    "test_errors.py::",
    "test_cli_help.py::",
    "test_sft_cli.py::test_sft_end_to_end",
    "test_dpo_cli.py::test_dpo_end_to_end_after_sft_in_the_same_run",
    "test_ppo_cli.py::test_ppo_end_to_end_after_sft_and_rm",
    "test_rejection_sampling.py::test_two_rounds_after_sft_and_rm",
    "test_critic_free_cli.py::test_grpo_with_the_reward_model_resumes_to_the_same_weights",
    "test_eval_cli.py::test_eval_writes_every_field_and_the_reference_ties_with_itself",
)


def narrowed(config: pytest.Config) -> bool:
    """Whether the command picks tests inside a file (-k, or a test id)."""
    return bool(config.option.keyword) or any("::" in arg for arg in config.args)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    matched, files = set(), set()
    for item in items:
        if item.path.parent != INTEGRATION:
            continue
        name = f"{item.path.name}::{item.name}"
        files.add(item.path.name)
        smoke = next((s for s in SMOKE if name.startswith(s)), None)
        if smoke:
            matched.add(smoke)
        else:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("learning") is None)  # stable: the learning files first
    # A renamed smoke test would otherwise drop out of the fast loop unnoticed.
    lost = [s for s in SMOKE if s.split("::")[0] in files and s not in matched and not narrowed(config)]
    if lost:
        raise pytest.UsageError(f"tests/conftest.py SMOKE names tests that do not exist: {lost}")
