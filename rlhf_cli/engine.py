"""The one module that imports DeepSpeed: distributed setup, engine construction, backward/step, generation from a
(ZeRO-3) engine and export of a Hugging Face checkpoint. Resume state (save, prune, load) is in checkpoints.py.

Loss normalisation contract: a stage hands `backward` a micro-batch's *summed* loss and the normaliser of
the whole optimizer step (e.g. target tokens over all micro-batches and all ranks). DeepSpeed would
divide by the accumulation steps and average gradients over ranks; we undo the first (scale_wrt_gas=False)
and pre-multiply by the world size for the second, so the step's gradient is exactly
d(sum of all losses / normaliser) whatever the micro-batch split or the number of ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    # Pick DeepSpeed's CPU accelerator up front instead of letting it probe and warn.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch.distributed as dist
from deepspeed.utils import logger as ds_logger

from rlhf_cli.errors import UserError
from rlhf_cli.models import merged_for_export

ds_logger.setLevel(logging.WARNING)
# ZeRO calls torch's older collective names, which warn on every step.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Dist:
    """Join the process group (gloo on CPU, NCCL on GPU). Without a launcher, become a 1-process group."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if device.type == "cpu":
            skip_shm_op()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


SHM_OP = "deepspeed_shm_comm"


def skip_shm_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op when the CPU process group starts.

    On the CPU accelerator DeepSpeed's communication backend JIT-compiles `deepspeed_shm_comm` (C++20, OpenMP; 25-39 s
    per build, rebuilt whenever its cache key changes, and a multi-screen ninja traceback where no compiler is
    installed) before it joins the group: `deepspeed/comm/torch.py` `build_shm_op` builds it when DeepSpeed's table of
    compatible ops says it can. Its kernel serves only the inference all-reduce of tensor parallelism (AutoTP), never
    ZeRO, which goes through torch.distributed. So the op is marked not compatible in that table (DeepSpeed's own
    switch: `deepspeed.ops.__compatible_ops__`, which it otherwise fills on first use by probing every op with the
    compiler), and the backend runs without it, as it does where the op cannot be built."""
    import deepspeed.ops as ds_ops

    table = vars(ds_ops).get("__compatible_ops__")
    if table is None:  # not probed yet: no probe is needed for the one op the backend asks about
        ds_ops.__compatible_ops__ = {SHM_OP: False}
    else:
        table[SHM_OP] = False


def needs_compiler(what: str) -> None:
    """A DeepSpeed op that must be compiled on first use (`what` names the setting): one clear message where no C++
    compiler is installed, instead of ninja's traceback from deep inside the build."""
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        raise UserError(
            f"{what} uses a DeepSpeed op compiled on first use, and no C++ compiler was found (c++, g++ or $CXX): "
            "install one (Debian / Ubuntu: apt-get install g++), or turn that setting off"
        )


def shutdown(together: bool = True) -> None:
    """Leave the process group: a barrier first when every rank gets here (`together`), so no rank exits
    while another still talks to it. A single process destroys its group; with several ranks the CLI ends
    the process with `exit_now` instead, because tearing down gloo and DeepSpeed's C++ threads at interpreter
    exit can abort a rank ("terminate called without an active exception", SIGABRT) after all work is saved."""
    if not dist.is_initialized():
        return
    if together:
        dist.barrier()
    if dist.get_world_size() == 1:
        dist.destroy_process_group()


def exit_now(code: int) -> None:
    """End a rank of a multi-rank run at once, skipping interpreter teardown (see `shutdown`). Everything is
    written by then: the manifest is fsynced, checkpoints and final/ are closed files."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float | torch.Tensor) -> torch.Tensor:
    """Sum a scalar (or tensor) over ranks; returns a float64 CPU tensor for exact token counts."""
    t = torch.as_tensor(value, dtype=torch.float64).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = t.to(backend_device)
        dist.all_reduce(t)
    return t.cpu()


def all_gather_cat(values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D CPU tensor, concatenated in rank order (ranks may hold different lengths)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values.cpu())
    return torch.cat(parts)


def same_on_all_ranks(value: str) -> bool:
    """True if every rank holds the same `value` (e.g. the config hash)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return len(set(values)) == 1


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object), e.g. what rank 0 found on disk, so that ranks which
    looked at different moments still act on one view."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (used to agree on stopping at a step boundary)."""
    return bool(all_reduce_sum(float(flag)) > 0)


def ds_config(ds: Any, optim: Any, micro_batch: int, grad_accum: int, world_size: int) -> dict:
    """The DeepSpeed JSON config built from the typed `deepspeed` and `optim` groups."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        # Gather the full 16-bit weights on save so final/ can be exported from rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # torch's AdamW on a CPU-only host, offload included (the states are in CPU memory already, and
                # DeepSpeed's CPU Adam, the same AdamW in C++, would be compiled on first use); with a GPU, DeepSpeed's
                # fused Adam, or its CPU Adam for offloaded states.
                "torch_adam": not torch.cuda.is_available(),
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    cfg.update(dict(ds.extra))
    return cfg


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), the usual transformer recipe."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_schedule(optim: Any, total_steps: int):
    """A callable optimizer -> LambdaLR: linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""
    warmup = optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_ratio * total_steps)
    floor = optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if optim.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)


