"""Learning: PPO raises the gold reward of held-out prompts of the parity task above the SFT policy.

The tiny default model fine-tuned on the built-in sample (which asks "Is N even or odd?" only 11 times) answers
in the right shape but is right about half the time. `+experiment=ppo_parity` trains on 420 parity prompts with
the gold reward (rlhf_cli.tasks.parity:gold_reward) as the reward function and evaluates greedy answers on 180
numbers it never trains on. Measured on 2 CPU cores (seed 42): held-out accuracy 0.57 before PPO, 0.89 after 30
iterations, 0.97 after 60, with a KL to the reference of 10-15 nats per response; about 1.5 minutes for PPO. The
path is sensitive to floating-point detail (an earlier build that computed the logits of every position, not only
the response's, reached 0.83), hence the margin in the bar: +0.15 over the SFT policy.
"""

from __future__ import annotations

from conftest import manifest, metrics, rlhf


def test_ppo_learns_parity_beyond_the_sft_policy(tmp_path):
    runs = tmp_path / "runs"
    sft = rlhf("sft", f"run.root={runs}", "logging.progress=false", cwd=tmp_path, timeout=600)
    assert sft.returncode == 0, sft.stderr
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
