"""`rlhf grpo rollout.engine=vllm` end to end on a tiny run, interrupted and resumed to completion, its metrics with
the sampler-trainer mismatch; then `rlhf eval rollout.engine=vllm` of its policy against the start
(`make test-vllm`, .venv-vllm)."""

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
