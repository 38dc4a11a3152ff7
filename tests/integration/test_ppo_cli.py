"""`rlhf ppo` end to end on the tiny model: outputs and metrics, the first-mini-batch invariant, a Python reward
function, LoRA / ZeRO-3 / offload / ptx variants, preempted + resumed == uninterrupted, 2 ranks (ZeRO-2, ZeRO-3),
clear errors."""

import json
import shutil
import signal
import time

import pytest
import torch
from conftest import FAST, copy_run, launch_ranks, manifest, metrics, ranks, rlhf, sft_rm_base, weights
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_cli.preempt import PREEMPTED_EXIT_CODE

# Small iterations: 8 prompts per rank, mini-batches of 4 (micro 2 x accumulation 2), 2 PPO epochs.
PPO = [
    "stage.rollout_batch_size=8",
    "stage.micro_batch_size=2",
    "stage.gradient_accumulation_steps=2",
    "stage.ppo_epochs=2",
    "stage.generation.max_new_tokens=12",
    "stage.eval_batch_size=8",
    "data.eval_fraction=0.04",
    "optim.lr=1e-4",
    "stage.critic.lr=1e-4",
]
PARITY = [
    "data=parity",
    "data.eval_fraction=0.02",
    "stage.reward.function=rlhf_cli.tasks.parity:gold_reward",
]  # (the critic then starts from the policy)
OBSERVED = (
    "score_mean",
    "score_std",
    "kl",
    "non_score_reward",
    "total_reward",
    "entropy",
    "policy_loss",
    "value_loss",
    "clipfrac_policy",
    "clipfrac_value",
    "approx_kl",
    "explained_variance",
    "response_length",
    "eos_fraction",
    "kl_coef",
    "generation_share",
    "scoring_share",
    "update_share",
    "gen_tok/s",
    "train_tok/s",
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run with short `sft` and `rm` stages, copied by each test that needs them."""
    return sft_rm_base(tmp_path_factory.mktemp("ppo_base"))


def _copy(base, runs, name):
    return copy_run(base, runs, name, "ppo")


def _iterations(run_dir):
    return [r for r in metrics(run_dir, "ppo") if "policy_loss" in r]


def test_ppo_end_to_end_after_sft_and_rm(base, runs, tmp_path):
    res = rlhf(
        "ppo",
        *FAST,
        *PPO,
        *_copy(base, runs, "chain"),
        "stage.max_steps=3",
        "stage.eval_every=2",
        "stage.sample_every=1",
        "stage.sample_rows=2",
        "stage.reward.normalize=rm_stats",
        "stage.reward.clip=3",
        "stage.gold_reward=stage:rm",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    rec = manifest(runs / "chain")["stages"]["ppo"]
    assert rec["status"] == "completed" and rec["outputs"] == {"final": "ppo/final", "critic": "ppo/critic"}
    assert rec["inputs"]["critic"].endswith("chain/rm/final") and rec["inputs"]["reward"].startswith("model ")
    assert "rollout token ids" in rec["inputs"]["reward"]
    log = _iterations(runs / "chain")
    assert [r["step"] for r in log] == [1, 2, 3]
    for key in OBSERVED:
        assert key in log[-1], key
    # Dropout off, one temperature everywhere: before any update the ratio is 1 and the approximate KL 0.
    assert log[0]["log_ratio_first"] < 1e-5 and abs(log[0]["approx_kl_first"]) < 1e-8
    assert log[1]["log_ratio_first"] < 1e-5  # iteration 2 starts from an updated policy: still pi / pi_old = 1
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the actor starts as the reference
    assert log[0]["optimizer_steps"] == 4  # 2 epochs x 2 mini-batches
    evals = [r["step"] for r in metrics(runs / "chain", "ppo") if "eval_score" in r]
    assert evals == [0, 2, 3]
    # A second reward model as the gold metric (here the same one: gold = the raw proxy score) at every evaluation.
    assert all(
        r["eval_gold"] == pytest.approx(r["eval_score"]) for r in metrics(runs / "chain", "ppo") if "eval_score" in r
    )
    samples = [json.loads(line) for line in (runs / "chain" / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"prompt", "response", "score", "iteration"} <= set(samples[0])
    AutoModelForCausalLM.from_pretrained(runs / "chain" / "ppo" / "final")
    AutoModelForSequenceClassification.from_pretrained(runs / "chain" / "ppo" / "critic")
    # The end-of-stage summary: the starting evaluation kept next to the last, the next command with the run name.
    start, end = rec["summary"]["headline"]["eval_score"]
    assert start == evals_scores(runs / "chain")[0] and end == evals_scores(runs / "chain")[-1]
    assert (
        "ppo completed:" in res.stderr
        and "eval_score: " in res.stderr
        and "next: rlhf generate run.name=chain" in res.stderr
        and "target_tokens" not in rec["metrics"]
    )


def evals_scores(run_dir):
    return [r["eval_score"] for r in metrics(run_dir, "ppo") if "eval_score" in r]


def test_ppo_with_a_python_reward_function_needs_no_reward_model(base, runs, tmp_path):
    args = _copy(base, runs, "fn")
    shutil.rmtree(runs / "fn" / "rm")
    res = rlhf(
        "ppo",
        *FAST,
        *PPO,
        *PARITY,
        *args,
        "stage.max_steps=2",
        "stage.kl_control=adaptive",
        "stage.kl_target=0.5",
        "stage.gold_reward=rlhf_cli.tasks.parity:gold_reward",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    rec = manifest(runs / "fn")["stages"]["ppo"]
    assert rec["inputs"]["reward"] == "function rlhf_cli.tasks.parity:gold_reward"
    assert rec["inputs"]["critic"].endswith("fn/sft/final")
    log = _iterations(runs / "fn")
    assert all(-1.0 <= r["score_mean"] <= 1.0 for r in log)  # 0/1 gold, minus 1 for a reply without EOS
    assert log[1]["kl_coef"] != log[0]["kl_coef"]  # the adaptive controller moved
    # The gold metric beside the proxy at every evaluation; here the proxy is the gold function itself.
    evals = [r for r in metrics(runs / "fn", "ppo") if "eval_score" in r]
    assert len(evals) == 2 and all(r["eval_gold"] == r["eval_score"] for r in evals)


@pytest.mark.parametrize(
    "variant,extra",
    [
        (
            "lora",
            [
                "model.lora.enabled=true",
                "model.lora.r=4",
                "model.lora.dropout=0.1",
                "stage.offload_frozen=true",
                "stage.reward.reduce=prob",
            ],
        ),
        ("zero3", ["deepspeed=zero3", "stage.reward.normalize=running", "stage.entropy_coef=0.01"]),
        (
            "ptx",
            [
                "stage.ptx.coef=0.5",
                "stage.ptx.micro_batch_size=2",
                "stage.whiten_rewards=true",
                "stage.kl_estimator=k3",
                "stage.target_kl=1e-9",
            ],
        ),
    ],
)
def test_ppo_variants_run_and_start_at_ratio_one(base, runs, tmp_path, variant, extra):
    res = rlhf("ppo", *FAST, *PPO, *_copy(base, runs, variant), "stage.max_steps=2", *extra, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    log = _iterations(runs / variant)
    assert log[0]["log_ratio_first"] < 1e-5 and abs(log[0]["approx_kl_first"]) < 1e-8
    # Iteration 2 starts from an updated policy (LoRA B != 0, so adapter dropout would show): still pi / pi_old = 1.
    assert log[1]["log_ratio_first"] < 1e-5
    if variant == "lora":
        assert manifest(runs / variant)["stages"]["ppo"]["inputs"]["reference"].startswith("the policy with LoRA")
        assert all(-1.0 <= r["score_mean"] <= 1.0 for r in log)  # a sigmoid probability, minus a missing-EOS penalty
    if variant == "ptx":
        assert log[0]["ptx_loss"] > 0
        # The first mini-batch is measured before any update (KL 0); the second, after one, exceeds target_kl.
        assert log[0]["optimizer_steps"] == 2 and log[0]["early_stopped"] == 1.0


def test_ppo_preempted_then_resumed_equals_uninterrupted(base, runs, tmp_path):
    """SIGUSR1 during an iteration: the actor, the critic, both optimizers, the KL controller and the running reward
    statistics are saved at the next iteration boundary, exit 75; the same command resumes to the same end."""
    common = [
        *FAST,
        *PPO,
        "stage.max_steps=4",
        "stage.save_every=0",
        "stage.kl_control=adaptive",
        "stage.kl_target=0.5",
        "stage.reward.normalize=running",
        "logging.progress=false",
    ]
    full = rlhf("ppo", *common, *_copy(base, runs, "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    parts = _copy(base, runs, "parts")
    (proc,) = launch_ranks(["ppo", *common, *parts], 1, tmp_path)
    log = runs / "parts" / "ppo" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):  # the step-0 eval, then iteration 1
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(120) == PREEMPTED_EXIT_CODE, proc.stdout.read()[-2000:]
    assert manifest(runs / "parts")["stages"]["ppo"]["status"] == "preempted"
    (ckpt,) = (runs / "parts" / "ppo" / "checkpoints").iterdir()
    assert {p.name for p in ckpt.iterdir()} >= {"actor", "critic", "COMPLETE"}
    second = rlhf("ppo", *common, *parts, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"resuming ppo from {ckpt}" in second.stderr
    a, b = _iterations(runs / "full"), _iterations(runs / "parts")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("score_mean", "kl", "kl_coef", "policy_loss", "value_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    wa, wb = weights(runs / "full" / "ppo" / "final"), weights(runs / "parts" / "ppo" / "final")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_ppo_two_ranks(base, runs, tmp_path, zero):
    # ZeRO-3: generation runs with gathered parameters, so ranks whose responses end at different lengths never
    # wait on each other's all-gathers; the evaluation gives every rank the same number of prompts.
    args = [
        "ppo",
        *FAST,
        *PPO,
        *_copy(base, runs, "ddp"),
        f"deepspeed={zero}",
        "stage.max_steps=2",
        "stage.eval_every=1",
    ]
    res = ranks(args, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    rec = manifest(runs / "ddp")["stages"]["ppo"]
    assert rec["status"] == "completed"
    log = _iterations(runs / "ddp")
    assert log[0]["rollout_sequences"] == 16  # 8 prompts x 2 ranks
    assert log[0]["log_ratio_first"] < 1e-5
    state = weights(runs / "ddp" / "ppo" / "final")
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize(
    "extra,message",
    [
        (["stage.reward.function=nosuchmodule:f"], "cannot import `nosuchmodule`"),
        (["stage.reward.function=rlhf_cli.tasks.parity"], "expected `module:function`"),
        (["stage.rollout_batch_size=6"], "not a multiple of the mini-batch"),
        (["stage.kl_estimator=k4"], "stage.kl_estimator"),
        (["stage.reward.normalize=rm_stats", "stage.reward.model=stage:nope"], "rlhf nope"),
    ],
)
def test_ppo_bad_settings_fail_clearly(base, runs, tmp_path, extra, message):
    res = rlhf("ppo", *FAST, *PPO, *_copy(base, runs, "bad"), "stage.max_steps=1", *extra, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr


def test_reward_model_with_another_tokenizer_scores_texts_and_cannot_be_the_critic(base, runs, tmp_path):
    """A classifier whose tokenizer differs from the policy's (here: another chat template) scores the decoded texts
    rendered with its own template; as a critic (which reads the policy's ids) it is refused with a clear message."""
    args = _copy(base, runs, "other")
    other = runs / "other" / "other_rm"
    shutil.copytree(runs / "other" / "rm" / "final", other)
    template = other / "chat_template.jinja"
    template.write_text("Conversation follows.\n" + template.read_text())
    res = rlhf(
        "ppo",
        *FAST,
        *PPO,
        *args,
        "stage.max_steps=1",
        f"stage.reward.model={other}",
        "stage.critic.init=policy",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    rec = manifest(runs / "other")["stages"]["ppo"]
    assert rec["inputs"]["reward"].endswith("texts re-tokenized with its own tokenizer)")
    bad = rlhf(
        "ppo",
        *FAST,
        *PPO,
        *args,
        "stage.max_steps=1",
        "run.overwrite=true",
        f"stage.critic.source={other}",
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "has another tokenizer than the policy" in bad.stderr, bad.stderr


def test_ppo_without_rm_says_which_command(runs, tmp_path):
    sft = rlhf(
        "sft", *FAST, f"run.root={runs}", "run.name=normm", "stage.max_steps=2", "stage.save_every=0", cwd=tmp_path
    )
    assert sft.returncode == 0, sft.stderr
    res = rlhf("ppo", *FAST, *PPO, f"run.root={runs}", "run.name=normm", cwd=tmp_path)
    assert res.returncode == 2 and "rlhf rm run.name=normm" in res.stderr and "Traceback" not in res.stderr
