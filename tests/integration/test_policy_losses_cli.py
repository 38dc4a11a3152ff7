"""`stage.policy_loss=gspo|cispo` end to end (docs/algorithms.md 8.9, 8.10): `rlhf grpo` from the built-in tiny
model (no sft needed) on the parity prompts, rewarded by the reply's length (the untrained model earns no parity
reward, and equal rewards give no advantage), 2 epochs x 2 mini-batches so the ratio moves off 1 after the first
optimizer step and the clip has something to do; the clip fractions are logged; a bad value is refused before any
model loads."""

import pytest
from conftest import FAST, manifest, metrics, rlhf

BASE = [
    *FAST,
    "model.name_or_path=builtin:tiny-llama",
    "data=parity",
    "data.eval_fraction=0",
    "stage.reward.model=null",
    "stage.reward.function=length_reward:score",
    "stage.rollout_batch_size=4",
    "stage.n_samples=4",
    "stage.generation.max_new_tokens=6",
    "stage.save_every=0",
    "stage.max_steps=2",
    "stage.ppo_epochs=2",
]
LENGTH_REWARD = "def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n"


@pytest.mark.parametrize(
    "loss,extra,clip_keys",
    [
        # The GSPO paper's range and mean per sequence: the ratios of whole responses, clipped per response.
        (
            "gspo",
            ["stage.clip_eps_low=3e-4", "stage.clip_eps_high=4e-4", "stage.loss_aggregation=seq_mean_token_mean"],
            ("clipfrac_seq_low", "clipfrac_seq_high"),
        ),
        # MiniMax-M1's: no lower bound, a tight upper one so that weights get cut.
        ("cispo", ["stage.clip_eps_low=1.0", "stage.clip_eps_high=1e-3"], ("clipfrac_high",)),
    ],
)
def test_grpo_trains_with_the_policy_loss_and_logs_its_clip_fraction(runs, tmp_path, loss, extra, clip_keys):
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    res = rlhf("grpo", *BASE, *extra, f"stage.policy_loss={loss}", f"run.root={runs}", "run.name=pl", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert manifest(runs / "pl")["stages"]["grpo"]["status"] == "completed"
    log = [r for r in metrics(runs / "pl", "grpo") if "policy_loss" in r]
    assert [r["step"] for r in log] == [1, 2] and all(r["optimizer_steps"] == 4 for r in log)
    assert all(r["zero_variance_groups"] < 1 for r in log)  # advantages not all 0: the policy moves
    for row in log:
        assert {"clipfrac_low", "clipfrac_high", *clip_keys} <= set(row)
        assert all(0.0 <= row[k] <= 1.0 for k in clip_keys)
    # 3 optimizer steps after the first one in each iteration: some response's (token's) ratio left the range.
    assert sum(row[k] for row in log for k in clip_keys) > 0
    if loss == "cispo":
        assert "clipfrac_seq_low" not in log[0]  # sequence shares are GSPO's alone


def test_a_bad_policy_loss_is_refused_naming_the_key(runs, tmp_path):
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    res = rlhf("grpo", *BASE, "stage.policy_loss=dual_clip", f"run.root={runs}", "run.name=bad", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "stage.policy_loss" in res.stderr and "gspo" in res.stderr and "Traceback" not in res.stderr
    assert not (runs / "bad" / "grpo" / "metrics.jsonl").exists()
