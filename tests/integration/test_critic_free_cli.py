"""`rlhf grpo`, `rlhf rloo`, `rlhf reinforce_pp` end to end on the tiny model: GRPO with the reward model, resumed ==
uninterrupted (several epochs and mini-batches, k3 loss, clip-higher, Dr. GRPO aggregation, dynamic sampling);
RLOO and REINFORCE++-baseline on 2 ranks whose groups straddle the ranks, under ZeRO-2 and under ZeRO-3 with every
parameter partitioned; kl_coef=0 loads no reference model; clear refusals."""

import pytest
from conftest import FAST, copy_run, manifest, metrics, ranks, rlhf, sft_rm_base, weights

# 4 prompts x 4 samples per iteration, 8-token answers, mini-batches of 8 rows (2 per iteration per rank).
CF = [
    "stage.rollout_batch_size=4",
    "stage.n_samples=4",
    "stage.generation.max_new_tokens=8",
    "stage.eval_batch_size=8",
    "data.eval_fraction=0.05",
    "stage.save_every=0",
]
PARITY = [
    "data=parity",
    "data.eval_fraction=0.02",
    "stage.reward.model=null",
    "stage.reward.function=rlhf_cli.tasks.parity:gold_reward",
    "stage.gold_reward=rlhf_cli.tasks.parity:gold_reward",
]
PARTITION_ALL = (
    "deepspeed.extra={zero_optimization:{stage:3,stage3_param_persistence_threshold:0,"
    "stage3_max_reuse_distance:0,stage3_prefetch_bucket_size:0}}"
)
ITERATION_KEYS = (
    "score_mean",
    "policy_loss",
    "clipfrac_low",
    "clipfrac_high",
    "approx_kl",
    "entropy",
    "response_length",
    "eos_fraction",
    "advantage_mean",
    "generation_seconds",
    "update_seconds",
    "optimizer_steps",
    "grad_norm",
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return sft_rm_base(tmp_path_factory.mktemp("cf_base"))


def _iterations(run_dir, stage):
    return [r for r in metrics(run_dir, stage) if "policy_loss" in r]


def test_grpo_with_the_reward_model_resumes_to_the_same_weights(base, runs, tmp_path):
    """GRPO (reward model, k3 KL loss, clip-higher, Dr. GRPO aggregation, 2 epochs x 2 mini-batches: old log-probs
    needed) stopped after 2 of 4 iterations and resumed == uninterrupted, metrics and weights."""
    common = [
        *FAST,
        *CF,
        "stage.max_steps=4",
        "stage.ppo_epochs=2",
        "stage.kl_coef=0.04",
        "stage.clip_eps_high=0.28",
        "stage.loss_aggregation=seq_mean_token_sum_norm",
        "stage.save_every=2",
        "stage.eval_every=2",
    ]
    full = rlhf("grpo", *common, *copy_run(base, runs, "full", "grpo"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    rec = manifest(runs / "full")["stages"]["grpo"]
    assert rec["status"] == "completed" and rec["inputs"]["reference"].startswith("frozen copy of")
    assert "model" in rec["inputs"]["reward"]
    log = _iterations(runs / "full", "grpo")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(key in log[0] for key in (*ITERATION_KEYS, "kl_loss", "zero_variance_groups"))
    assert log[0]["optimizer_steps"] == 4 and log[0]["rollout_sequences"] == 16
    assert "eval_score" in metrics(runs / "full", "grpo")[0]  # the SFT policy's, at step 0
    assert "rollout engine: hf (rollout.engine=hf)" in full.stdout + full.stderr  # the opening lines say which
    assert not any(k.startswith("sampler_") for k in log[0])  # the sampler is the trainer: nothing to correct

    args = [*common, *copy_run(base, runs, "parts", "grpo")]
    first = rlhf("grpo", *args, "stage.stop_after_steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = rlhf("grpo", *args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming grpo from" in second.stderr
    parts = _iterations(runs / "parts", "grpo")
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    for a, b in zip(log, parts, strict=True):
        for key in ("score_mean", "policy_loss", "kl_loss", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    wa, wb = weights(runs / "full" / "grpo" / "final"), weights(runs / "parts" / "grpo" / "final")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


@pytest.mark.parametrize(
    "verb,zero,extra",
    [
        ("rloo", ["deepspeed=zero2"], ["stage.kl_coef=0.05"]),
        (
            "reinforce_pp",
            ["deepspeed=zero3", PARTITION_ALL],
            ["stage.advantage=reinforce_pp_baseline", "stage.dynamic_sampling=true"],
        ),
    ],
)
def test_two_ranks_with_groups_straddling_the_ranks(base, runs, tmp_path, verb, zero, extra):
    """3 prompts x 4 samples = 12 rows, 6 per rank: the second prompt's group lives on both ranks (its statistics
    come from the gathered scores; tests/unit/test_critic_free_stage.py checks the numbers against one process)."""
    if "stage.dynamic_sampling=true" in extra:  # whole groups per rank: 2 prompts x 4 samples, 4 rows per rank
        shape = ["stage.rollout_batch_size=2", "stage.micro_batch_size=2", "stage.gradient_accumulation_steps=2"]
    else:
        shape = ["stage.rollout_batch_size=3", "stage.micro_batch_size=3", "stage.gradient_accumulation_steps=2"]
    args = [
        verb,
        *FAST,
        *CF,
        *PARITY,
        *copy_run(base, runs, "ddp", verb),
        *zero,
        *shape,
        *extra,
        "stage.max_steps=2",
        "stage.eval_every=1",
    ]
    res = ranks(args, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = manifest(runs / "ddp")["stages"][verb]
    advantage = "reinforce_pp_baseline" if verb == "reinforce_pp" else verb
    assert rec["status"] == "completed" and rec["metrics"]["advantage"] == advantage
    log = _iterations(runs / "ddp", verb)
    assert log[0]["rollout_sequences"] == (8 if "stage.dynamic_sampling=true" in extra else 12)
    assert all(key in log[0] for key in (*ITERATION_KEYS, "kl")) and "eval_gold" in metrics(runs / "ddp", verb)[0]
    if "stage.dynamic_sampling=true" in extra:
        assert {"sampling_rounds", "groups_dropped", "groups_filled_without_signal"} <= set(log[0])
    state = weights(runs / "ddp" / verb / "final")
    assert all(bool(v.isfinite().all()) for v in state.values())


@pytest.mark.parametrize("verb", ["grpo", "reinforce_pp"])
def test_kl_coef_zero_loads_no_reference_and_function_weights_are_logged(base, runs, tmp_path, verb):
    """GRPO (one pass in one mini-batch: no old log-probs either) and plain REINFORCE++ with kl_coef=0 and two
    weighted reward functions."""
    funcs = (
        "stage.reward.functions=[{fn:rlhf_cli.tasks.parity:gold_reward,weight:1.0},"
        "{fn:rlhf_cli.tasks.parity:format_reward,weight:0.5}]"
    )
    res = rlhf(
        verb,
        *FAST,
        *CF,
        *PARITY,
        *copy_run(base, runs, "nokl", verb),
        "stage.max_steps=1",
        funcs,
        "stage.micro_batch_size=8",
        "stage.kl_coef=0",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    rec = manifest(runs / "nokl")["stages"][verb]
    assert rec["inputs"]["reference"] == "none (stage.kl_coef=0)" and rec["metrics"]["advantage"] == verb
    assert rec["inputs"]["reward"].startswith("functions 1 x rlhf_cli.tasks.parity:gold_reward + 0.5 x")
    (it,) = _iterations(runs / "nokl", verb)
    assert "kl" not in it and "kl_loss" not in it
    assert it["score_mean"] == pytest.approx(it["reward/gold_reward"] + 0.5 * it["reward/format_reward"], abs=1e-6)


@pytest.mark.parametrize(
    "verb,extra,message",
    [
        ("grpo", ["stage.n_samples=1"], "stage.n_samples must be >= 2"),
        ("rloo", ["stage.rollout_batch_size=3", "stage.n_samples=3"], "not a multiple of the mini-batch"),
        ("grpo", ["stage.advantage=ppo"], "stage.advantage"),
        ("reinforce_pp", ["stage.generation.top_p=0.9"], "stage.generation.top_p"),
    ],
)
def test_bad_settings_fail_clearly(base, runs, tmp_path, verb, extra, message):
    res = rlhf(verb, *FAST, *CF, *PARITY, *copy_run(base, runs, "bad", verb), "stage.max_steps=1", *extra, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr


# A user's reward module in the working directory: `score` raises on some reply, `nothing` judges none.
USER_REWARD = """def check(reply):
    return 1.0 / len(reply.split(" ")[99:])


def score(prompts, responses):
    return [check(r) for r in responses]


def nothing(prompts, responses):
    return [None] * len(responses)
"""


def test_a_reward_function_that_raises_ends_in_one_message_with_the_users_frames(base, runs, tmp_path):
    (tmp_path / "my_reward.py").write_text(USER_REWARD)
    res = rlhf(
        "grpo",
        *FAST,
        *CF,
        *PARITY,
        *copy_run(base, runs, "raises", "grpo"),
        "stage.max_steps=1",
        "stage.reward.function=my_reward:score",
        "data.eval_fraction=0",
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr
    error = res.stderr[res.stderr.index("error: ") :]  # after the stage's own log lines
    assert (
        error.startswith(
            "error: stage.reward.function=`my_reward:score` raised ZeroDivisionError: float division by zero\n"
        )
        and res.stderr.count("error: ") == 1
    )
    assert 'my_reward.py", line 6, in score' in error and 'my_reward.py", line 2, in check' in error
    assert "return 1.0 / len(reply.split" in error
    assert "Traceback" not in res.stderr and "rlhf_cli/" not in error
    rec = manifest(runs / "raises")["stages"]["grpo"]
    assert rec["status"] == "failed" and "ZeroDivisionError" in rec["error"]


def test_a_reward_function_that_scores_nothing_stops_at_the_first_evaluation_or_iteration(base, runs, tmp_path):
    (tmp_path / "my_reward.py").write_text(USER_REWARD)
    for name, where, extra in (
        ("eval", "of the first evaluation", []),
        ("noeval", "of iteration 1", ["data.eval_fraction=0"]),
    ):
        res = rlhf(
            "grpo",
            *FAST,
            *CF,
            *PARITY,
            *copy_run(base, runs, name, "grpo"),
            "stage.max_steps=1",
            "stage.reward.function=my_reward:nothing",
            *extra,
            cwd=tmp_path,
        )
        assert res.returncode == 2, res.stderr
        assert f"error: the reward function my_reward:nothing scored none of the replies {where}" in res.stderr
        assert "Traceback" not in res.stderr
        assert manifest(runs / name)["stages"]["grpo"]["status"] == "failed"


def test_grpo_with_a_kl_on_the_one_pass_path_logs_the_kl(base, runs, tmp_path):
    """One pass in one mini-batch (16 rows, 8 x 2): no old log-probs, yet the KL to the reference is logged, from the
    log-probs of the update (those of the rollout policy: its weights change only at the step)."""
    res = rlhf(
        "grpo",
        *FAST,
        *CF,
        *PARITY,
        *copy_run(base, runs, "kl", "grpo"),
        "stage.max_steps=2",
        "stage.micro_batch_size=8",
        "stage.kl_coef=0.04",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    log = _iterations(runs / "kl", "grpo")
    assert [r["step"] for r in log] == [1, 2] and all("kl" in r and "kl_loss" in r for r in log)
    assert abs(log[0]["kl"]) < 1e-4  # the policy is still the reference at the first iteration
    assert log[1]["kl"] != log[0]["kl"] and log[0]["invalid_fraction"] == 0.0
