"""`rlhf explain distill` and `rlhf explain eval stage.judge=...`: the models each holds (counted as
stages/distill.py and stages/eval.py load them), their bytes per GPU, and distill's iteration plan."""

import json
import subprocess
import sys

import pytest
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from rlhf_cli.cli import main
from rlhf_cli.commands.explain import MIB, memory_rows, policy_model
from rlhf_cli.commands.model_states import count_model
from rlhf_cli.config.compose import compose

# A two-layer Llama of its own shape (config only: counted on the meta device). By hand: embeddings and the untied
# LM head 1000 x 32 each; per layer q and o 32 x 32, k and v 16 x 32 (2 KV heads of 8), the MLP 3 x 32 x 64 and
# two norms of 32 = 9280; the final norm 32. 32000 + 32000 + 2 x 9280 + 32 = 82592.
SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
}
SMALL_LLAMA_PARAMS = 82592


@pytest.fixture
def small_teacher(tmp_path):
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMALL_LLAMA))
    return str(folder)


def rows_of(stage, args):
    cfg = compose(stage, args)
    return cfg, memory_rows(cfg, stage, policy_model(cfg, args), args)


def printed_table(out):
    """{model: GPU total column} and {model: CPU column} of the printed memory table."""
    table = out.split("\n\n")[1].splitlines()
    end = next(i for i, line in enumerate(table) if line.startswith("  = "))
    cells = [line.split() for line in table[2:end]]  # between the column titles and the "= ... per GPU" line
    return {c[0]: float(c[5]) for c in cells}, {c[0]: float(c[6]) for c in cells}


def test_distill_holds_the_student_and_a_frozen_teacher(capsys, tmp_path):
    # bf16, ZeRO-2 over 4 GPUs: the student's states are DeepSpeed's own estimate; the teacher (this run's ppo, which
    # before any run leads back to sft's built-in tiny Llama) a bf16 copy on every GPU: 2 bytes per parameter.
    args = ["deepspeed=zero2", "deepspeed.precision=bf16", "launcher.nproc_per_node=4", f"run.root={tmp_path}"]
    args += ["stage.micro_batch_size=4", "stage.gradient_accumulation_steps=2"]  # 32 rows: 8 per rank
    _, rows = rows_of("distill", args)
    assert [r.name for r in rows] == ["student", "teacher", "reference", "reward"]
    student, teacher, reference, reward = rows
    n_sft, _, _ = count_model(compose("sft", []).model)
    assert student.n_params == student.trainable == teacher.n_params == n_sft
    _, expected = estimate_zero2_model_states_mem_needs(n_sft, num_gpus_per_node=4, cpu_offload=False)
    assert student.states.gpu_total == pytest.approx(expected, rel=1e-6)
    assert teacher.trainable == 0 and teacher.states.gpu_total == 2 * n_sft and teacher.states.cpu == 0
    assert reference.states.gpu_total == reward.states.gpu_total == 0  # distill loads neither
    total = student.states.gpu_total + teacher.states.gpu_total
    assert main(["explain", "distill", *args]) == 0
    out = capsys.readouterr().out
    gpu, _ = printed_table(out)
    assert list(gpu) == ["student", "teacher", "reference", "reward", "total"]
    # The failing case: without the teacher's row the total would be the student's alone, 2 x n bytes (7.1 MiB) less.
    assert gpu["total"] == pytest.approx(total / MIB, abs=5e-4)
    assert gpu["total"] - gpu["student"] == pytest.approx(2 * n_sft / MIB, abs=1e-3) and 2 * n_sft / MIB > 7
    assert (
        "teacher: builtin:tiny-llama, 3.7M parameters; frozen, a full copy on every GPU; stage.teacher=stage:ppo" in out
    )
    assert "reference: none: the student's divergence is to the teacher" in out
    assert "reward: none: pure distillation" in out
    assert "rollout engine: hf" in out


def test_distill_sizes_the_teacher_from_its_own_config(small_teacher, tmp_path):
    # A teacher of another shape than the student: its row counts its own 82,592 parameters (fp32: 4 bytes each).
    _, rows = rows_of("distill", [f"stage.teacher={small_teacher}", f"run.root={tmp_path}"])
    student, teacher = rows[:2]
    assert teacher.n_params == SMALL_LLAMA_PARAMS != student.n_params
    assert teacher.states.gpu_total == 4 * SMALL_LLAMA_PARAMS


@pytest.mark.parametrize(
    "setting,gpu_bytes,cpu_bytes",
    [
        (["deepspeed=zero2", "stage.offload_frozen=true"], 0, 2),  # on the CPU between uses
        (["deepspeed=zero3", "launcher.nproc_per_node=8"], 2 / 8, 0),  # partitioned over the ranks
    ],
)
def test_distill_teacher_offloaded_or_partitioned(setting, gpu_bytes, cpu_bytes, tmp_path):
    shape = ["stage.rollout_batch_size=64", "stage.micro_batch_size=4", "stage.gradient_accumulation_steps=2"]
    _, rows = rows_of("distill", [*setting, *shape, "deepspeed.precision=bf16", f"run.root={tmp_path}"])
    teacher = rows[1]
    assert teacher.name == "teacher"
    assert teacher.states.gpu_total == pytest.approx(gpu_bytes * teacher.n_params)
    assert teacher.states.cpu == pytest.approx(cpu_bytes * teacher.n_params)


