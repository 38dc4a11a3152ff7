"""scripts/gpu_check.py (`make gpu-check`): the commands it builds for each stage and engine, the MFU arithmetic, the
reading of `rlhf explain`'s output and of a stage's metrics, the no-GPU refusal and --dry-run. Nothing is trained."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses resolve their module's annotations through sys.modules
spec.loader.exec_module(gpu_check)


def overrides(step) -> dict[str, str]:
    return dict(a.split("=", 1) for a in step.args if not a.startswith("+"))


def test_gpu_plan_runs_every_stage_in_bf16_in_one_run_and_the_online_stages_once_per_engine(tmp_path):
    steps = gpu_check.plan(tmp_path, gpu_check.GPU, ("hf", "vllm"))
    assert [s.label for s in steps] == ["sft", "dpo", "grpo/hf", "grpo/vllm", "ppo/hf", "ppo/vllm"]
    for step in steps:
        o = overrides(step)
        assert o["deepspeed.precision"] == "bf16"
        assert (o["run.root"], o["run.name"]) == (str(tmp_path), "gpu-check")
        assert o["model"] == "qwen2_5_0_5b"  # the shipped Qwen group: gradient checkpointing as its experiments
        assert step.command()[:4] == [sys.executable, "-m", "rlhf_cli", step.stage]
        assert step.explain_command()[:5] == [sys.executable, "-m", "rlhf_cli", "explain", step.stage]
        assert step.explain_command()[5:] == step.command()[4:]  # explain sees the stage's own config
        assert o.get("rollout.engine") == step.engine
    sft, dpo, grpo, _, ppo, _ = steps
    assert overrides(sft)["model.name_or_path"] == str(tmp_path / "qwen2.5-0.5b-shape")
    assert overrides(sft)["stage.max_steps"] == "20" and overrides(ppo)["stage.max_steps"] == "8"
    assert all("model.name_or_path" not in overrides(s) for s in steps[1:])  # they start from this run's sft
    assert "+experiment=grpo_parity" in grpo.args and "+experiment=ppo_parity" in ppo.args  # reward functions, no rm
    assert "+experiment" not in " ".join(dpo.args)


def test_without_the_engine_key_the_online_stages_run_once_on_the_default(tmp_path):
    steps = gpu_check.plan(tmp_path, gpu_check.GPU, ("hf", "vllm"), engine_key=False)
    assert [s.label for s in steps] == ["sft", "dpo", "grpo/hf", "ppo/hf"]
    assert not any(a.startswith("rollout.") for s in steps for a in s.args)


def test_cpu_smoke_plan_is_the_tiny_model_in_fp32_for_a_few_steps(tmp_path):
    steps = gpu_check.plan(tmp_path, gpu_check.CPU, ("hf",))
    assert [s.label for s in steps] == ["sft", "dpo", "grpo/hf", "ppo/hf"]
    assert overrides(steps[0])["model.name_or_path"] == "builtin:tiny-llama"
    assert all(overrides(s)["deepspeed.precision"] == "fp32" and "model" not in overrides(s) for s in steps)
    assert [int(overrides(s)["stage.max_steps"]) for s in steps] == [3, 3, 2, 2]


@pytest.mark.parametrize("mode", ["GPU", "CPU"])
def test_every_planned_command_composes(tmp_path, mode):
    """The keys the script passes exist in the CLI (`rlhf <stage> --cfg job` composes and validates without torch)."""
    for step in gpu_check.plan(tmp_path, getattr(gpu_check, mode), ("hf",)):
        done = subprocess.run([*step.command(), "--cfg", "job"], capture_output=True, text=True)
        assert done.returncode == 0, (step.label, done.stderr)


def test_mfu_is_six_times_parameters_times_tokens_over_the_peak():
    assert gpu_check.mfu(1e9, 50_000, 1e15) == pytest.approx(0.3)  # 6 x 1e9 x 5e4 = 3e14 FLOP/s of 1e15
    assert gpu_check.mfu(494e6, 10_000, 989e12) == pytest.approx(2.964e13 / 989e12)  # 0.02997
    assert gpu_check.mfu(494e6 + 494e6, 10_000, 989e12) == pytest.approx(2 * 2.964e13 / 989e12)  # ppo: actor + critic
    assert gpu_check.mfu(None, 10_000, 989e12) is None and gpu_check.mfu(494e6, 10_000, None) is None


def test_peak_by_device_name_the_more_specific_name_first():
    assert gpu_check.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_flops_for("NVIDIA H200") == 989e12
    assert gpu_check.peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_flops_for("NVIDIA L40S") == 362e12
    assert gpu_check.peak_flops_for("NVIDIA L4") == 121e12
    assert gpu_check.peak_flops_for("Tesla T4") is None  # measured instead


def explain(step) -> tuple[str, float]:
    """`rlhf explain`'s output for `step`, and its total in MiB read by hand from the line that ends it."""
    done = subprocess.run(step.explain_command(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    total = next(line.split() for line in done.stdout.splitlines() if line.endswith(" per GPU"))
    assert total[0] == "=" and total[2] == "MiB"
    return done.stdout, float(total[1])


def test_parse_explain_reads_the_total_and_the_trained_parameters_of_real_outputs(tmp_path):
    sft, _, _, ppo = gpu_check.plan(tmp_path, gpu_check.CPU, ("hf",))
    text, total = explain(sft)
    assert gpu_check.parse_explain(text) == (pytest.approx(total), pytest.approx(3.7e6))
    text, total = explain(ppo)  # actor and critic trained; the reference frozen, the reward a function
    assert "actor" in text and "critic" in text and "reference" in text
    assert gpu_check.parse_explain(text) == (pytest.approx(total), pytest.approx(3.7e6 + 3.3e6))
    assert not (tmp_path / "gpu-check").exists()  # explain writes nothing
    assert gpu_check.parse_explain("  = 1.500 GiB per GPU\n") == (1536.0, None)
    assert gpu_check.parse_explain("nothing here") == (None, None)


def test_read_rates_leaves_out_the_first_step_and_reads_the_online_timings(tmp_path):
    rows = [
        {"step": 0, "eval_score": 0.5},  # the starting policy's evaluation: no step
        {
            "step": 1,
            "step_seconds": 9.0,
            "tokens": 100,
            "update_seconds": 5.0,
            "generation_seconds": 3.0,
            "scoring_seconds": 1.0,
            "generated_tokens": 10,
            "peak_mem_mib": 700.0,
        },
        {
            "step": 2,
            "step_seconds": 4.0,
            "tokens": 1000,
            "update_seconds": 2.0,
            "generation_seconds": 1.5,
            "scoring_seconds": 0.5,
            "generated_tokens": 300,
            "peak_mem_mib": 800.0,
        },
        {
            "step": 3,
            "step_seconds": 6.0,
            "tokens": 2000,
            "update_seconds": 3.0,
            "generation_seconds": 2.5,
            "scoring_seconds": 0.5,
            "generated_tokens": 500,
            "peak_mem_mib": 750.0,
        },
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    online = gpu_check.read_rates(path, online=True)
    assert online["train_tok_s"] == pytest.approx(3000 / 5.0)  # steps 2-3 over their update seconds
    assert online["gen_tok_s"] == pytest.approx(800 / 4.0)
    assert online["gen_share"] == pytest.approx(4.0 / (4.0 + 1.0 + 5.0))
    assert online["peak_mib"] == 800.0  # over every step
    offline = gpu_check.read_rates(path, online=False)
    assert offline["train_tok_s"] == pytest.approx(3000 / 10.0) and offline["gen_tok_s"] is None


def test_no_gpu_is_one_clear_line_and_a_non_zero_exit_before_anything_runs(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: pytest.fail("nothing may run without a GPU"))
    assert gpu_check.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no GPU is visible" in err[0] and "--cpu-smoke" in err[0]


def test_dry_run_prints_every_command_and_runs_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: pytest.fail("--dry-run runs nothing"))
    assert gpu_check.main(["--dry-run", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# build a Qwen2.5-0.5B-shaped model")
    assert sum(" explain " in line for line in lines) == 6 and sum("rollout.engine=vllm" in line for line in lines) == 4
    assert all("deepspeed.precision=bf16" in line for line in lines[1:])
    assert not any(tmp_path.iterdir())


def test_table_has_a_row_per_stage_run_and_says_failed(tmp_path):
    sft, dpo, grpo, _ = gpu_check.plan(tmp_path, gpu_check.CPU, ("hf",))
    ok = gpu_check.Result(
        sft, seconds=12.0, train_tok_s=50_000.0, peak_mib=2048.0, explain_mib=940.0, trained_params=1e9
    )
    online = gpu_check.Result(grpo, seconds=30.0, train_tok_s=1000.0, gen_tok_s=2500.0, gen_share=0.4)
    text = gpu_check.table([ok, gpu_check.Result(dpo, rc=1, seconds=3.0), online], "NVIDIA H100", 1e15, "spec", True)
    rows = {
        line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("  sft", "  dpo", "  grpo"))
    }
    assert rows["sft"] == ["sft", "12", "50,000", "-", "-", "30.0", "2,048", "-", "940"]  # MFU 6 x 1e9 x 5e4 / 1e15
    assert rows["dpo"] == ["dpo", "3", "FAILED", "(exit", "1)"]
    assert rows["grpo/hf"][2:5] == ["1,000", "2,500", "40"]


def test_run_logged_returns_the_exit_status_and_keeps_the_output(tmp_path):
    log = tmp_path / "x.log"
    command = [sys.executable, "-c", "import sys, time; time.sleep(0.7); print('hello'); sys.exit(3)"]
    assert gpu_check.run_logged(command, log, sample_gpu=False) == (3, None)
    assert log.read_text() == "hello\n"


def test_the_model_has_qwen2_5_0_5b_shape_and_its_folder_loads_as_rlhf_loads_it(tmp_path):
    import torch
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models.source import resolve_source
    from rlhf_cli.models.tokenizer import load_tokenizer

    with torch.device("meta"):
        full = Qwen2ForCausalLM(Qwen2Config(**gpu_check.QWEN_SHAPE))
    assert sum(p.numel() for p in full.parameters()) == 494_032_768  # Qwen2.5-0.5B's count (tied embeddings)
    small = {**gpu_check.QWEN_SHAPE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    folder = tmp_path / "qwen"
    n = gpu_check.build_model(folder, dict(small, num_attention_heads=4))
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.vocab_size, config.tie_word_embeddings) == ("qwen2", 151936, True)
    assert config.rope_parameters["rope_theta"] == 1e6 and config.dtype == torch.bfloat16
    # A layer: q and o 64 x 64, k and v 64 x 32 (2 KV heads of 16), q/k/v biases, three MLP 64 x 128, two norms.
    layer = 2 * 64 * 64 + 2 * 64 * 32 + (64 + 32 + 32) + 3 * 64 * 128 + 2 * 64
    assert n == 151936 * 64 + 2 * layer + 64  # one embedding matrix (tied), the final norm
    assert (folder / "generation_config.json").is_file() and resolve_source(str(folder)) == (str(folder), True)
    tok = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert (tok.pad_token_id, tok.eos_token_id) == (config.pad_token_id, config.eos_token_id) == (0, 1)
