"""Learning: PPO, rejection sampling and GRPO raise the gold reward of held-out prompts of the parity task above the SFT
policy, with the gold reward as the reward (from the seed-42 sft; rejection sampling from a seed-2 sft too), and the
learned-reward chain (reward model, DPO, PPO) does from two sft starts. Short versions: the first 30 of ppo_parity's 60
iterations, one of rs_parity's two rounds, 10 of grpo_parity's 40 iterations. The full-length runs, for several seeds
and with the spread over them, are `make bench-learning` (the learned-reward chain, scripts/bench_chain.py) and `make
bench-learning-stages` (one stage with the gold reward, scripts/bench_learning.py).

The tiny default model fine-tuned on the built-in sample (which asks "Is N even or odd?" only 11 times) answers in the
right shape but is right about half the time. `+experiment=ppo_parity` trains on 420 parity prompts with the gold reward
(rlhf_cli.tasks.parity:gold_reward) as the reward function and evaluates greedy answers on 180 numbers it never trains
on; an iteration's remaining mini-batches are skipped once the approximate KL to the rollout policy passes 0.05
(stage.target_kl). Measured on 2 CPU cores (`make bench-learning-stages`, sft and ppo seeded alike), held-out accuracy
before PPO / after 15 / 30 / 60 iterations: seed 42 (this test's) 0.57 / 0.69 / 0.71 / 0.82, seed 1 0.53 / 0.66 / 0.74 /
0.87, seed 2 0.56 / 0.72 / 0.76 / 0.89, seed 3 0.58 / 0.66 / 0.70 / 0.94, KL to the reference 8-13 nats per response;
about 1 minute for the 30 iterations. So +0.12 to +0.21 at 30 iterations (+0.24 to +0.36 at 60), and the bar there is
+0.08 over the SFT policy. The path is sensitive to floating-point detail: without the KL stop, seed 42 went 0.57 / 0.66
/ 0.89 / 0.97 until 27f0d71 (SFT logits only at the target positions), which moved the SFT weights by at most 5e-5, and
after it the greedy policy settled on one answer word within 15 iterations (0.49 from 15 to 60; seeds 1-3 still reached
0.91-0.96).
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import manifest, metrics, rlhf

from rlhf_cli.commands.pipeline import load_pipeline

pytestmark = pytest.mark.learning  # run alone on two threads by `make test` (tests/conftest.py)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """The default `rlhf sft` (the tiny model on the built-in sample), shared by the learning tests."""
    root = tmp_path_factory.mktemp("learning")
    sft = rlhf("sft", f"run.root={root}", "logging.progress=false", cwd=root, timeout=600)
    assert sft.returncode == 0, sft.stderr
    return root / "demo"


@pytest.fixture(scope="module")
def sft_run_seed_2(tmp_path_factory):
    """A second start: `rlhf sft seed=2`, the sft policy of the learning benchmark's seed 2."""
    root = tmp_path_factory.mktemp("learning_seed_2")
    sft = rlhf("sft", f"run.root={root}", "seed=2", "logging.progress=false", cwd=root, timeout=600)
    assert sft.returncode == 0, sft.stderr
    return root / "demo"


