"""`rlhf distill` end to end on the small tiny model: the student (a short sft) learns from a frozen teacher (another
run's longer sft, a folder): the sampled-token estimator resumed == uninterrupted (2 epochs x 2 mini-batches, old
log-probs needed); the full-vocabulary reverse KL with top-k and a mixed-in reward, and GKD's JSD with a LoRA
student; 2 ranks under ZeRO-2 and under ZeRO-3 with every parameter partitioned; a teacher whose tokenizer differs
refused before any weights load (its weights are garbage here), a classifier teacher refused too."""

import json
import shutil

import pytest
import torch
from conftest import FAST, copy_run, manifest, metrics, ranks, rlhf, weights

# 4 prompts x 2 samples per iteration, 8-token answers, mini-batches of 4 rows (2 per iteration per rank).
SHAPE = [
    "stage.rollout_batch_size=4",
    "stage.n_samples=2",
    "stage.micro_batch_size=2",
    "stage.gradient_accumulation_steps=2",
    "stage.generation.max_new_tokens=8",
    "stage.eval_batch_size=8",
    "data.eval_fraction=0.05",
    "stage.save_every=0",
    "stage.sample_every=1",
]
PARTITION_ALL = (
    "deepspeed.extra={zero_optimization:{stage:3,stage3_param_persistence_threshold:0,"
    "stage3_max_reuse_distance:0,stage3_prefetch_bucket_size:0}}"
)
ITERATION_KEYS = (
    "kl_teacher_token",
    "kl_teacher_sequence",
    "teacher_logprob",
    "loss",
    "policy_loss",
    "entropy",
    "response_length",
    "eos_fraction",
    "generation_seconds",
    "scoring_seconds",
    "teacher_seconds",
    "update_seconds",
    "teacher_share",
    "optimizer_steps",
    "grad_norm",
)
EVAL_KEYS = ("eval_teacher_agreement", "eval_teacher_token_agreement", "eval_response_length", "eval_gold")
PARITY = ["data=parity", "data.eval_fraction=0.02", "stage.gold_reward=rlhf_cli.tasks.parity:gold_reward"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run `base` with a short sft (the student) and an rm, and a run `teacher` with a longer sft of another seed."""
    root = tmp_path_factory.mktemp("distill_base")
    for name, stage, extra in (
        ("base", "sft", ["stage.max_steps=10"]),
        ("base", "rm", ["stage.max_steps=2"]),
        ("teacher", "sft", ["stage.max_steps=30", "seed=7"]),
    ):
        res = rlhf(stage, *FAST, f"run.root={root}", f"run.name={name}", "stage.save_every=0", *extra, cwd=root)
        assert res.returncode == 0, res.stderr
    return root


def _args(base, runs, name):
    return [*FAST, *SHAPE, *copy_run(base / "base", runs, name, "distill"), f"stage.teacher={base / 'teacher' / 'sft'}"]


def _iterations(run_dir):
    return [r for r in metrics(run_dir, "distill") if "kl_teacher_token" in r]


def test_sampled_distillation_resumes_to_the_same_weights(base, runs, tmp_path):
    extra = ["stage.max_steps=4", "stage.ppo_epochs=2", "stage.save_every=2", "stage.eval_every=2"]
    full = rlhf("distill", *_args(base, runs, "full"), *extra, cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    rec = manifest(runs / "full")["stages"]["distill"]
    assert rec["status"] == "completed" and rec["metrics"]["estimator"] == "sampled"
    assert rec["inputs"]["teacher"].startswith("frozen ") and rec["inputs"]["reward"] == "none (pure distillation)"
    assert "stage.teacher" in rec["provenance"]["inputs"]
    log = _iterations(runs / "full")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(key in log[0] for key in (*ITERATION_KEYS, "clipfrac_low", "approx_kl"))
    assert "score_mean" not in log[0] and log[0]["optimizer_steps"] == 4 and log[0]["rollout_sequences"] == 8
    assert log[0]["kl_teacher_token"] > 0.0  # two different models
    first = metrics(runs / "full", "distill")[0]
    assert first["step"] == 0 and all(k in first for k in (*EVAL_KEYS[:3], "teacher_eval_response_length"))
    assert 0.0 <= first["eval_teacher_agreement"] <= 1.0 and 0.0 <= first["eval_teacher_token_agreement"] <= 1.0
    assert "teacher_eval_response_length" in rec["metrics"]
    assert (runs / "full" / "distill" / "samples.jsonl").is_file()

    parts = [*_args(base, runs, "parts"), *extra]
    first_half = rlhf("distill", *parts, "stage.stop_after_steps=2", cwd=tmp_path)
    assert first_half.returncode == 0, first_half.stderr
    second = rlhf("distill", *parts, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming distill from" in second.stderr
    resumed = _iterations(runs / "parts")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(log, resumed, strict=True):
        for key in ("kl_teacher_token", "kl_teacher_sequence", "policy_loss", "entropy", "response_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    wa, wb = weights(runs / "full" / "distill" / "final"), weights(runs / "parts" / "distill" / "final")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


@pytest.mark.parametrize(
    "extra,logged",
    [
        (
            [
                "stage.estimator=full",
                "stage.top_k=8",
                "stage.reward.function=rlhf_cli.tasks.parity:gold_reward",
                "stage.kl_to_teacher_coef=0.5",
                *PARITY,
            ],
            ("divergence", "token_agreement", "score_mean", "score_advantage_mean"),
        ),
        (
            ["stage.estimator=jsd", "stage.jsd_beta=0.5", "model.lora.enabled=true", "model.lora.r=4"],
            ("divergence", "token_agreement"),
        ),
    ],
)
def test_full_vocabulary_estimators(base, runs, tmp_path, extra, logged):
    res = rlhf("distill", *_args(base, runs, "fv"), "stage.max_steps=2", "stage.eval_every=1", *extra, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rec = manifest(runs / "fv")["stages"]["distill"]
    assert rec["status"] == "completed"
    log = _iterations(runs / "fv")
    assert len(log) == 2 and all(key in log[0] for key in (*ITERATION_KEYS, *logged))
    assert log[0]["divergence"] > 0.0 and 0.0 <= log[0]["token_agreement"] <= 1.0
    assert all(k in metrics(runs / "fv", "distill")[1] for k in EVAL_KEYS[:3])
    final = weights(runs / "fv" / "distill" / "final")
    assert all(bool(v.isfinite().all()) for v in final.values())
    if "model.lora.enabled=true" in extra:
        # Adapters trained and merged into final/: the adapted projections moved, nothing else did.
        start = weights(runs / "fv" / "sft" / "final")
        moved = {k for k in start if not torch.equal(start[k], final[k])}
        assert moved and all(k.endswith("proj.weight") for k in moved), sorted(moved)[:5]
        assert not any("embed" in k or "norm" in k for k in moved)


@pytest.mark.parametrize(
    "zero,estimator", [(["deepspeed=zero2"], "full"), (["deepspeed=zero3", PARTITION_ALL], "sampled")]
)
def test_two_ranks(base, runs, tmp_path, zero, estimator):
    """4 prompts x 2 samples = 8 rows, 4 per rank; the teacher partitioned like the student under ZeRO-3."""
    args = ["distill", *_args(base, runs, "ddp"), *zero, *PARITY, f"stage.estimator={estimator}"]
    res = ranks([*args, "stage.max_steps=2", "stage.eval_every=1"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert manifest(runs / "ddp")["stages"]["distill"]["status"] == "completed"
    log = _iterations(runs / "ddp")
    assert log[0]["rollout_sequences"] == 8 and all(key in log[0] for key in ITERATION_KEYS)
    assert all(k in metrics(runs / "ddp", "distill")[1] for k in EVAL_KEYS)
    assert all(bool(v.isfinite().all()) for v in weights(runs / "ddp" / "distill" / "final").values())


def test_a_teacher_with_another_tokenizer_is_refused_before_its_weights_load(base, runs, tmp_path):
    """The teacher's folder: the teacher sft's, with two tokens' ids swapped in tokenizer.json and its weights file
    replaced by garbage, so loading any weights would fail with another message."""
    folder = tmp_path / "other_teacher"
    shutil.copytree(base / "teacher" / "sft" / "final", folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "model.safetensors").write_bytes(b"not weights")
    res = rlhf("distill", *_args(base, runs, "tok"), f"stage.teacher={folder}", "stage.max_steps=1", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert f"the teacher's tokenizer (stage.teacher={folder}: {folder})" in res.stderr
    assert "is not the student's (model.name_or_path=stage:sft:" in res.stderr
    assert "2 of the student's tokens have another id or none (e.g. '!': 5 against 6)" in res.stderr
    assert "Traceback" not in res.stderr and "safetensors" not in res.stderr

    rm = rlhf("distill", *_args(base, runs, "cls"), "stage.teacher=stage:rm", "stage.max_steps=1", cwd=tmp_path)
    assert rm.returncode == 2 and "the teacher must be a causal language model" in rm.stderr, rm.stderr