def initialize(model: torch.nn.Module, config: dict, optim: Any, total_steps: int):
    """Wrap `model` in a DeepSpeed engine with AdamW and the schedule; returns the engine."""
    adam = config["optimizer"]["params"]
    if config["zero_optimization"].get("offload_optimizer") and not adam.get("torch_adam"):  # CPU Adam is compiled
        needs_compiler("deepspeed.offload_optimizer=true (DeepSpeed's CPU Adam)")
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, optim.weight_decay),
        lr_scheduler=lr_schedule(optim, total_steps),
        config=config,
    )
    return engine


def frozen(model: torch.nn.Module, ds: Any, micro_batch: int, device: torch.device) -> torch.nn.Module:
    """A model used only for inference next to a trained one (DPO reference, PPO reference and reward):
    eval mode, no gradients. Under ZeRO-3 it is partitioned like the trained model (an inference-only
    DeepSpeed engine, as OpenRLHF does), so a large reference does not need a full copy per GPU."""
    model.eval().requires_grad_(False)
    if ds.zero_stage != 3:
        # The trained model's engine holds bf16 / fp16 weights under those precisions; a frozen copy of the same
        # checkpoint in the same dtype gives the same log-probs at step 0 (KL 0), at half the memory of fp32.
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ds.precision)
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "zero_optimization": {"stage": 3, **({"offload_param": {"device": "cpu"}} if ds.offload_param else {})},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def backward(engine: Any, loss_sum: torch.Tensor, normaliser: float) -> None:
    """Backward of `loss_sum / normaliser` for the whole step (see the module docstring)."""
    engine.backward(loss_sum * (dist.get_world_size() / normaliser), scale_wrt_gas=False)


def step(engine: Any) -> float | None:
    """Optimizer step (DeepSpeed applies it only at the accumulation boundary). Returns the global gradient
    norm before clipping at a boundary, None otherwise. DeepSpeed reports it under ZeRO >= 1; under
    ZeRO-0 it is computed here from the already all-reduced gradients."""
    boundary = engine.is_gradient_accumulation_boundary()
    norm = None
    if boundary and engine.zero_optimization_stage() == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    engine.step()
    if boundary and norm is None:
        reported = engine.get_global_grad_norm()
        norm = None if reported is None else float(reported)
    return norm


def current_lr(engine: Any) -> float:
    return engine.get_lr()[0]


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gathered_parameters(params: list[Any], partitioned: bool) -> Any:
    """Read-only access to `params` in full for the duration (DeepSpeed's GatheredParameters on every rank: a
    collective) when they are ZeRO-3 partitioned (`partitioned`); nothing to do otherwise."""
    if not partitioned:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@contextlib.contextmanager
def gathered_for_generation(model: Any) -> Iterator[Any]:
    """The module to call `generate` on, in eval mode and without gradients (its mode restored on exit).

    `model` is a training engine (`initialize`), a frozen model (`frozen`: a plain module, or under ZeRO-3 an
    inference engine), or any plain module. Under ZeRO-3 the parameters are gathered once for the whole generation
    and DeepSpeed's module hooks are removed for its duration (DeepSpeed's own `unwrap_model_for_generation`, as TRL
    and OpenRLHF do), then put back. With the hooks left on, every decoding step re-gathers and re-partitions each
    layer (slow everywhere), and a rank whose responses all end early leaves the loop while another still issues
    all-gathers (a hang on NCCL). Without hooks each rank decodes on its own, so `generate` needs no `synced_gpus`.
    Costs one full copy of the weights per rank while generating."""
    is_engine = hasattr(model, "zero_optimization_stage")  # training or inference DeepSpeed engine
    module = model.module if is_engine else model
    was_training = module.training
    module.eval()
    gather = contextlib.nullcontext()
    if is_engine and model.zero_optimization_stage() == 3:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        gather = unwrap_model_for_generation(model)
    try:
        with gather, torch.no_grad():
            yield module
    finally:
        module.train(was_training)


@contextlib.contextmanager
def on_device(model: Any, device: torch.device, offloaded: bool) -> Iterator[Any]:
    """A frozen model that lives on the CPU between uses (`offloaded`), on `device` for the duration; otherwise
    unchanged. A DeepSpeed inference engine (ZeRO-3) stays put: it offloads its parameters itself
    (`deepspeed.offload_param`)."""
    movable = offloaded and isinstance(model, torch.nn.Module) and not hasattr(model, "zero_optimization_stage")
    if movable:
        model.to(device)
    try:
        yield model
    finally:
        if movable:
            model.to("cpu")


def full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (gathered under ZeRO-3), None on other ranks. Collective."""
    if engine.zero_optimization_stage() == 3:
        # DeepSpeed gathers module by module and keeps the full tensors on rank 0 only.
        state = engine._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().cpu() for k, v in state.items()} if dist.get_rank() == 0 else None
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def export_hf(engine: Any, tokenizer: Any, out_dir: Path, merge_lora: bool) -> None:
    """Write `out_dir` as a Hugging Face folder (safetensors, config, generation config, tokenizer with its
    chat template) that `from_pretrained` loads. Written under a temporary name and renamed, so a crash
    never leaves a half-written final/. Collective (ZeRO-3 gathers); rank 0 writes.

    LoRA: with `merge_lora` the adapters are merged into the base weights (a plain checkpoint)."""
    state = full_state_dict(engine)
    if dist.get_rank() == 0:
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        model = engine.module
        # Training may have turned the KV cache off (gradient checkpointing); generation wants it on.
        model.config.use_cache = True
        if merge_lora and hasattr(model, "merge_and_unload"):
            merged_for_export(model, merge=True).save_pretrained(tmp)  # merges a copy: the engine keeps its adapters
        else:
            model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    barrier()
