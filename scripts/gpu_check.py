"""`make gpu-check`: the chain on a Qwen2.5-0.5B-shaped model on one NVIDIA GPU, with its speed and memory.

Builds a model of Qwen2.5-0.5B's shape from a config (random init, no download) with the project's own tokenizer,
then runs `rlhf sft`, `rlhf dpo`, `rlhf grpo` and `rlhf ppo` for a few steps each in bf16, in one run directory
under a temporary root; the online stages once per rollout engine (`hf`, and `vllm` when it imports). It prints, per
stage: training tokens/s, generation new tokens/s, MFU, the peak memory the stage recorded and `rlhf explain`'s
estimate of bytes per GPU for the same config. Meant to take under 10 minutes on one H100.

    .venv/bin/python scripts/gpu_check.py               # on a GPU host (exit 1 without a visible GPU)
    .venv/bin/python scripts/gpu_check.py --cpu-smoke   # the same sequence on the CPU: tiny model, fp32, 2-3 steps
    .venv/bin/python scripts/gpu_check.py --dry-run     # the commands it would run; runs nothing
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

RUN_NAME = "gpu-check"
STAGE_TIMEOUT_S = 360  # one stage past 6 minutes breaks the 10-minute promise: stopped, reported as failed
RLHF = (sys.executable, "-m", "rlhf_cli")
# Qwen2.5-0.5B's shape (its config.json); the vocabulary is larger than the tiny tokenizer's, as Qwen's own is.
QWEN_SHAPE = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}
ROPE_THETA = 1e6
# Dense bf16 tensor-core peaks in FLOP/s (no sparsity), by a part of torch.cuda.get_device_name(): the first match wins.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


class Mode(NamedTuple):
    """What differs between a GPU run and --cpu-smoke."""

    precision: str
    steps: dict[str, int]  # optimizer steps (online stages: iterations) per stage
    new_tokens: int  # at most, per online response
    model_args: tuple[str, ...]  # the model group: Qwen's (gradient checkpointing); later stages keep stage:sft
    model: str  # what sft starts from: a built-in model, or the folder under the run root that build_model writes


GPU = Mode("bf16", {"sft": 20, "dpo": 20, "grpo": 8, "ppo": 8}, 128, ("model=qwen2_5_0_5b",), "qwen2.5-0.5b-shape")
CPU = Mode("fp32", {"sft": 3, "dpo": 3, "grpo": 2, "ppo": 2}, 16, (), "builtin:tiny-llama")
EXPERIMENTS = {"grpo": "+experiment=grpo_parity", "ppo": "+experiment=ppo_parity"}  # reward: a function, no rm
EXPLAIN_TOTAL = re.compile(r"^\s*= ([0-9.]+) (MiB|GiB) per GPU", re.M)
EXPLAIN_TRAINED = re.compile(r"^\s*\w+: .*, ([0-9.]+)M parameters, ([0-9.]+)M trainable; trained", re.M)


@dataclass(frozen=True)
class Step:
    """One stage run: `rlhf <stage> <args>`, with `engine` the rollout engine of an online stage."""

    stage: str
    engine: str | None
    args: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.stage if self.engine is None else f"{self.stage}/{self.engine}"

    def command(self) -> list[str]:
        return [*RLHF, self.stage, *self.args]

    def explain_command(self) -> list[str]:
        return [*RLHF, "explain", self.stage, *self.args]


@dataclass
class Result:
    """What one stage run gave: its exit status and wall time, and what its metrics and `rlhf explain` said."""

    step: Step
    rc: int = 0
    seconds: float = 0.0
    train_tok_s: float | None = None
    gen_tok_s: float | None = None
    gen_share: float | None = None
    peak_mib: float | None = None
    smi_peak_mib: float | None = None
    explain_mib: float | None = None
    trained_params: float | None = None
    notes: list[str] = field(default_factory=list)


def model_source(root: Path, mode: Mode) -> str:
    """What sft starts from: the built-in model, or the folder under the run root that `build_model` writes."""
    return mode.model if mode.model.startswith("builtin:") else str(root / mode.model)


def plan(root: Path, mode: Mode, engines: tuple[str, ...], engine_key: bool = True) -> list[Step]:
    """The stage runs in order: sft from the mode's model, then dpo, grpo and ppo from this run's sft; grpo and ppo
    once per engine (with `engine_key` False, the CLI has no `rollout.engine` yet: one run each, on its default)."""
    common = [
        f"run.root={root}",
        f"run.name={RUN_NAME}",
        "run.overwrite=true",  # the second engine replaces the first's stage folder (its metrics read before)
        f"deepspeed.precision={mode.precision}",
        "stage.save_every=0",
        "stage.eval_every=0",
    ]
    common += mode.model_args
    sft_model = f"model.name_or_path={model_source(root, mode)}"
    steps = [
        Step("sft", None, (*common, sft_model, f"stage.max_steps={mode.steps['sft']}")),
        Step("dpo", None, (*common, f"stage.max_steps={mode.steps['dpo']}")),
    ]
    for stage in ("grpo", "ppo"):
        online = [
            EXPERIMENTS[stage],
            *common,
            f"stage.max_steps={mode.steps[stage]}",
            f"stage.generation.max_new_tokens={mode.new_tokens}",
            "data.eval_fraction=0.05",  # 30 held-out prompts: the evaluations stay short
        ]
        for engine in engines if engine_key else ("hf",):
            steps.append(Step(stage, engine, (*online, f"rollout.engine={engine}") if engine_key else tuple(online)))
    return steps


def parse_explain(text: str) -> tuple[float | None, float | None]:
    """(`rlhf explain`'s total bytes per GPU in MiB, the parameters of the models it trains), from its output."""
    total = EXPLAIN_TOTAL.search(text)
    mib = None if total is None else float(total.group(1)) * (1024 if total.group(2) == "GiB" else 1)
    trained = [float(t) * 1e6 for _, t in EXPLAIN_TRAINED.findall(text)]
    return mib, (sum(trained) if trained else None)


def mfu(trained_params: float | None, train_tok_s: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: 6 x trained parameters x training tokens/s over the peak (forward 2N, backward 4N
    per token; no attention term, no recompute, no frozen model's forward and no generation)."""
    if not (trained_params and train_tok_s and peak_flops):
        return None
    return 6.0 * trained_params * train_tok_s / peak_flops


def peak_flops_for(name: str) -> float | None:
    """The dense bf16 peak of the GPU called `name` (torch.cuda.get_device_name()), None when not in PEAK_BF16."""
    return next((peak for part, peak in PEAK_BF16 if part in name), None)


def measured_bf16_flops(n: int = 8192, iters: int = 20) -> float:
    """FLOP/s of a bf16 n x n matmul on this GPU: the fallback peak for a GPU PEAK_BF16 does not name."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for i in range(iters + 3):  # 3 to warm up
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        a @ a
    torch.cuda.synchronize()
    return 2.0 * n**3 * iters / (time.perf_counter() - t0)


def read_rates(metrics_file: Path, online: bool) -> dict[str, float | None]:
    """Training tokens/s (online: over the update only), generation new tokens/s and share, and the peak memory the
    stage recorded (`peak_mem_mib`), from its metrics.jsonl. The first step is left out of the rates (warm-up)
    unless it is the only one."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step_seconds" in r]
    timed = steps[1:] if len(steps) > 1 else steps

    def total(key: str) -> float:
        return sum(float(r.get(key) or 0.0) for r in timed)

    peaks = [r["peak_mem_mib"] for r in steps if r.get("peak_mem_mib") is not None]
    out: dict[str, float | None] = {"peak_mib": max(peaks) if peaks else None, "gen_tok_s": None, "gen_share": None}
    seconds = total("update_seconds" if online else "step_seconds")
    out["train_tok_s"] = total("tokens") / seconds if seconds else None
    if online and total("generation_seconds"):
        out["gen_tok_s"] = total("generated_tokens") / total("generation_seconds")
        busy = total("generation_seconds") + total("scoring_seconds") + total("update_seconds")
        out["gen_share"] = total("generation_seconds") / busy
    return out


def gpu_memory_used() -> float | None:
    """nvidia-smi's memory.used of the first visible GPU in MiB: every process on the card (vLLM's pools and the CUDA
    contexts too), not only a stage's torch allocator. None when it cannot say."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", visible]
    try:
        return float(subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def run_logged(command: list[str], log: Path, sample_gpu: bool) -> tuple[int, float | None]:
    """(exit status, the largest nvidia-smi memory.used seen) of `command`, its output into `log`; with `sample_gpu`
    the GPU's memory is read every half second while it runs. Past STAGE_TIMEOUT_S it is stopped as SLURM would:
    SIGTERM (the stage saves a checkpoint and exits), SIGKILL a minute later."""
    peak, deadline = None, time.monotonic() + STAGE_TIMEOUT_S
    with log.open("w") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT)
        while True:
            try:
                return proc.wait(timeout=0.5), peak
            except subprocess.TimeoutExpired:
                used = gpu_memory_used() if sample_gpu else None
                peak = peak if used is None else max(used, peak or 0.0)
            if time.monotonic() > deadline:
                fh.write(f"\ngpu-check: stopped after {STAGE_TIMEOUT_S} s (STAGE_TIMEOUT_S)\n")
                fh.flush()
                proc.terminate()
                try:
                    return proc.wait(timeout=60), peak
                except subprocess.TimeoutExpired:
                    proc.kill()
                    return proc.wait(), peak


def run_step(step: Step, root: Path, gpu: bool) -> Result:
    """`rlhf explain`, then the stage (its output into <root>/logs/<label>.log), then its metrics."""
    result = Result(step)
    explain = subprocess.run(step.explain_command(), capture_output=True, text=True)
    if explain.returncode == 0:
        result.explain_mib, result.trained_params = parse_explain(explain.stdout)
    else:
        result.notes.append(f"rlhf explain failed: {(explain.stderr or explain.stdout).strip()[-300:]}")
    log = root / "logs" / f"{step.label.replace('/', '-')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result.rc, result.smi_peak_mib = run_logged(step.command(), log, gpu and shutil.which("nvidia-smi") is not None)
    result.seconds = time.perf_counter() - t0
    if result.rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        result.notes.append(f"exit {result.rc}; the last lines of {log}:\n{tail}")
        return result
    metrics = root / RUN_NAME / step.stage / "metrics.jsonl"
    for key, value in read_rates(metrics, online=step.engine is not None).items():
        setattr(result, key, value)
    return result


def build_model(folder: Path, shape: dict | None = None) -> int:
    """A Qwen2 causal LM of `shape` (default Qwen2.5-0.5B's) with random weights in bf16 and the project's tiny
    tokenizer, saved as a Hugging Face folder (config, generation config, weights, tokenizer). Returns its
    parameter count. Built on the CPU, so this process holds no GPU memory while the stages run."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from rlhf_cli.models.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    config = Qwen2Config(
        **(shape or QWEN_SHAPE),
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        attention_dropout=0.0,
        **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(**ids, do_sample=False, max_new_tokens=128)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def succeeds(command: list[str]) -> bool:
    """True when `command` exits with 0 (its output dropped)."""
    return subprocess.run(command, capture_output=True).returncode == 0


def no_gpu_message() -> str:
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"gpu-check: no GPU is visible to torch (torch.cuda.is_available() is False; torch {torch.__version__} is "
        f"{build}); run it on a host with an NVIDIA GPU, or pass --cpu-smoke to run the same sequence on the CPU"
    )


def gpu_peak() -> tuple[str, float, str]:
    """(device name, bf16 peak FLOP/s, where the peak comes from): the table's, else a measured matmul."""
    import torch

    name = torch.cuda.get_device_name()
    peak = peak_flops_for(name)
    if peak is not None:
        return name, peak, "spec sheet"
    return name, measured_bf16_flops(), "measured bf16 matmul (name not in the table)"


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def table(results: list[Result], device: str, peak: float | None, peak_from: str, gpu: bool) -> str:
    """The summary: what the columns are, then one row per stage run."""
    mem = "CUDA max_memory_allocated" if gpu else "max RSS on the CPU"
    lines = [
        f"device: {device}" + (f"; bf16 peak {peak / 1e12:.0f} TFLOP/s ({peak_from})" if peak else ""),
        "train tok/s: tokens trained per second of update (online: the update phase alone); gen tok/s: new tokens per",
        "  second of generation; gen %: generation's share of an iteration; each stage's first step left out (warm-up)",
        "MFU: 6 x trained parameters (ppo: actor + critic) x train tok/s / bf16 peak",
        f"peak MiB: the stage's own record ({mem}); smi MiB: nvidia-smi memory.used of the whole GPU; explain",
        "  MiB: rlhf explain's model states per GPU (weights, gradients, optimizer; no activations, no KV cache)",
        f"  {'stage':<10}{'time s':>8}{'train tok/s':>13}{'gen tok/s':>11}{'gen %':>7}{'MFU %':>7}"
        f"{'peak MiB':>10}{'smi MiB':>9}{'explain MiB':>13}",
    ]
    for r in results:
        if r.rc != 0:
            lines.append(f"  {r.step.label:<10}{r.seconds:>8.0f}  FAILED (exit {r.rc})")
            continue
        lines.append(
            f"  {r.step.label:<10}{r.seconds:>8.0f}{fmt(r.train_tok_s, ',.0f'):>13}{fmt(r.gen_tok_s, ',.0f'):>11}"
            f"{fmt(r.gen_share, '.0f', 100):>7}{fmt(mfu(r.trained_params, r.train_tok_s, peak), '.1f', 100):>7}"
            f"{fmt(r.peak_mib, ',.0f'):>10}{fmt(r.smi_peak_mib, ',.0f'):>9}{fmt(r.explain_mib, ',.0f'):>13}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the tiny built-in model on the CPU, fp32, 2-3 steps")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--root", type=Path, help="run root (default: a new temporary folder, removed after a success)")
    return p.parse_args(argv)


def dry_run(args: argparse.Namespace) -> int:
    root = (args.root or Path(tempfile.gettempdir()) / "rlhf-gpu-check-XXXXXX").resolve()
    mode = CPU if args.cpu_smoke else GPU
    if not args.cpu_smoke:
        print(f"# build a Qwen2.5-0.5B-shaped model (random init, bf16) into {model_source(root, mode)}")
    for step in plan(root, mode, ("hf", "vllm")):
        note = "  # only when `import vllm` works" if step.engine == "vllm" else ""
        print(" ".join(step.explain_command()))
        print(" ".join(step.command()) + note)
    return 0


def run_all(root: Path, gpu: bool) -> list[Result]:
    """Build the model (GPU), then every stage run in order; nothing after a failed sft."""
    mode = GPU if gpu else CPU
    if gpu:
        t0, folder = time.perf_counter(), Path(model_source(root, mode))
        n = build_model(folder)
        print(
            f"model: {n / 1e6:.1f}M parameters, random init, in {folder} ({time.perf_counter() - t0:.0f} s)", flush=True
        )
    engine_key = succeeds([*RLHF, "ppo", "--cfg", "job", "rollout.engine=hf"])  # a new key: an older CLI refuses it
    engines = ("hf", "vllm") if engine_key and succeeds([sys.executable, "-c", "import vllm"]) else ("hf",)
    if not engine_key:
        print("rollout.engine: not a key of this CLI yet; grpo and ppo run once on its default engine")
    elif "vllm" not in engines:
        print("vllm not installed: skipped")
    results = []
    for step in plan(root, mode, engines, engine_key):
        result = run_step(step, root, gpu)
        status = "ok" if result.rc == 0 else f"FAILED (exit {result.rc})"
        print(f"{step.label}: {status} in {result.seconds:.0f} s", flush=True)
        for note in result.notes:
            print(f"  {note}")
        results.append(result)
        if step.stage == "sft" and result.rc != 0:
            break
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    import torch

    gpu = not args.cpu_smoke
    if gpu and not torch.cuda.is_available():
        print(no_gpu_message(), file=sys.stderr)
        return 1
    started = time.perf_counter()
    root = args.root or Path(tempfile.mkdtemp(prefix="rlhf-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: run root {root}", flush=True)
    results = run_all(root.resolve(), gpu)
    device, peak, peak_from = gpu_peak() if gpu else ("CPU (--cpu-smoke: tiny model, fp32)", None, "")
    print()
    print(table(results, device, peak, peak_from, gpu))
    failed = [r.step.label for r in results if r.rc != 0]
    print(f"\ngpu-check: {len(results)} stage run(s) in {(time.perf_counter() - started) / 60:.1f} min", end="")
    if failed:
        print(f"; FAILED: {', '.join(failed)} (logs and run kept in {root})")
        return 1
    print()
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
