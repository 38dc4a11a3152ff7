"""`rlhf grpo rollout.engine=vllm` end to end on a tiny run, interrupted and resumed to completion, its metrics with
the sampler-trainer mismatch; then `rlhf eval rollout.engine=vllm` of its policy against the start; `rlhf ppo` with
vLLM stopped and resumed == uninterrupted; one rejection-sampling round drawn by vLLM (`make test-vllm`, .venv-vllm).
"""

import json
import os
import subprocess
import sys

import pytest

# A submodule, not `vllm` itself: where tests/ is on sys.path (pytest's rootdir conftest), this folder is a
# namespace package named `vllm` that `import vllm` finds when vLLM is not installed.
pytest.importorskip(
    "vllm.sampling_params", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm"
)

# The built-in tiny model as the policy and the reference, with attention vLLM's CPU build runs (head size 32;
# tests/vllm_engine/vllm_helpers.py), as the starting policy: no `rlhf sft` first, to keep this step short.
MODEL = [
    "model.name_or_path=builtin:tiny-llama",
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128",
    "model.tiny.num_hidden_layers=2",
    "model.tiny.num_attention_heads=2",
    "model.tiny.num_key_value_heads=1",
    "logging.progress=false",
    "logging.plots=false",
]
# 4 parity prompts x 4 samples an iteration, 8-token answers, a reward function that varies between samples (the
# parity gold reward is 0 for every answer of an untrained model: no advantage, no update, nothing to push to vLLM).
GRPO = [
    "data=parity",
    "data.eval_fraction=0.02",
    "stage.reward.model=null",
    "stage.reward.function=length_reward:reward",
    "stage.rollout_batch_size=4",
    "stage.n_samples=4",
    "stage.generation.max_new_tokens=8",
    "stage.micro_batch_size=4",
    "stage.gradient_accumulation_steps=2",
    "stage.eval_batch_size=8",
    "stage.eval_every=2",
    "stage.save_every=1",
    "stage.max_steps=3",
    "optim.lr=3e-3",
    "rollout.engine=vllm",
]
MISMATCH = ("sampler_kl", "sampler_abs_logp_diff", "sampler_truncated")


REWARD = "def reward(prompts, responses):\n    return [len(r) / 20 for r in responses]\n"


