"""Scale-out on CPU with gloo: 2 processes equal 1, preemption and resume under ZeRO-3, crash-safe
checkpoints, a 2-node rendezvous on loopback, and the consolidated ZeRO-3 export."""

import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, free_port, launch_ranks, losses, manifest, metrics, ranks, rlhf, torchrun, weights

from rlhf_cli.preempt import PREEMPTED_EXIT_CODE

HERE = Path(__file__).resolve().parent
# Equal global batch 8: one rank x micro 8, or two ranks x micro 4.
ONE = ["stage.micro_batch_size=8", "stage.gradient_accumulation_steps=1"]
TWO = ["stage.micro_batch_size=4", "stage.gradient_accumulation_steps=1"]


def _close(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=atol)


# Packed (the default) into forwards of at most 160 tokens (the examples have 19 to 79): ranks hold different numbers
# of forwards in some steps.
PACKED = ["data.max_length=160", "data.max_tokens_per_batch=160"]


def _uneven_steps(steps: int) -> int:
    """Steps of `test_two_processes_match_one` in which the two ranks hold different numbers of packed forwards (each
    rank then adds weight-0 fillers up to the other's count), computed with the stage's own layout functions."""
    from rlhf_cli.config.compose import compose
    from rlhf_cli.data import build_sft_datasets
    from rlhf_cli.models import load_causal_lm, load_tokenizer
    from rlhf_cli.stages.common import packing_for, step_plan
    from rlhf_cli.stages.sft import step_batches

    cfg = compose("sft", [*FAST, *TWO, *PACKED])
    tok = load_tokenizer(cfg.model)
    data = build_sft_datasets(cfg.data, tok, seed=cfg.seed)
    packing = packing_for(cfg.data, cfg.stage, load_causal_lm(cfg.model, tok, seed=cfg.seed), per_item=1)
    plan = step_plan(len(data.train), cfg.stage, 2)
    counts = [
        [len(step_batches(data.train, plan.rank_indices(s, r, cfg.seed), 4, tok.pad_token_id, packing)) for r in (0, 1)]
        for s in range(steps)
    ]
    return sum(a != b for a, b in counts)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_processes_match_one(runs, tmp_path, zero):
    base = ["sft", *FAST, f"run.root={runs}", f"deepspeed={zero}", "stage.max_steps=6", "stage.save_every=0", *PACKED]
    assert _uneven_steps(6) >= 2
    one = rlhf(*base, *ONE, "run.name=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = ranks([*base, *TWO, "run.name=two"], cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    la, lb = losses(runs / "one"), losses(runs / "two")
    assert list(la) == list(range(1, 7))
    for step in la:  # tolerance: fp32 reductions in a different order
        assert lb[step] == pytest.approx(la[step], rel=1e-5), step
    # The gradient norm is sensitive to the gradient's scale (Adam's update is not): a rank-averaging or
    # normalisation error shows here even when the weights still agree.
    norms_a = [r["grad_norm"] for r in metrics(runs / "one") if "loss" in r]
    norms_b = [r["grad_norm"] for r in metrics(runs / "two") if "loss" in r]
    assert all(n is not None and n > 0 for n in norms_a)
    assert norms_b == pytest.approx(norms_a, rel=1e-4)
    # One rank packs 8 examples, two ranks 4 each: other rows, other fp32 rounding, which Adam turns into ~2e-5 in a
    # near-zero gradient's weight; a real error moves weights by ~lr (3e-3) and shows in the losses and norms above.
    _close(weights(runs / "one" / "sft" / "final"), weights(runs / "two" / "sft" / "final"), atol=1e-4)
    assert (runs / "two" / "sft" / "logs" / "rank-1.log").is_file()  # rank 1's output is kept, not printed
    assert "step 6/6" not in (runs / "two" / "sft" / "logs" / "rank-1.log").read_text()


def _wait_for_step(run_dir: Path, step: int, procs, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        path = run_dir / "sft" / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= step:
            return
        assert all(p.poll() is None for p in procs), "a rank ended early"
        assert time.time() < deadline
        time.sleep(0.01)


def test_zero3_sigusr1_on_one_rank_then_resume(runs, tmp_path):
    """SIGUSR1 to rank 1 alone: both ranks agree at the next step boundary, save together and exit 75;
    resuming (here through `launcher.nproc_per_node=2`) ends where an uninterrupted run ends."""
    args = ["sft", *FAST, *TWO, f"run.root={runs}", "deepspeed=zero3", "stage.max_steps=40", "stage.save_every=0"]
    full = ranks([*args, "run.name=full"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    cut = launch_ranks([*args, "run.name=cut"], 2, tmp_path)
    _wait_for_step(runs / "cut", 3, cut)
    cut[1].send_signal(signal.SIGUSR1)
    codes = [p.wait(300) for p in cut]
    assert codes == [PREEMPTED_EXIT_CODE] * 2, [p.stdout.read()[-2000:] for p in cut]
    rec = manifest(runs / "cut")["stages"]["sft"]
    assert rec["status"] == "preempted"
    (ckpt,) = (runs / "cut" / "sft" / "checkpoints").iterdir()
    stopped_at = int(ckpt.name.split("-")[1])
    assert 3 <= stopped_at < 40 and (ckpt / "COMPLETE").is_file()
    resumed = rlhf(
        *args, "run.name=cut", "launcher.nproc_per_node=2", f"launcher.master_port={free_port()}", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming sft from {ckpt}" in resumed.stderr
    assert losses(runs / "cut")[40] == pytest.approx(losses(runs / "full")[40], rel=1e-5)
    _close(weights(runs / "full" / "sft" / "final"), weights(runs / "cut" / "sft" / "final"))


def test_checkpoint_cut_mid_write_falls_back_to_previous(runs, tmp_path):
    """The two states a kill during a save can leave (a temporary folder; a renamed folder without its
    COMPLETE marker) are skipped, and the run resumes from the last committed checkpoint."""
    args = ["sft", *FAST, f"run.root={runs}", "stage.max_steps=12", "stage.save_every=3", "stage.keep_last=5"]
    full = rlhf(*args, "run.name=full", cwd=tmp_path)
    first = rlhf(*args, "run.name=cut", "stage.stop_after_steps=6", cwd=tmp_path)
    assert full.returncode == 0 and first.returncode == 0, full.stderr + first.stderr
    ckpts = runs / "cut" / "sft" / "checkpoints"
    (ckpts / "step-6" / "COMPLETE").unlink()  # killed between the rename and the marker
    state = next((ckpts / "step-6" / "state").iterdir())
    state.write_bytes(state.read_bytes()[:100])  # ... with a torn file inside
    (ckpts / ".tmp-step-9" / "state").mkdir(parents=True)  # killed while writing the next one
    resumed = rlhf(*args, "run.name=cut", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "step-3 (skipping incomplete checkpoint(s): .tmp-step-9, step-6)" in resumed.stderr
    _close(weights(runs / "full" / "sft" / "final"), weights(runs / "cut" / "sft" / "final"))
    assert [r["step"] for r in metrics(runs / "cut") if "loss" in r][-9:] == list(range(4, 13))


def test_two_node_rendezvous_on_loopback(runs, tmp_path):
    port = free_port()
    args = [
        "-m",
        "rlhf_cli",
        "sft",
        *FAST,
        *TWO,
        f"run.root={runs}",
        "run.name=nodes",
        "stage.max_steps=3",
        "stage.save_every=0",
    ]
    import subprocess
    import sys

    nodes = []
    for node_rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node_rank={node_rank}",
            "--nproc_per_node=1",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            *args,
        ]
        nodes.append(subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert manifest(runs / "nodes")["stages"]["sft"]["status"] == "completed"
    assert "2 rank(s)" in outs[0]


def test_zero3_export_matches_in_training_logits(tmp_path):
    res = torchrun([str(HERE / "zero3_export_check.py"), str(tmp_path / "final")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "max |logits diff|" in res.stdout


def test_zero3_with_cpu_offload_trains_and_exports(runs, tmp_path):
    """Optimizer and parameters offloaded to CPU memory, bf16 weights; on a CPU-only host torch's AdamW steps the
    offloaded states (nothing is compiled: no DeepSpeed op is built in the test's environment)."""
    ext = tmp_path / "torch_extensions"  # where DeepSpeed would build its CPU Adam
    res = rlhf(
        "sft",
        *FAST,
        f"run.root={runs}",
        "run.name=off",
        "deepspeed=zero3_offload",
        "stage.max_steps=3",
        "stage.save_every=3",
        cwd=tmp_path,
        timeout=600,
        env={"TORCH_EXTENSIONS_DIR": str(ext)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert not ext.exists() or not any(ext.rglob("*.so"))
    log = [r for r in metrics(runs / "off") if "loss" in r]
    assert len(log) == 3 and all(r["grad_norm"] > 0 for r in log)
    final = weights(runs / "off" / "sft" / "final")
    assert all(t.dtype == torch.bfloat16 for t in final.values()) and len(final) == 21


def test_deepspeed_launcher(runs, tmp_path):
    """`deepspeed --module rlhf_cli ...` passes --local_rank=N before the verb; the CLI takes it."""
    import os
    import subprocess
    import sys

    launcher = Path(sys.executable).with_name("deepspeed")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [
        str(launcher),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "rlhf_cli",
        "sft",
        *FAST,
        *TWO,
        f"run.root={runs}",
        "run.name=ds",
        "stage.max_steps=2",
        "stage.save_every=0",
    ]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 rank(s)" in res.stdout + res.stderr
    assert manifest(runs / "ds")["stages"]["sft"]["status"] == "completed"
    assert (runs / "ds" / "sft" / "logs" / "rank-1.log").is_file()


def test_zero3_generation_with_partitioned_parameters_and_ranks_of_different_lengths(tmp_path):
    """Every parameter a shard (persistence threshold 0); rank 0 stops after 2 tokens, rank 1 after 40: the hooks are
    off while generating (no per-token gathers, no hang), responses equal the unpartitioned model's, and training
    afterwards equals training on an engine that never generated."""
    res = torchrun([str(HERE / "zero3_generation_check.py")], cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "hooks 128 -> 0 -> 128" in res.stdout and "ok: training after generation matches" in res.stdout
