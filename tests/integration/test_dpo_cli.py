"""`rlhf dpo` end to end: outputs, the three reference modes agree, 2 ranks = 1, every loss runs."""

import math

import pytest
import torch
from conftest import FAST, manifest, metrics, ranks, rlhf, weights
from test_eval_sharding import PARTITION_ALL  # checked there to partition every parameter
from transformers import AutoModelForCausalLM

STEPS = ["stage.max_steps=3", "stage.save_every=0", "stage.eval_every=0"]


@pytest.fixture(scope="module")
def sft_final(tmp_path_factory):
    """A short SFT run shared by the tests of this module (the DPO policy and reference start from it)."""
    root = tmp_path_factory.mktemp("sft")
    res = rlhf("sft", *FAST, f"run.root={root}", "run.name=base", "stage.max_steps=20", "stage.save_every=0", cwd=root)
    assert res.returncode == 0, res.stderr
    return root / "base" / "sft" / "final"


def _step_metrics(run_dir):
    return [r for r in metrics(run_dir, "dpo") if "loss" in r]


def test_dpo_end_to_end_after_sft_in_the_same_run(runs, tmp_path):
    sft = rlhf(
        "sft", *FAST, f"run.root={runs}", "run.name=chain", "stage.max_steps=10", "stage.save_every=0", cwd=tmp_path
    )
    assert sft.returncode == 0, sft.stderr
    res = rlhf(
        "dpo",
        *FAST,
        f"run.root={runs}",
        "run.name=chain",
        "stage.max_steps=6",
        "stage.eval_every=3",
        "stage.save_every=3",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    rec = manifest(runs / "chain")["stages"]["dpo"]
    assert rec["status"] == "completed" and rec["inputs"]["policy"].endswith("chain/sft/final")
    assert rec["inputs"]["reference"].startswith("frozen copy of")
    assert rec["outputs"] == {"final": "dpo/final"}
    log = _step_metrics(runs / "chain")
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    for key in (
        "reward_chosen",
        "reward_rejected",
        "reward_margin",
        "reward_accuracy",
        "logps_chosen",
        "logps_rejected",
        "grad_norm",
    ):
        assert key in log[-1]
    evals = [r for r in metrics(runs / "chain", "dpo") if "eval_reward_accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6] and "eval_logps_chosen" in evals[-1]
    assert rec["metrics"]["eval_loss"] > 0
    AutoModelForCausalLM.from_pretrained(runs / "chain" / "dpo" / "final")


def test_dpo_without_sft_says_which_command(runs, tmp_path):
    res = rlhf("dpo", *FAST, f"run.root={runs}", "run.name=nosft", cwd=tmp_path)
    assert res.returncode == 2 and "rlhf sft run.name=nosft" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "variant,extra",
    [
        ("precomputed", ["stage.precompute_ref=true"]),
        ("lora_adapters_off", ["model.lora.enabled=true", "model.lora.r=4", "optim.lr=1e-2"]),
    ],
)
def test_reference_modes_match_an_explicit_reference(sft_final, runs, tmp_path, variant, extra):
    """Per-step losses over 3 steps (the policy moves away from the reference after step 1)."""
    base = ["dpo", *FAST, *STEPS, f"run.root={runs}", f"model.name_or_path={sft_final}", "optim.lr=1e-3"]
    explicit_extra = [e for e in extra if "lora" in e or "lr" in e] + [f"stage.reference={sft_final}"]
    a = rlhf(*base, *explicit_extra, "run.name=explicit", cwd=tmp_path)
    b = rlhf(*base, *extra, "run.name=variant", cwd=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert manifest(runs / "explicit")["stages"]["dpo"]["inputs"]["reference"].startswith("frozen copy")
    expected = {"precomputed": "precomputed", "lora_adapters_off": "LoRA adapters disabled"}[variant]
    assert expected in manifest(runs / "variant")["stages"]["dpo"]["inputs"]["reference"]
    la, lb = _step_metrics(runs / "explicit"), _step_metrics(runs / "variant")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)
    assert abs(la[-1]["loss"] - math.log(2)) > 1e-5  # the policy moved: the reference mattered


@pytest.mark.parametrize("loss", ["cdpo", "robust", "hinge", "ipo", "rpo", "simpo", "orpo"])
def test_every_loss_variant_trains(sft_final, runs, tmp_path, loss):
    res = rlhf(
        "dpo",
        *FAST,
        *STEPS,
        f"run.root={runs}",
        f"model.name_or_path={sft_final}",
        f"stage.loss={loss}",
        "stage.label_smoothing=0.1",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    log = _step_metrics(runs / "demo")
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
    ref = manifest(runs / "demo")["stages"]["dpo"]["inputs"]["reference"]
    assert ("none" in ref) == (loss in ("simpo", "orpo"))


def _forward_counts(overrides: list[str], steps: int) -> list[list[int]]:
    """[step][rank] packed forwards of a 2-rank run, from the stage's own plan and layout."""
    from rlhf_cli.config.compose import compose
    from rlhf_cli.data import build_preference_datasets
    from rlhf_cli.models import load_causal_lm, load_tokenizer
    from rlhf_cli.stages.common import packing_for, step_plan
    from rlhf_cli.stages.dpo import pair_forwards

    cfg = compose("dpo", overrides)
    tok = load_tokenizer(cfg.model)
    data = build_preference_datasets(cfg.data, tok, seed=cfg.seed)
    packing = packing_for(cfg.data, cfg.stage, load_causal_lm(cfg.model, tok, seed=cfg.seed), per_item=2)
    assert packing.enabled and packing.share_prompt == (cfg.data.share_prompt is not False)
    plan, micro = step_plan(len(data.train), cfg.stage, 2), cfg.stage.micro_batch_size
    return [
        [
            len(pair_forwards(data.train, plan.rank_indices(s, r, cfg.seed), micro, tok.pad_token_id, packing))
            for r in (0, 1)
        ]
        for s in range(steps)
    ]


# Packed (the default). zero2: each reply with its own copy of the prompt. zero3: each pair's prompt once (an explicit
# 4-D mask through the engines), every parameter partitioned (the FAST model's tensors are all below DeepSpeed's
# default persistence threshold), the reference a partitioned inference engine, and forwards of at most 140 tokens
# (pairs of 27 to 86 tokens with the prompt once) give the two ranks 2 and 3, 2 and 2, then 2 and 3 forwards: the
# weight-0 fillers run the policy and the reference forward too.
@pytest.mark.parametrize(
    ("zero", "packing"),
    [
        ("zero2", ["data.share_prompt=false"]),
        ("zero3", ["data.share_prompt=true", "data.max_length=70", "data.max_tokens_per_batch=140", PARTITION_ALL]),
    ],
)
def test_two_processes_match_one(sft_final, runs, tmp_path, zero, packing):
    base = [
        "dpo",
        *FAST,
        *STEPS,
        f"run.root={runs}",
        f"model.name_or_path={sft_final}",
        f"deepspeed={zero}",
        "stage.gradient_accumulation_steps=1",
        "optim.lr=1e-3",
        *packing,
    ]
    if zero == "zero3":  # the layout the comment above describes, so the fillers do run
        assert _forward_counts([*base[1:], "stage.micro_batch_size=4"], 3) == [[2, 3], [2, 2], [2, 3]]
    one = rlhf(*base, "stage.micro_batch_size=8", "run.name=one", cwd=tmp_path)
    two = ranks([*base, "stage.micro_batch_size=4", "run.name=two"], cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr[-3000:]
    la, lb = _step_metrics(runs / "one"), _step_metrics(runs / "two")
    for key in ("loss", "grad_norm", "reward_margin"):
        assert [r[key] for r in la] == pytest.approx([r[key] for r in lb], rel=1e-4, abs=1e-7), key
    wa, wb = weights(runs / "one" / "dpo" / "final"), weights(runs / "two" / "dpo" / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5)