def rlhf(*args: str, cwd, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(extra, PYTHONPATH=str(cwd))  # length_reward.py
    cmd = [sys.executable, "-m", "rlhf_cli", *args, f"run.root={cwd / 'runs'}", "run.name=v"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def records(run, stage):
    return [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]


def test_grpo_with_vllm_resumes_to_completion_and_eval_runs(tmp_path):
    """The policy learns (its weights move every iteration) while vLLM samples: vLLM's log-probs stay those of the
    trainer to fp32 rounding only if every iteration's weights reached vLLM before it sampled."""
    (tmp_path / "length_reward.py").write_text(REWARD)
    first = rlhf("grpo", *MODEL, *GRPO, "stage.stop_after_steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-5000:]
    assert "rollout engine: vllm (rollout.engine=vllm)" in first.stderr + first.stdout
    second = rlhf("grpo", *MODEL, *GRPO, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-5000:]
    assert "resuming grpo from" in second.stderr
    assert "Traceback" not in first.stderr + second.stderr  # vLLM's teardown at exit left the trainer's group alone
    run = tmp_path / "runs" / "v"
    assert json.loads((run / "manifest.json").read_text())["stages"]["grpo"]["status"] == "completed"
    iterations = [r for r in records(run, "grpo") if "policy_loss" in r]
    assert [r["step"] for r in iterations] == [1, 2, 3]
    for r in iterations:
        assert all(key in r for key in MISMATCH), r
        # fp32 on both sides: the sampler is the trainer up to rounding, so the cap never acts.
        assert 0 <= r["sampler_kl"] < 1e-6 and r["sampler_abs_logp_diff"] < 1e-3 and r["sampler_truncated"] == 0
    assert any("eval_score" in r for r in records(run, "grpo"))
    assert any(r["policy_loss"] != 0 for r in iterations) and len({r["score_mean"] for r in iterations}) > 1

    res = rlhf(
        "eval",
        *MODEL,
        "rollout.engine=vllm",
        "data=parity",
        "data.eval_fraction=0.05",
        "stage.max_prompts=8",
        "stage.generation.max_new_tokens=8",
        "stage.gold=rlhf_cli.tasks.parity:gold_reward",
        cwd=tmp_path,
        VLLM_LOGGING_LEVEL="INFO",  # eval prints no engine line of its own: vLLM's start-up line says it ran
    )
    assert res.returncode == 0, res.stderr[-5000:]
    assert "Initializing a V1 LLM engine" in res.stderr + res.stdout
    results = json.loads((run / "eval" / "eval.json").read_text())["results"]
    assert set(results) == {"reference", "grpo"} and results["reference"]["kl"] == 0.0
    assert results["grpo"]["kl"] > 0 and 0.0 <= results["grpo"]["gold_mean"] <= 1.0  # the trained policy moved


# PPO (with its critic, started from the policy: the reward is a function) at the GRPO test's sizes: 8 prompts an
# iteration, one sample each, 8-token answers, one mini-batch of 4 x 2.
PPO = [
    "data=parity",
    "data.eval_fraction=0.02",
    "stage.reward.model=null",
    "stage.reward.function=length_reward:reward",
    "stage.rollout_batch_size=8",
    "stage.generation.max_new_tokens=8",
    "stage.micro_batch_size=4",
    "stage.gradient_accumulation_steps=2",
    "stage.eval_batch_size=8",
    "stage.eval_every=0",
    "stage.save_every=1",
    "stage.max_steps=3",
    "optim.lr=3e-3",
    "stage.critic.lr=3e-3",
    "rollout.engine=vllm",
]


def test_ppo_with_vllm_stopped_and_resumed_equals_uninterrupted(tmp_path):
    """vLLM draws with per-request seeds taken from torch's RNG, which the checkpoint restores: a run stopped after
    iteration 2 and resumed (a new process, a new vLLM engine, the weights pushed again from the checkpoint) samples
    what the uninterrupted run sampled, so the two end with the same metrics and weights."""
    from safetensors.torch import load_file

    (tmp_path / "length_reward.py").write_text(REWARD)
    full, parts = tmp_path / "full", tmp_path / "parts"
    for where in (full, parts):
        where.mkdir()
        (where / "length_reward.py").write_text(REWARD)
    whole = rlhf("ppo", *MODEL, *PPO, cwd=full)
    assert whole.returncode == 0, whole.stderr[-5000:]
    assert "rollout engine: vllm (rollout.engine=vllm)" in whole.stderr + whole.stdout
    first = rlhf("ppo", *MODEL, *PPO, "stage.stop_after_steps=2", cwd=parts)
    assert first.returncode == 0, first.stderr[-5000:]
    second = rlhf("ppo", *MODEL, *PPO, cwd=parts)
    assert second.returncode == 0, second.stderr[-5000:]
    assert "resuming ppo from" in second.stderr
    a, b = ([r for r in records(w / "runs" / "v", "ppo") if "policy_loss" in r] for w in (full, parts))
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert all(key in rb for key in MISMATCH), rb
        for key in ("score_mean", "kl", "policy_loss", "value_loss", "response_length"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    assert len({r["score_mean"] for r in a}) > 1  # the policy moved, so the resumed vLLM had new weights to sample
    wa, wb = (load_file(w / "runs" / "v" / "ppo" / "final" / "model.safetensors") for w in (full, parts))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_rejection_sampling_with_vllm_draws_scores_and_fine_tunes_a_round(tmp_path):
    """One round of best-of-4 over 8 parity prompts drawn by vLLM, scored by the reward function, the best kept and
    fine-tuned on: the round's files and metrics are those of the hf engine's rounds."""
    (tmp_path / "length_reward.py").write_text(REWARD)
    res = rlhf(
        "rejection_sampling",
        *MODEL,
        "data=parity",
        "data.eval_fraction=0.02",
        "stage.reward.model=null",
        "stage.reward.function=length_reward:reward",
        "stage.rounds=1",
        "stage.n_samples=4",
        "stage.prompts_per_round=8",
        "stage.generation_batch_size=4",
        "stage.generation.max_new_tokens=8",
        "stage.eval_batch_size=8",
        "stage.max_steps=2",
        "stage.save_every=0",
        "rollout.engine=vllm",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    assert "rollout engine: vllm (rollout.engine=vllm)" in res.stderr + res.stdout
    run = tmp_path / "runs" / "v"
    assert json.loads((run / "manifest.json").read_text())["stages"]["rejection_sampling"]["status"] == "completed"
    round_dir = run / "rejection_sampling" / "round-1"
    cands = [json.loads(line) for line in (round_dir / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 8 * 4 and len({c["prompt_index"] for c in cands}) == 8
    assert len({c["response"] for c in cands}) > 8  # sampled, not one greedy answer per prompt
    chosen = [json.loads(line) for line in (round_dir / "selected.jsonl").read_text().splitlines()]
    assert 0 < len(chosen) <= 8 and all(c["response_ids"] for c in chosen)
    (row,) = [r for r in records(run, "rejection_sampling") if "selected_score_mean" in r]
    assert row["candidates"] == 32 and row["gen_tok/s"] > 0
    assert row["selected_score_mean"] >= row["candidate_score_mean"]
    assert (run / "rejection_sampling" / "final" / "model.safetensors").is_file()
