"""Learning with a learned reward: the learning benchmark's chain (configs/pipeline/parity.yaml, `make bench-learning`)
from two sft starts. The reward model learns parity from preference pairs, DPO's RPO variant learns from the same
pairs, PPO optimises the learned reward within its KL budget; `rlhf eval` scores every policy's greedy answers to the
held-out parity prompts with the gold metric.

The tests run with one torch thread per process (`make test`'s workers; tests/conftest.py), so their numbers do not
depend on the machine's core count; measured numbers below are on one thread unless said otherwise.
"""

from __future__ import annotations

import json

import pytest
from conftest import copy_start, manifest, rlhf

from rlhf_cli.commands.pipeline import load_pipeline

pytestmark = pytest.mark.learning


def chain(sft_run, tmp_path, seed: list[str]) -> dict:
    """The benchmark's chain after a copy of `sft_run`, stage by stage with the pipeline file's settings: rm, dpo (1
    epoch), ppo (its 60 iterations, evaluated at the end only), eval; returns the eval results and the reward model's
    record. (Each stage through the test helper, which forks a process with the libraries loaded; `rlhf pipeline`
    starts a new interpreter per stage, about 5 s each, and has its own tests.)"""
    runs = copy_start(sft_run, tmp_path)
    parity = load_pipeline("parity").overrides
    stages = {"rm": [*parity["rm"], "stage.save_every=0"],
              "dpo": [*parity["dpo"], "stage.epochs=1", "stage.save_every=0"],
              "ppo": [*parity["ppo"], "stage.eval_every=0"],
              "eval": ["data=parity", "stage.gold=rlhf_cli.tasks.parity:gold_reward",
                       "stage.kl_samples=2"]}  # fmt: skip
    for stage, args in stages.items():
        res = rlhf(stage, *args, f"run.root={runs}", *seed, "logging.progress=false", cwd=tmp_path, timeout=900)
        assert res.returncode == 0, (stage, res.stderr[-3000:])
    results = json.loads((runs / "demo" / "eval" / "eval.json").read_text())["results"]
    return {"results": results, "rm": manifest(runs / "demo")["stages"]["rm"]["metrics"]}


def test_learned_reward_chain_rm_dpo_and_ppo_on_parity_pairs_beat_the_sft_policy(sft_run, sft_run_seed_2, tmp_path):
    """From two sft starts (seed 42, and the benchmark's seed 2 with the whole chain at seed 2): the reward model has
    to learn parity from pairs it never saw the prompts of, in replies that often name another number; the DPO and PPO
    policies' greedy answers must beat the SFT policy's on the gold metric, PPO within its KL budget, by the
    benchmark's rule: a mean gain over the starts and no start below zero. Two starts, so that one start's draw can
    neither hide a collapse nor fail alone (the benchmark's PPO went from +0.117 to +0.000 on a rounding-level change
    of its sft start).

    PPO runs the benchmark's 60 iterations. Cut to 30 (as it was until 2026-12-07) its gain hung on rounding: on two
    threads seed 42 gained +0.028 and seed 2 +0.133; on one thread (the same code, other rounding) -0.078 and +0.111.
    The seed-42 PPO's KL peaks around iteration 15 and the adaptive coefficient pulls it back; the gold gain comes
    in the second half. PPO with the fixed kl_coef 0.01 it had before (no budget) learned the reward model's blind
    spot instead: gold +0.000 at 31 nats on seed 1 of the benchmark."""
    ppo_gains = []
    for start, seed in ((sft_run, []), (sft_run_seed_2, ["seed=2"])):
        out = chain(start, tmp_path / ("start2" if seed else "start42"), seed)
        results, sft = out["results"], out["results"]["sft"]["gold_mean"]
        assert out["rm"]["eval_accuracy"] >= 0.8, (seed, out["rm"])
        assert results["dpo"]["gold_mean"] >= sft + 0.05, (seed, sft, results["dpo"])
        assert results["dpo"]["reward_mean"] > results["sft"]["reward_mean"]  # the learned reward agrees
        assert results["ppo"]["kl"] < 12.0, (seed, results["ppo"])  # the budget (kl_target 8 nats) held
        ppo_gains.append(results["ppo"]["gold_mean"] - sft)
    assert min(ppo_gains) >= 0.0 and sum(ppo_gains) / 2 >= 0.05, ppo_gains
