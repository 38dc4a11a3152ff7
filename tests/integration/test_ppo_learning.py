"""Learning: PPO, rejection sampling and GRPO raise the gold reward of held-out prompts of the parity task above the SFT
policy (all start from one `rlhf sft` run).

The tiny default model fine-tuned on the built-in sample (which asks "Is N even or odd?" only 11 times) answers
in the right shape but is right about half the time. `+experiment=ppo_parity` trains on 420 parity prompts with
the gold reward (rlhf_cli.tasks.parity:gold_reward) as the reward function and evaluates greedy answers on 180
numbers it never trains on. Measured on 2 CPU cores (seed 42): held-out accuracy 0.57 before PPO, 0.89 after 30
iterations, 0.97 after 60, with a KL to the reference of 10-15 nats per response; about 1.5 minutes for PPO. The
path is sensitive to floating-point detail (an earlier build that computed the logits of every position, not only
the response's, reached 0.83), hence the margin in the bar: +0.15 over the SFT policy.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import manifest, metrics, rlhf


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """The default `rlhf sft` (the tiny model on the built-in sample), shared by the learning tests."""
    root = tmp_path_factory.mktemp("learning")
    sft = rlhf("sft", f"run.root={root}", "logging.progress=false", cwd=root, timeout=600)
    assert sft.returncode == 0, sft.stderr
    return root / "demo"


def _copy(sft_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(sft_run, runs / "demo", ignore=shutil.ignore_patterns(".lock"))
    return runs


def test_ppo_learns_parity_beyond_the_sft_policy(sft_run, tmp_path):
    runs = _copy(sft_run, tmp_path)
    res = rlhf("ppo", "+experiment=ppo_parity", f"run.root={runs}", "logging.progress=false", "stage.save_every=0",
               cwd=tmp_path, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr
    evals = [r for r in metrics(runs / "demo", "ppo") if "eval_score" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 60
    assert 0.3 < before["eval_score"] < 0.75  # the SFT policy: right about half the time
    assert after["eval_score"] >= before["eval_score"] + 0.15, (before["eval_score"], after["eval_score"])
    assert after["eval_eos_fraction"] > 0.9  # still answers and stops
    kl = [r["kl"] for r in metrics(runs / "demo", "ppo") if "kl" in r]
    assert 0.0 < kl[-1] < 40.0  # moved away from the reference, within the KL penalty's leash
    assert manifest(runs / "demo")["stages"]["ppo"]["metrics"]["eval_score"] == after["eval_score"]


def test_best_of_8_rejection_sampling_learns_parity_beyond_the_sft_policy(sft_run, tmp_path):
    """Rejection sampling with the gold reward as the reward function (`+experiment=rs_parity`): per round, 8 samples
    for each of 420 prompts, the best kept, 3 epochs of SFT on them; held-out gold accuracy on the 180 other numbers.
    Measured on 2 CPU cores (3 seeds of the stage on this SFT policy; the held-out split moves with the seed): 0.57 /
    0.54 / 0.53 before, 0.79 / 0.68 / 0.84 after round 1, 0.97 / 0.98 / 1.00 after round 2; about 50 s. With 4
    samples instead of 8 the same two rounds reach only 0.68 (fewer prompts have a right answer to keep). The bars:
    +0.08 after one round, +0.3 after two."""
    runs = _copy(sft_run, tmp_path)
    res = rlhf("rejection_sampling", "+experiment=rs_parity", f"run.root={runs}", "logging.progress=false",
               cwd=tmp_path, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr
    log = metrics(runs / "demo", "rejection_sampling")
    before, round1, after = [r for r in log if "eval_gold" in r]
    assert before["step"] == 0 and round1["round"] == 1 and after["step"] == 2 * round1["step"]
    assert 0.3 < before["eval_gold"] < 0.75  # the SFT policy: right about half the time
    assert round1["eval_gold"] >= before["eval_gold"] + 0.08, (before["eval_gold"], round1["eval_gold"])
    assert after["eval_gold"] >= before["eval_gold"] + 0.3, (before["eval_gold"], after["eval_gold"])
    assert after["eval_eos_fraction"] > 0.9
    first, second = [r for r in log if "selected_score_mean" in r]
    # Best-of-8 keeps mostly right answers; the second round samples from a better policy.
    assert first["selected_score_mean"] > 0.8 > 0.6 > first["candidate_score_mean"]
    assert second["candidate_score_mean"] > first["candidate_score_mean"]


def test_grpo_learns_parity_beyond_the_sft_policy(sft_run, tmp_path):
    """GRPO with the gold reward as the reward function (`+experiment=grpo_parity`: 16 prompts x 8 samples per
    iteration, 4 mini-batches x 2 epochs, lr 1e-4, no KL), cut to its first 10 iterations; held-out greedy gold
    accuracy on the 180 other numbers. Measured on one SFT policy (seeds 42 / 1 / 2 of the stage): 0.57 / 0.54 / 0.53
    before, 0.69 / 0.63 / 0.69 after 10 iterations, 0.71 / 0.69 / 0.79 after the full 40 (`make bench-learning` runs
    those, and RLOO and REINFORCE++). The bar: +0.06 after 10."""
    runs = _copy(sft_run, tmp_path)
    res = rlhf("grpo", "+experiment=grpo_parity", f"run.root={runs}", "logging.progress=false", "stage.save_every=0",
               "stage.max_steps=10", cwd=tmp_path, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr
    evals = [r for r in metrics(runs / "demo", "grpo") if "eval_gold" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 10
    assert after["eval_gold"] >= before["eval_gold"] + 0.06, (before["eval_gold"], after["eval_gold"])
    assert after["eval_eos_fraction"] > 0.9
