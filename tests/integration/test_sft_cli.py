"""`rlhf sft` end to end on the tiny model: outputs, reload, resume, invariance, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, manifest, metrics, rlhf, weights
from transformers import AutoModelForCausalLM, AutoTokenizer

FINAL_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def test_sft_end_to_end(runs, tmp_path):
    args = [
        "sft",
        *FAST,
        f"run.root={runs}",
        "run.name=e2e",
        "stage.max_steps=24",
        "stage.save_every=8",
        "stage.keep_last=2",
        "stage.eval_every=12",
        "stage.keep_checkpoints=true",
    ]
    res = rlhf(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run_dir = runs / "e2e"
    final = run_dir / "sft" / "final"
    assert {p.name for p in final.iterdir()} == FINAL_FILES
    # Manifest: completed, with inputs, outputs and headline metrics.
    rec = manifest(run_dir)["stages"]["sft"]
    assert rec["status"] == "completed" and rec["outputs"] == {"final": "sft/final"}
    assert rec["inputs"]["model"] == "builtin:tiny-llama" and rec["metrics"]["steps"] == 24
    assert rec["metrics"]["eval_loss"] > 0 and rec["metrics"]["data"]["train_examples"] == 380
    assert (run_dir / "sft" / "config.yaml").is_file()
    # Loss went down; eval logged mid-run and at the end; keep_last honoured.
    log = [r for r in metrics(run_dir) if "loss" in r]
    assert sum(r["loss"] for r in log[-4:]) < sum(r["loss"] for r in log[:4]) - 0.5
    assert [r["step"] for r in metrics(run_dir) if "eval_loss" in r] == [12, 24]
    assert sorted(p.name for p in (run_dir / "sft" / "checkpoints").iterdir()) == ["step-16", "step-24"]
    # The summary: first and last values, disk, the next command (checkpoints kept on request here).
    summary = rec["summary"]
    assert summary["headline"]["eval_loss"][0] > summary["headline"]["eval_loss"][1] and summary["checkpoints_kept"]
    assert summary["disk_bytes"]["checkpoints"] > 0 and summary["tokens_per_second"] > 0
    assert "target_tokens" in rec["metrics"] and rec["metrics"]["target_tokens"] > 0
    assert "sft completed:" in res.stderr and f"next: rlhf rm run.name=e2e run.root={runs}" in res.stderr
    assert not (run_dir / "sft" / "metrics.png").exists() and "plot" not in summary  # logging.plots=false (FAST)
    # final/ reloads with plain transformers and generates with the chat template.
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    gen = rlhf(
        "generate", "run=e2e", f"root={runs}", "prompt=What is the capital of France?", "max_new_tokens=8", cwd=tmp_path
    )
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr
    # Running the same command again keeps the completed stage and says how to redo it.
    before = (final / "model.safetensors").stat().st_mtime_ns
    again = rlhf(*args, cwd=tmp_path)
    assert again.returncode == 2 and "run.overwrite=true" in again.stderr and "Traceback" not in again.stderr
    assert (final / "model.safetensors").stat().st_mtime_ns == before


def _wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended before the checkpoint appeared"
        assert time.time() < deadline
        time.sleep(0.005)


def test_killed_run_resumes_to_the_same_result(runs, tmp_path):
    # Packed (the default) into forwards of at most 256 tokens: a varying number of forwards per step.
    common = [
        "sft",
        f"run.root={runs}",
        "stage.max_steps=30",
        "stage.save_every=3",
        *FAST,
        "data.max_tokens_per_batch=256",
    ]
    full = rlhf(*common, "run.name=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    # Same command, killed hard (no handler runs) right after its first committed checkpoint.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_cli", *common, "run.name=cut"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(runs / "cut" / "sft" / "checkpoints" / "step-3" / "COMPLETE", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert manifest(runs / "cut")["stages"]["sft"]["status"] == "running"
    resumed = rlhf(*common, "run.name=cut", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming sft from" in resumed.stderr
    rec = manifest(runs / "cut")["stages"]["sft"]
    assert rec["status"] == "completed" and rec["resumed_from"]
    a, b = weights(runs / "full" / "sft" / "final"), weights(runs / "cut" / "sft" / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    loss_full = {r["step"]: r["loss"] for r in metrics(runs / "full") if "loss" in r}
    loss_cut = {r["step"]: r["loss"] for r in metrics(runs / "cut") if "loss" in r}  # resumed steps logged again
    assert abs(loss_full[30] - loss_cut[30]) < 1e-5


def test_stop_after_steps_then_rerun_resumes(runs, tmp_path):
    common = ["sft", f"run.root={runs}", "run.name=stop", "stage.max_steps=8", "stage.save_every=0", *FAST]
    first = rlhf(*common, "stage.stop_after_steps=4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    rec = manifest(runs / "stop")["stages"]["sft"]
    assert rec["status"] == "interrupted" and rec["last_step"] == 4
    second = rlhf(*common, cwd=tmp_path)
    assert second.returncode == 0 and "resuming sft from" in second.stderr and "step-4" in second.stderr, second.stderr
    assert [r["step"] for r in metrics(runs / "stop") if "loss" in r] == list(range(1, 9))


def test_micro_batch_times_accumulation_invariance(runs, tmp_path):
    """Global batch 8 as 8 x 1 packed (the default) and as 2 x 4 padded micro-batches (unequal lengths): same weights
    after 3 steps, so packing and the micro-batch split change nothing but speed."""
    base = ["sft", f"run.root={runs}", "stage.max_steps=3", "stage.save_every=0", *FAST]
    one = rlhf(*base, "run.name=b8", "stage.micro_batch_size=8", "stage.gradient_accumulation_steps=1", cwd=tmp_path)
    four = rlhf(
        *base,
        "run.name=b2",
        "stage.micro_batch_size=2",
        "stage.gradient_accumulation_steps=4",
        "data.packing=false",
        cwd=tmp_path,
    )
    assert one.returncode == 0 and four.returncode == 0, one.stderr + four.stderr
    a, b = weights(runs / "b8" / "sft" / "final"), weights(runs / "b2" / "sft" / "final")
    for key in a:
        # Adam turns fp32 rounding in near-zero gradients into ~1e-6 weight noise; real bugs move far more.
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5)
    for key in ("loss", "grad_norm"):  # the norm catches a scale error that Adam's update would hide
        la = [r[key] for r in metrics(runs / "b8") if "loss" in r]
        lb = [r[key] for r in metrics(runs / "b2") if "loss" in r]
        assert la == pytest.approx(lb, rel=1e-5) and all(x > 0 for x in la)


def test_lora_run_exports_merged_model(runs, tmp_path):
    res = rlhf(
        "sft",
        f"run.root={runs}",
        "run.name=lora",
        "stage.max_steps=3",
        "stage.save_every=0",
        "model.lora.enabled=true",
        "model.lora.r=4",
        *FAST,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    final = runs / "lora" / "sft" / "final"
    assert {p.name for p in final.iterdir()} == FINAL_FILES  # merged: a plain checkpoint, no adapter files
    assert not any("lora" in k for k in weights(final))
    AutoModelForCausalLM.from_pretrained(final)


def test_gradient_checkpointing_and_tensorboard(runs, tmp_path):
    res = rlhf(
        "sft",
        *FAST,
        f"run.root={runs}",
        "run.name=gc",
        "stage.max_steps=2",
        "stage.save_every=0",
        "model.gradient_checkpointing=true",
        "logging.tensorboard=true",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert list((runs / "gc" / "sft" / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((runs / "gc" / "sft" / "final" / "config.json").read_text())
    assert config["use_cache"] is True  # turned off for checkpointing while training, back on for inference
