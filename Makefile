# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test bench bench-learning lint clean

# The venv is (re)built when the package metadata or the pinned versions change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole chain on the built-in tiny model and sample data (configs/pipeline/default.yaml: sft -> rm -> ppo, dpo
# and rejection sampling from the same sft, then eval; about 10 minutes on 2 CPU cores), ending with a summary table;
# then a completion from the newest policy. Run again, it skips the completed stages and prints the table.
demo: install
	$(BIN)/rlhf pipeline run.name=demo
	$(BIN)/rlhf generate run.name=demo stage=ppo prompt="What is the capital of France?"

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python scripts/bench.py

# The full-length learning checks (the suite runs short versions): per seed one sft, then ppo_parity (60 iterations)
# and rs_parity (2 rounds) on copies of it; 3 seeds, about 6 minutes each on 2 CPU cores (18 in all).
bench-learning: install
	$(BIN)/python scripts/bench_learning.py --seeds 1 2 3 --stages ppo rejection_sampling

lint: install
	$(BIN)/ruff check rlhf_cli tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