def _copy(sft_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(sft_run, runs / "demo", ignore=shutil.ignore_patterns(".lock"))
    return runs


def test_ppo_learns_parity_beyond_the_sft_policy(sft_run, tmp_path):
    runs = _copy(sft_run, tmp_path)
    res = rlhf("ppo", "+experiment=ppo_parity", "stage.max_steps=30", "stage.eval_every=30", f"run.root={runs}",
               "logging.progress=false", "stage.save_every=0", cwd=tmp_path, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr
    evals = [r for r in metrics(runs / "demo", "ppo") if "eval_score" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 30
    assert 0.3 < before["eval_score"] < 0.75  # the SFT policy: right about half the time
    assert after["eval_score"] >= before["eval_score"] + 0.08, (before["eval_score"], after["eval_score"])
    assert after["eval_eos_fraction"] > 0.9  # still answers and stops
    kl = [r["kl"] for r in metrics(runs / "demo", "ppo") if "kl" in r]
    assert 0.0 < kl[-1] < 40.0  # moved away from the reference, within the KL penalty's leash
    assert manifest(runs / "demo")["stages"]["ppo"]["metrics"]["eval_score"] == after["eval_score"]


@pytest.mark.parametrize("start", ["sft_run", "sft_run_seed_2"])
def test_best_of_8_rejection_sampling_learns_parity_beyond_the_sft_policy(start, request, tmp_path):
    """Rejection sampling with the gold reward as the reward function (`+experiment=rs_parity`), its first round: 8
    samples for each of 420 prompts, the best kept, 3 epochs of SFT on them; held-out gold accuracy on the 180 other
    numbers, from two sft starts (seed 42 and seed 2, the stage at seed 42). Measured before / after round 1: seed 42
    0.572 / 0.839, seed 2 0.572 / 0.711 (2026-12-07); seeds 1 / 2 / 3 of `make bench-learning-stages` 0.53 / 0.68,
    0.56 / 0.71, 0.58 / 0.69.

    The bar is +0.08 on each start. It was lowered to +0.05 for a while, when SFT packing moved the seed-42 sft
    weights at rounding level and one round gave 0.650 (+0.078): the kept answers were right either way (best of 8
    from a policy right about half the time, `selected_score_mean` > 0.8 below); what moved was how far 3 epochs on
    420 memorised answers carried to 180 unseen numbers (standard error 0.035 each). On main today one round gives
    +0.267 on that start (which of the changes since moved it back is not pinned down: the stage's round files and
    reward handling changed, the sft start did not), so +0.078 was one draw, not the stage's level; the second start
    keeps one start's draw from hiding a collapse or failing alone. With 4 samples instead of 8 two rounds reach only
    0.68 (fewer prompts have a right answer to keep)."""
    runs = _copy(request.getfixturevalue(start), tmp_path)
    res = rlhf("rejection_sampling", "+experiment=rs_parity", "stage.rounds=1", f"run.root={runs}",
               "logging.progress=false", cwd=tmp_path, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr
    log = metrics(runs / "demo", "rejection_sampling")
    before, after = [r for r in log if "eval_gold" in r]
    assert before["step"] == 0 and before["round"] == 0 and after["step"] > 0
    assert 0.3 < before["eval_gold"] < 0.75  # the SFT policy: right about half the time
    assert after["eval_gold"] >= before["eval_gold"] + 0.08, (before["eval_gold"], after["eval_gold"])
    assert after["eval_eos_fraction"] > 0.9
    (first,) = [r for r in log if "selected_score_mean" in r]
    # Best-of-8 keeps mostly right answers from a policy that is right about half the time.
    assert first["selected_score_mean"] > 0.8 > 0.6 > first["candidate_score_mean"]


def test_grpo_learns_parity_beyond_the_sft_policy(sft_run, tmp_path):
    """GRPO with the gold reward as the reward function (`+experiment=grpo_parity`: 16 prompts x 8 samples per
    iteration, 4 mini-batches x 2 epochs, lr 1e-4, no KL), cut to its first 10 iterations; held-out greedy gold
    accuracy on the 180 other numbers. Measured on one SFT policy (seeds 42 / 1 / 2 of the stage): 0.57 / 0.54 / 0.53
    before, 0.69 / 0.63 / 0.69 after 10 iterations, 0.71 / 0.69 / 0.79 after the full 40 (`python
    scripts/bench_learning.py --stages grpo rloo reinforce_pp` runs the 40, and RLOO and REINFORCE++). The bar: +0.06
    after 10."""
    runs = _copy(sft_run, tmp_path)
    res = rlhf("grpo", "+experiment=grpo_parity", f"run.root={runs}", "logging.progress=false", "stage.save_every=0",
               "stage.max_steps=10", cwd=tmp_path, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr
    evals = [r for r in metrics(runs / "demo", "grpo") if "eval_gold" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 10
    assert after["eval_gold"] >= before["eval_gold"] + 0.06, (before["eval_gold"], after["eval_gold"])
    assert after["eval_eos_fraction"] > 0.9


def chain(sft_run, tmp_path, seed: list[str]) -> dict:
    """The benchmark's chain after a copy of `sft_run`, stage by stage with the pipeline file's settings: rm, dpo (1
    epoch), ppo (30 of 60 iterations), eval; returns the eval results and the reward model's record. (Each stage
    through the test helper, which forks a process with the libraries loaded; `rlhf pipeline` starts a new
    interpreter per stage, about 5 s each, and has its own tests.)"""
    runs = _copy(sft_run, tmp_path)
    parity = load_pipeline("parity").overrides
    stages = {"rm": [*parity["rm"], "stage.save_every=0"],
              "dpo": [*parity["dpo"], "stage.epochs=1", "stage.save_every=0"],
              "ppo": [*parity["ppo"], "stage.max_steps=30", "stage.eval_every=30"],
              "eval": ["data=parity", "stage.gold=rlhf_cli.tasks.parity:gold_reward",
                       "stage.kl_samples=2"]}  # fmt: skip
    for stage, args in stages.items():
        res = rlhf(stage, *args, f"run.root={runs}", *seed, "logging.progress=false", cwd=tmp_path, timeout=900)
        assert res.returncode == 0, (stage, res.stderr[-3000:])
    results = json.loads((runs / "demo" / "eval" / "eval.json").read_text())["results"]
    return {"results": results, "rm": manifest(runs / "demo")["stages"]["rm"]["metrics"]}


def test_learned_reward_chain_rm_dpo_and_ppo_on_parity_pairs_beat_the_sft_policy(sft_run, sft_run_seed_2, tmp_path):
    """The learning benchmark's short version (configs/pipeline/parity.yaml, `make bench-learning`), from two sft starts
    (seed 42, and the benchmark's seed 2 with the whole chain at seed 2): the pipeline file's reward model on the
    parity preference pairs, DPO's RPO variant on the same pairs (1 epoch), PPO against the learned reward model
    with the benchmark's KL budget (30 of its 60 iterations), and `rlhf eval` with the gold metric on the held-out
    parity prompts. The reward model has to learn parity from pairs it never saw the prompts of, in replies that
    often name another number; the DPO and PPO policies' greedy answers must beat the SFT policy's on the gold
    metric, PPO within its KL budget, by the benchmark's rule: a mean gain over the starts and no start below zero.
    Two starts, so that one start's draw can neither hide a collapse nor fail alone (the benchmark's PPO went from
    +0.117 to +0.000 on a rounding-level change of its sft start).

    Measured (gold of the sft policy -> after): seed 42 DPO 0.572 -> 0.694, PPO -> 0.600 at 5.2 nats (its KL peaked
    at 14 nats at iteration 15 and the adaptive coefficient brought it back); seed 2 PPO 0.561 -> 0.694 at 30
    iterations in the benchmark. PPO with the fixed kl_coef 0.01 it had before (no budget) learned the reward
    model's blind spot instead: gold +0.000 at 31 nats on seed 1 of the benchmark; here (with today's pairs) seed 42
    0.572 -> 0.544 at 14.1 nats and seed 2 0.561 -> 0.756 at 12.5 nats, failing both the KL check and the rule."""
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