def test_distill_counts_a_reward_model_and_a_gold_model_when_set(capsys, tmp_path):
    root = f"run.root={tmp_path}"
    mixed = ["stage.reward.model=stage:rm", "stage.n_samples=2", "stage.gold_reward=stage:rm", root]
    _, rows = rows_of("distill", mixed)
    assert [r.name for r in rows] == ["student", "teacher", "reference", "reward", "gold"]
    n_rm, _, _ = count_model(compose("sft", []).model, scalar_head=True)  # rm's classifier: a one-label head
    assert rows[3].n_params == rows[4].n_params == n_rm and rows[3].states.gpu_total == 4 * n_rm
    # A reward function (and a gold function) hold no model.
    function = "rlhf_cli.tasks.parity:gold_reward"
    args = [f"stage.reward.function={function}", "stage.n_samples=2", f"stage.gold_reward={function}", root]
    _, rows = rows_of("distill", args)
    assert [r.name for r in rows] == ["student", "teacher", "reference", "reward"]
    assert rows[3].states.gpu_total == 0 and rows[3].what == f"none: the function {function}"


def test_distill_prints_its_iteration_plan(capsys, tmp_path):
    # 16 prompts x 4 samples = 64 rows, 32 per rank on 2 ranks; mini-batches of 4 x 2 = 8 rows: 4 per epoch; 7
    # iterations of 3 epochs: 84 optimizer steps; 7 x 64 = 448 answers.
    args = [
        "stage.max_steps=7",
        "stage.ppo_epochs=3",
        "stage.rollout_batch_size=16",
        "stage.n_samples=4",
        "stage.micro_batch_size=4",
        "stage.gradient_accumulation_steps=2",
        "launcher.nproc_per_node=2",
        f"run.root={tmp_path}",
    ]
    assert main(["explain", "distill", *args]) == 0
    batch = capsys.readouterr().out.split("\n\n")[0]
    assert (
        "450 prompts, 16 per iteration x 4 samples = 64 rows (32 per rank on 2 rank(s)); 7 iterations of 3 epoch(s) "
        "x 4 mini-batch(es) of 8 rows per rank" in batch
    )
    assert "= 448 answers sampled by the student and read by the teacher, 84 optimizer steps of the student" in batch
    assert "estimator sampled: l_s - l_t of each sampled token" in batch and "no reward (pure distillation)" in batch
    assert (
        main(["explain", "distill", *args, "stage.estimator=full", "stage.top_k=20", "stage.kl_to_teacher_coef=0.5"])
        == 0
    )
    assert "the reverse KL over the student's top-20 and a tail bucket" in capsys.readouterr().out
    assert main(["explain", "distill", *args, "stage.estimator=jsd", "stage.jsd_beta=0.25"]) == 0
    assert "GKD's generalised JSD (beta 0.25)" in capsys.readouterr().out


def test_distill_plan_without_max_steps_follows_the_epochs(capsys, tmp_path):
    # 450 prompts // 32 per iteration = 14 iterations an epoch: stage.max_steps=30 by default, else 2 epochs = 28.
    for extra, iterations in (([], 30), (["stage.max_steps=null", "stage.epochs=2"], 28)):
        assert main(["explain", "distill", *extra, f"run.root={tmp_path}"]) == 0
        out = capsys.readouterr().out
        assert f"; {iterations} iterations of 1 epoch(s) x 1 mini-batch(es) of 32 rows per rank" in out
        assert f"= {32 * iterations} answers sampled by the student and read by the teacher" in out


def test_eval_counts_the_judge_when_set(capsys, small_teacher, tmp_path):
    # offload_frozen moves eval's reward model only: the reference, the policy and the judge stay on the GPU.
    args = ["stage.offload_frozen=true", f"run.root={tmp_path}"]
    _, rows = rows_of("eval", args)
    assert [r.name for r in rows] == ["reference", "policy", "reward"]
    without = sum(r.states.gpu_total for r in rows)
    _, rows = rows_of("eval", [*args, f"stage.judge={small_teacher}"])
    assert [r.name for r in rows] == ["reference", "policy", "judge", "reward"]
    reference, policy, judge, reward = rows
    assert judge.n_params == SMALL_LLAMA_PARAMS and judge.trainable == 0
    assert judge.states.gpu_total == 4 * SMALL_LLAMA_PARAMS and judge.states.cpu == 0
    assert reference.states.cpu == policy.states.cpu == 0 and reward.states.gpu_total == 0 < reward.states.cpu
    assert sum(r.states.gpu_total for r in rows) == without + 4 * SMALL_LLAMA_PARAMS
    assert main(["explain", "eval", *args, f"stage.judge={small_teacher}"]) == 0
    out = capsys.readouterr().out
    gpu, cpu = printed_table(out)
    assert list(gpu) == ["reference", "policy", "judge", "reward", "total"]
    assert gpu["total"] == pytest.approx(gpu["reference"] + gpu["policy"] + gpu["judge"], abs=2e-3)
    assert f"the judge ({small_teacher}) reads every judged answer" in out
    assert f"judge: {small_teacher}, 0.1M parameters; frozen, a full copy on every GPU; stage.judge=" in out


def test_explain_distill_imports_no_torch(tmp_path):
    # The plan and the counts come from the configs and the built-in tokenizer: only transformers is imported.
    probe = (
        "import sys; from rlhf_cli.cli import main; code = main(sys.argv[1:]); "
        "print('LOADED', *[m for m in ('torch', 'deepspeed', 'peft') if m in sys.modules]); sys.exit(code)"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe, "explain", "distill", f"run.root={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "LOADED"
