"""`rlhf explain`: the memory estimate agrees with DeepSpeed's own estimators; the report runs offline."""

import json

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from rlhf_cli.cli import main
from rlhf_cli.commands.explain import count_model, model_state_bytes
from rlhf_cli.config.compose import compose

P, LARGEST = 1_234_567_890, 155_000_000


@pytest.mark.parametrize("gpus", [1, 2, 8, 64])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_matches_deepspeed(gpus, offload):
    _, ds_gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=gpus, cpu_offload=offload)
    ours = model_state_bytes(P, P, LARGEST, 2, "bf16", gpus, offload_optimizer=offload)
    assert ours.gpu_total == pytest.approx(ds_gpu, rel=1e-6)


@pytest.mark.parametrize("gpus", [1, 8])
@pytest.mark.parametrize("offload_opt,offload_param", [(False, False), (True, False), (True, True)])
def test_zero3_matches_deepspeed(gpus, offload_opt, offload_param):
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        P, LARGEST, num_gpus_per_node=gpus, cpu_offload=offload_opt, cpu_offload_params=offload_param
    )
    ours = model_state_bytes(P, P, LARGEST, 3, "bf16", gpus, offload_optimizer=offload_opt, offload_param=offload_param)
    assert ours.gpu_total == pytest.approx(ds_gpu, rel=1e-6)


def test_fp32_and_lora_by_hand():
    # fp32, ZeRO-0: 4 B weights + 4 B grads + 8 B Adam moments per trainable parameter.
    s = model_state_bytes(1000, 1000, 10, 0, "fp32", 4)
    assert (s.params, s.grads, s.optimizer, s.working) == (4000, 4000, 8000, 0)
    # LoRA: 10 trainable of 1000; frozen weights carry no gradient or optimizer state. ZeRO-1 over 2 ranks.
    s = model_state_bytes(1000, 10, 10, 1, "bf16", 2)
    assert (s.params, s.grads, s.optimizer) == (2000, 10 * 2 + 10 * 4 / 2, 10 * 12 / 2)


def test_count_model_on_meta_device_from_a_local_config(tmp_path):
    # Qwen2.5-0.5B's architecture (config only, no weights): 494M parameters.
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = compose("sft", [f"model.name_or_path={tmp_path}"])
    n, trainable, largest = count_model(cfg.model)
    assert n == pytest.approx(494e6, rel=0.01) and trainable == n
    assert largest == 151936 * 896  # the embedding


def test_explain_cli_prints_batch_algebra_and_memory(capsys):
    args = ["explain", "sft", "deepspeed=zero3", "launcher.nproc_per_node=4", "stage.micro_batch_size=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "micro batch 2 x accumulation 2 x world size 4" in out and "global batch 16" in out
    assert "ZeRO-3" in out and "gathered layer" in out and "GiB per GPU" in out


@pytest.mark.parametrize("stage", ["rm", "dpo", "ppo"])
def test_explain_follows_stage_inputs_to_the_sft_model(stage, capsys, tmp_path):
    # `stage:sft` before any run: the model `rlhf sft` would start from (the built-in tiny Llama, 3.7M parameters).
    assert main(["explain", stage, f"run.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "3.7M parameters" in out and "tokens per micro-batch" in out
    assert ("critic" in out) == (stage == "ppo")
