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
    epoch), ppo (30 of its 60 iterations), eval; returns the eval results and the reward model's
    record. (Each stage through the test helper, which forks a process with the libraries loaded; `rlhf pipeline`
    starts a new interpreter per stage, about 5 s each, and has its own tests.)"""
    runs = copy_start(sft_run, tmp_path)
    parity = load_pipeline("parity").overrides
    stages = {
        "rm": [*parity["rm"], "stage.save_every=0"],
        "dpo": [*parity["dpo"], "stage.epochs=1", "stage.save_every=0"],
        "ppo": [*parity["ppo"], "stage.max_steps=30", "stage.eval_every=30"],
        "eval": ["data=parity", "stage.gold=rlhf_cli.tasks.parity:gold_reward", "stage.kl_samples=2"],
    }
    for stage, args in stages.items():
        res = rlhf(stage, *args, f"run.root={runs}", *seed, "logging.progress=false", cwd=tmp_path, timeout=900)
        assert res.returncode == 0, (stage, res.stderr[-3000:])
    results = json.loads((runs / "demo" / "eval" / "eval.json").read_text())["results"]
    return {"results": results, "rm": manifest(runs / "demo")["stages"]["rm"]["metrics"]}


def test_learned_reward_chain_rm_dpo_and_ppo_on_parity_pairs_beat_the_sft_policy(sft_run, sft_run_seed_2, tmp_path):
    """From two sft starts (seed 42, and the benchmark's seed 2 with the whole chain at seed 2): the reward model has
    to learn parity from pairs it never saw the prompts of, in replies that often name another number; DPO's greedy
    answers must beat the SFT policy's on the gold metric on each start; PPO must optimise the learned reward within
    its KL budget and gain gold accuracy over the two starts on average, with neither start falling clearly below the
    SFT policy.

    Measured gains of PPO's greedy answers over the SFT policy's (180 held-out prompts, standard error of one accuracy
    about 0.037), seeds 42 / 2 after 30 iterations: with transformers' generate, on two threads +0.028 / +0.133, on one
    -0.078 / +0.111; with the hf engine's own decoding loop, on one thread (2026-12-07) +0.078 / +0.050. `make
    bench-learning` (60 iterations, two threads) seeds 1 / 2 / 3: +0.167 / +0.172 / +0.133. With generate on one thread
    the seed-42 reward model (held-out pair accuracy 0.931, training loss 3e-7: it fits its 330 pairs exactly) let PPO
    raise its score from 1.91 to 4.33 at 5.2 nats while gold fell from 0.572 to 0.494: an error of the reward model
    exploited within the KL budget. From 2026-12-07 (afternoon) to 2026-12-07 (night) this test asked PPO only not to
    fall 0.15 below the SFT policy, because its gain moved with rounding; it asks again for a gain: a mean of +0.03
    over the two starts and no start more than 0.05 below the SFT policy (the -0.078 above fails it). It also catches
    the collapse the benchmark once showed: PPO with the fixed kl_coef 0.01 it had before (no budget) drifted to 31
    nats on seed 1 of the benchmark at gold +0.000, and here to 14.1 nats (seed 42) and 12.5 nats (seed 2), past the
    KL bound below.

    How much the outcome moves with sampling alone (2026-12-07, two threads, these sft and reward models, only PPO's
    seed varied): from the seed-2 start +0.028 +- 0.065 over 21 runs (-0.111 to +0.161), from the seed-42 start
    +0.09 +- 0.05 over 8. Any change to the rounding of the sampled tokens redraws this test, and the bar then fails
    about one draw in four with no change in how PPO learns. The hf engine's decoding step deals each row the draws
    that transformers' loop deals it (tests/unit/test_decode_step.py), so its runs are the ones measured above."""
    gains = []
    for start, seed in ((sft_run, []), (sft_run_seed_2, ["seed=2"])):
        out = chain(start, tmp_path / ("start2" if seed else "start42"), seed)
        results, sft = out["results"], out["results"]["sft"]
        assert out["rm"]["eval_accuracy"] >= 0.8, (seed, out["rm"])
        assert results["dpo"]["gold_mean"] >= sft["gold_mean"] + 0.05, (seed, sft, results["dpo"])
        assert results["dpo"]["reward_mean"] > sft["reward_mean"]  # the learned reward agrees
        ppo = results["ppo"]
        assert ppo["kl"] < 12.0, (seed, ppo)  # the budget (kl_target 8 nats) held
        assert ppo["reward_mean"] > sft["reward_mean"], (seed, sft, ppo)  # it optimised the learned reward
        gains.append(ppo["gold_mean"] - sft["gold_mean"])
    assert min(gains) >= -0.05 and sum(gains) / len(gains) >= 0.03, gains
