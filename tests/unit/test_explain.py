"""`rlhf explain`: the memory estimate agrees with DeepSpeed's own estimators; the report runs offline."""

import json

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from rlhf_cli.cli import main
from rlhf_cli.commands.explain import MIB, memory_rows, policy_model
from rlhf_cli.commands.model_states import count_model, model_state_bytes
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
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
    }
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
    assert "ZeRO-3" in out and "gathered layer" in out and "MiB per GPU" in out  # GiB from 1 GiB on


@pytest.mark.parametrize("stage", ["rm", "dpo", "ppo"])
def test_explain_follows_stage_inputs_to_the_sft_model(stage, capsys, tmp_path):
    # `stage:sft` before any run: the model `rlhf sft` would start from (the built-in tiny Llama, 3.7M parameters;
    # `rlhf rm` trains it as a classifier: a one-label head instead of the LM head).
    assert main(["explain", stage, f"run.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    n, _, _ = count_model(compose("sft", []).model, scalar_head=stage == "rm")
    assert f"{n / 1e6:.1f}M parameters" in out and "tokens per micro-batch" in out
    assert (n / 1e6 == pytest.approx(3.7, abs=0.05)) == (stage != "rm")
    assert ("critic" in out) == (stage == "ppo")


PPO_SETTINGS = {  # name -> (overrides, GPU bytes per parameter of a frozen model: bf16, partitioned, or on CPU)
    "zero2": (["deepspeed=zero2", "deepspeed.precision=bf16", "launcher.nproc_per_node=4"], 2),
    "zero3": (["deepspeed=zero3", "deepspeed.precision=bf16", "launcher.nproc_per_node=8"], 2 / 8),
    "offload_frozen": (["deepspeed=zero2", "deepspeed.precision=bf16", "stage.offload_frozen=true"], 0),
}


@pytest.mark.parametrize("setting", list(PPO_SETTINGS))
def test_explain_ppo_totals_actor_critic_reference_and_reward(setting, capsys, tmp_path):
    args, frozen_bytes = PPO_SETTINGS[setting]
    args = [*args, f"run.root={tmp_path}", "stage.kl_coef=0.2"]  # a ppo-only key: never passed to sft / rm
    cfg = compose("ppo", args)
    gpus = cfg.launcher.nproc_per_node
    rows = memory_rows(cfg, "ppo", policy_model(cfg, args), args)
    assert [r.name for r in rows] == ["actor", "critic", "reference", "reward"]
    actor, critic, reference, reward = rows
    # Actor and critic are trained (the critic is the reward model's backbone under a one-label head): DeepSpeed's
    # estimators give their bytes per GPU. The frozen reference and reward model hold bf16 weights only.
    for row in (actor, critic):
        assert row.trainable == row.n_params > 0
        if cfg.deepspeed.zero_stage == 3:
            _, expected, _ = estimate_zero3_model_states_mem_needs(
                row.n_params, row.largest, num_gpus_per_node=gpus, cpu_offload=False, cpu_offload_params=False
            )
        else:
            _, expected = estimate_zero2_model_states_mem_needs(row.n_params, num_gpus_per_node=gpus, cpu_offload=False)
        assert row.states.gpu_total == pytest.approx(expected, rel=1e-6)
    assert (reference.n_params, critic.n_params) == (actor.n_params, reward.n_params)
    for row in (reference, reward):
        assert row.trainable == 0 and row.states.gpu_total == pytest.approx(frozen_bytes * row.n_params)
        assert row.states.cpu == (2 * row.n_params if setting == "offload_frozen" else 0)
    total = sum(r.states.gpu_total for r in rows)
    assert main(["explain", "ppo", *args]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[1].splitlines()
    assert table[0].startswith("memory per GPU in MiB")  # the tiny models
    printed = {line.split()[0]: float(line.split()[5]) for line in table[2:7]}  # the GPU total column
    assert list(printed) == ["actor", "critic", "reference", "reward", "total"]
    assert printed["total"] == pytest.approx(total / MIB, abs=5e-4)
    assert printed["total"] == pytest.approx(sum(v for k, v in printed.items() if k != "total"), abs=3e-3)
    assert f"= {total / MIB:.3f} MiB per GPU" in out


def test_explain_ppo_prints_the_iteration_plan_of_the_stage(capsys, tmp_path):
    args = [
        "stage.max_steps=7",
        "stage.ppo_epochs=3",
        "stage.rollout_batch_size=16",
        "stage.micro_batch_size=4",
        "stage.gradient_accumulation_steps=2",
        "launcher.nproc_per_node=2",
        f"run.root={tmp_path}",
    ]
    assert main(["explain", "ppo", *args]) == 0
    batch = capsys.readouterr().out.split("\n\n")[0]
    # 16 prompts per rank and iteration, 2 mini-batches of 4 x 2 each, over 3 epochs: 6 optimizer steps an iteration.
    assert (
        "prompts, 32 per iteration (16 x 2 rank(s)); 7 iterations of 3 PPO epoch(s) x 2 mini-batch(es) of 8 per "
        "rank" in batch
    )
    assert "= 42 optimizer steps of the actor, as many of the critic" in batch


def test_explain_ppo_without_reference_or_reward_model(capsys, tmp_path):
    # A LoRA actor's reference is its own base weights; a reward function holds no model: both rows are 0.
    function = "stage.reward.function=rlhf_cli.tasks.parity:gold_reward"
    args = [f"run.root={tmp_path}", "model.lora.enabled=true", function]
    cfg = compose("ppo", args)
    rows = memory_rows(cfg, "ppo", policy_model(cfg, args), args)
    actor, critic, reference, reward = rows
    assert 0 < actor.trainable < actor.n_params  # LoRA adapters only
    assert critic.trainable == critic.n_params  # the critic starts from the policy (no reward model) without LoRA
    assert reference.states.gpu_total == reward.states.gpu_total == 0
    assert main(["explain", "ppo", *args]) == 0
    assert "reward: none: the function rlhf_cli.tasks.parity:gold_reward" in capsys.readouterr().out


def test_explain_rejection_sampling_gives_a_round_and_its_models(capsys, tmp_path):
    # 450 training prompts (sample_prompts less its held-out 10 %); top_k=2 of 4 samples; 2 ranks of micro 8 x 2.
    args = [
        "stage.selection=top_k",
        "stage.prompts_per_round=100",
        "stage.micro_batch_size=8",
        "stage.gradient_accumulation_steps=2",
        "launcher.nproc_per_node=2",
        f"run.root={tmp_path}",
    ]
    assert main(["explain", "rejection_sampling", *args]) == 0
    batch, memory = capsys.readouterr().out.split("\n\n")[:2]
    assert "micro batch 8 x accumulation 2 x world size 2" in batch and "global batch 32" in batch
    assert "generation per round: 100 prompts x 4 samples = 400 candidates; 50 prompts per rank in 7 generate" in batch
    # At most 2 selected per prompt: 200 samples / 32 per step = 7 steps of one epoch.
    assert (
        "at most 200 selected samples (top_k: at most 2 per prompt) x 1 epoch(s) / global batch 32 = at most 7 "
        "optimizer steps" in batch
    )
    rows = [line.split()[0] for line in memory.splitlines()[2:5]]
    assert rows == ["policy", "reward", "total"]  # no reference, no critic


def test_explain_eval_holds_frozen_models_only(capsys):
    assert main(["explain", "eval", "stage.kl_samples=8"]) == 0
    out = capsys.readouterr().out
    assert "32 prompts x 1 judged answer(s) (greedy), then x 8 samples at temperature 1" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("  reference ", "  policy ", "  reward "))]
    assert [r[0] for r in rows] == ["reference", "policy", "reward"]
    assert all(r[2] == r[3] == "0.000" for r in rows)  # no gradients, no optimizer states


def test_explain_states_packing_for_the_offline_stages(capsys):
    assert main(["explain", "dpo"]) == 0
    assert "packing: on where supported" in capsys.readouterr().out
    assert main(["explain", "sft", "data.packing=false"]) == 0
    assert "packing: off (data.packing=false)" in capsys.readouterr().out


def test_explain_dpo_counts_the_reference_it_holds(capsys):
    """A frozen copy of the starting checkpoint unless the loss reads none, its log-probs were precomputed, or LoRA
    turns the policy's adapters off for it (stages/dpo.py: Reference)."""

    def reference_row(*overrides):
        assert main(["explain", "dpo", *overrides]) == 0
        out = capsys.readouterr().out
        (row,) = [line.split() for line in out.splitlines() if line.startswith("  reference ")]
        (note,) = [line for line in out.splitlines() if line.startswith("  reference:")]
        return row, note

    row, note = reference_row()
    assert float(row[1]) > 0 and row[2] == row[3] == "0.000" and "frozen, a full copy on every GPU" in note
    for overrides, said in (
        (["stage.loss=simpo"], "none: stage.loss=simpo reads no reference"),
        (["stage.precompute_ref=true"], "none while training"),
        (["model.lora.enabled=true"], "LoRA adapters disabled"),
    ):
        row, note = reference_row(*overrides)
        assert row[1:] == ["0.000"] * 6 and said in note, (overrides, row, note)
