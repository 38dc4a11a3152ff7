"""`rlhf explain <stage> [overrides]`: the batch algebra and a per-GPU memory estimate of the model states
(parameters, gradients, optimizer states) under the chosen ZeRO stage and offload, without training.

The byte counts follow DeepSpeed's own estimators (mixed precision with Adam: 16-bit parameters and
gradients, fp32 gradient partition, fp32 master weights, two fp32 Adam moments), so the totals agree with
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` (tested). Activations
are not included: they depend on the batch and the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU (and offloaded to CPU memory) for one model."""

    params: float
    grads: float
    optimizer: float
    working: float  # ZeRO-3: the largest layer gathered for compute
    cpu: float

    @property
    def gpu_total(self) -> float:
        return self.params + self.grads + self.optimizer + self.working


def model_state_bytes(
    n_params: int, n_trainable: int, largest_layer: int, zero_stage: int, precision: str, world_size: int,
    offload_optimizer: bool = False, offload_param: bool = False,
) -> ModelStates:  # fmt: skip
    """Per-GPU bytes of a model trained with Adam under ZeRO `zero_stage` over `world_size` ranks.

    Mixed precision (bf16/fp16): 2 B/param weights, 2 B 16-bit grads + 4 B fp32 grads (ZeRO-3 keeps the
    fp32 partition only), 12 B optimizer (fp32 master + 2 moments). fp32: 4 B weights, 4 B grads, 8 B moments.
    Frozen parameters (LoRA base) hold weights only."""
    n, t = float(n_params), float(n_trainable)
    mixed = precision in ("bf16", "fp16")
    w = 2 if mixed else 4
    g16, g32 = (2, 4) if mixed else (0, 4)
    opt = 12 if mixed else 8
    if zero_stage == 3:
        g16 = 0  # reduced straight into the fp32 partition
    params = n * w / (world_size if zero_stage == 3 else 1)
    grads = t * g16 / (world_size if zero_stage >= 2 else 1) + t * g32 / (world_size if zero_stage >= 1 else 1)
    optimizer = t * opt / (world_size if zero_stage >= 1 else 1)
    working = 4.0 * largest_layer if zero_stage == 3 else 0.0
    cpu = 0.0
    if offload_optimizer:
        if zero_stage == 2:  # grads go to CPU with the optimizer step; only the 16-bit weights stay
            cpu, grads = grads + optimizer, 0.0
        else:
            cpu, grads = grads * (g32 / max(g16 + g32, 1)) + optimizer, grads * (g16 / max(g16 + g32, 1))
        optimizer = 0.0
    if offload_param and zero_stage == 3:
        cpu, params = cpu + params, 0.0
    return ModelStates(params, grads, optimizer, working, cpu)


def count_model(model_cfg: Any) -> tuple[int, int, int]:
    """(all, trainable, largest layer) parameter counts of the configured model, built on the meta device
    (no weights are loaded or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_cli.models import apply_lora, build_tiny_llama, is_builtin, load_tokenizer

    with torch.device("meta"):
        if is_builtin(model_cfg.name_or_path):
            model = build_tiny_llama(model_cfg.tiny, load_tokenizer(model_cfg), seed=0)
        else:
            try:
                config = AutoConfig.from_pretrained(
                    model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
                )
            except OSError as err:
                raise UserError(f"cannot read the config of {model_cfg.name_or_path}: {err}") from None
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
        if model_cfg.lora.enabled:
            model = apply_lora(model, model_cfg.lora)
    params = list(model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), largest


def starting_model(cfg: Any, overrides: list[str]) -> Any:
    """The model config to count: `stage:<name>` is that stage's final/ in the run directory when it exists, else
    the model `rlhf <name>` would start from with the same overrides (the architecture is the same)."""
    from omegaconf import OmegaConf

    from rlhf_cli.config.compose import compose

    name = cfg.model.name_or_path
    if not name.startswith("stage:"):
        return cfg.model
    source = name.split(":", 1)[1]
    final = Path(cfg.run.root) / cfg.run.name / source / "final"
    if final.is_dir():
        return OmegaConf.merge(cfg.model, {"name_or_path": str(final)})
    return starting_model(compose(source, overrides), overrides)


def report(cfg: Any, stage: str, overrides: list[str] = ()) -> str:
    world = cfg.launcher.nproc_per_node * cfg.launcher.nnodes
    st, ds = cfg.stage, cfg.deepspeed
    n, t, largest = count_model(starting_model(cfg, list(overrides)))
    states = model_state_bytes(
        n, t, largest, ds.zero_stage, ds.precision, world, ds.offload_optimizer, ds.offload_param
    )
    lines = [
        f"rlhf {stage}: batch algebra",
        f"  micro batch {st.micro_batch_size} x accumulation {st.gradient_accumulation_steps} x world size {world} "
        f"({cfg.launcher.nnodes} node(s) x {cfg.launcher.nproc_per_node}) = global batch "
        f"{st.micro_batch_size * st.gradient_accumulation_steps * world} sequences per optimizer step",
        f"  at most {st.micro_batch_size * max_tokens(cfg)} tokens per micro-batch ({max_tokens(cfg)} per sequence)",
        "",
        f"memory per GPU, model states (ZeRO-{ds.zero_stage}, {ds.precision}, offload optimizer "
        f"{ds.offload_optimizer}, offload parameters {ds.offload_param}); activations not included",
        f"  policy ({cfg.model.name_or_path}, trained): {n / 1e6:.1f}M parameters, {t / 1e6:.1f}M trainable",
        f"    parameters {states.params / GIB:8.3f} GiB",
        f"    gradients  {states.grads / GIB:8.3f} GiB",
        f"    optimizer  {states.optimizer / GIB:8.3f} GiB",
    ]
    if states.working:
        lines.append(f"    gathered layer (ZeRO-3 working set) {states.working / GIB:8.3f} GiB")
    lines.append(f"    total      {states.gpu_total / GIB:8.3f} GiB per GPU")
    if stage == "ppo":
        frozen = n * {"fp32": 4, "bf16": 2, "fp16": 2}[ds.precision] / (world if ds.zero_stage == 3 else 1)
        lines.append(f"  ppo also trains a critic of about the same size (its own optimizer: about the same again) and "
                     f"holds a frozen reference and reward model: about {frozen / GIB:.3f} GiB of weights each "
                     f"({'on CPU between uses' if st.offload_frozen else 'on the GPU'})")  # fmt: skip
    if states.cpu:
        lines.append(f"    offloaded to CPU memory: {states.cpu / GIB:.3f} GiB per GPU")
    return "\n".join(lines)


def max_tokens(cfg: Any) -> int:
    """Longest sequence of a stage: data.max_length, or (ppo) the longest prompt plus the new tokens."""
    if "max_prompt_length" in cfg.data:
        return cfg.data.max_prompt_length + cfg.stage.generation.max_new_tokens
    return cfg.data.max_length


def main(args: list[str]) -> int:
    from rlhf_cli.cli import STAGES, out_console
    from rlhf_cli.config.compose import compose

    if not args or args[0] not in STAGES:
        raise UserError(f"usage: rlhf explain <stage> [key=value ...]; stages: {', '.join(STAGES)}")
    cfg = compose(args[0], args[1:])
    out_console.print(report(cfg, args[0], args[1:]), markup=False)
    return 0
