"""The model states of `rlhf explain`'s memory table: bytes per GPU of a trained model's parameters, gradients and
optimizer states under a ZeRO stage and offload (DeepSpeed's own estimators: mixed precision with Adam), of a frozen
model, and the parameter counts of a configured model (from its safetensors headers or built on the meta device)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from rlhf_cli.errors import UserError

GIB, MIB = 2**30, 2**20
# Columns of the memory table (per GPU; the last one per GPU's process, in CPU memory) and their widths.
COLUMNS = (("weights", 10), ("gradients", 11), ("optimizer", 11), ("gathered layer", 16), ("GPU total", 11), ("CPU", 9))


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


def weight_bytes(precision: str) -> int:
    """Bytes per parameter of the weights a GPU computes with: 16-bit under bf16 / fp16, else fp32."""
    return 2 if precision in ("bf16", "fp16") else 4


def model_state_bytes(
    n_params: int,
    n_trainable: int,
    largest_layer: int,
    zero_stage: int,
    precision: str,
    world_size: int,
    offload_optimizer: bool = False,
    offload_param: bool = False,
) -> ModelStates:
    """Per-GPU bytes of a model trained with Adam under ZeRO `zero_stage` over `world_size` ranks.

    Mixed precision (bf16/fp16): 2 B/param weights, 2 B 16-bit grads + 4 B fp32 grads (ZeRO-3 keeps the
    fp32 partition only), 12 B optimizer (fp32 master + 2 moments). fp32: 4 B weights, 4 B grads, 8 B moments.
    Frozen parameters (LoRA base) hold weights only."""
    n, t = float(n_params), float(n_trainable)
    w = weight_bytes(precision)
    g16, g32 = (2, 4) if w == 2 else (0, 4)
    opt = 12 if w == 2 else 8
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


def frozen_state_bytes(
    n_params: int, zero_stage: int, precision: str, world_size: int, offload_frozen: bool, offload_param: bool
) -> ModelStates:
    """Per-GPU bytes of a frozen model as `engine.frozen` holds it (PPO's reference and reward model): weights only,
    in the training precision. Under ZeRO-3 a DeepSpeed inference engine partitions them over the ranks (in CPU
    memory with deepspeed.offload_param; stage.offload_frozen does not move an engine); otherwise every GPU holds a
    full copy, or the copy waits in CPU memory between uses with stage.offload_frozen."""
    weights = float(n_params) * weight_bytes(precision) / (world_size if zero_stage == 3 else 1)
    on_cpu = offload_param if zero_stage == 3 else offload_frozen
    return ModelStates(0.0 if on_cpu else weights, 0.0, 0.0, 0.0, weights if on_cpu else 0.0)


def add_states(states: list[ModelStates]) -> ModelStates:
    return ModelStates(*(sum(getattr(s, f.name) for s in states) for f in fields(ModelStates)))


@dataclass(frozen=True)
class Row:
    """One model of a stage in the memory table: its name, what it is, its parameter counts and bytes per GPU."""

    name: str
    what: str
    n_params: int = 0
    trainable: int = 0
    largest: int = 0
    states: ModelStates = ModelStates(0.0, 0.0, 0.0, 0.0, 0.0)


def count_model(model_cfg: Any, scalar_head: bool = False) -> tuple[int, int, int]:
    """(all, trainable, largest layer) parameter counts of the configured model, built on the meta device
    (no weights are loaded or allocated): a causal LM, or with `scalar_head` the one-label sequence classifier that
    a reward model or a critic is (a classifier with k labels has (k - 1) x hidden parameters more).
    Read from the checkpoint's safetensors headers or the built-in model's config when possible (models/shapes.py:
    no torch import, so `explain` answers in about a second)."""
    from rlhf_cli.models.shapes import counts, fast_shapes

    shapes = fast_shapes(model_cfg, scalar_head)
    if shapes is not None:
        return counts(shapes)
    return meta_counts(model_cfg, scalar_head)


def meta_counts(model_cfg: Any, scalar_head: bool = False) -> tuple[int, int, int]:
    """count_model's counts from the model built on the meta device (LoRA applied as the stage applies it)."""
    import torch

    with torch.device("meta"):
        model = _meta_model(model_cfg, scalar_head)
        if model_cfg.lora.enabled:
            from rlhf_cli.models.load import apply_lora

            model = apply_lora(model, model_cfg.lora, "SEQ_CLS" if scalar_head else "CAUSAL_LM")
    params = list(model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), largest


def _meta_model(model_cfg: Any, scalar_head: bool) -> Any:
    """The model of `model_cfg` from its config alone (call under torch.device("meta"))."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_cli.models.load import is_builtin, load_tokenizer
    from rlhf_cli.models.tiny import build_tiny_llama

    remote = model_cfg.trust_remote_code
    if is_builtin(model_cfg.name_or_path):
        causal = build_tiny_llama(model_cfg.tiny, load_tokenizer(model_cfg), seed=0)
        if not scalar_head:
            return causal
        config = causal.config
    else:
        try:
            config = AutoConfig.from_pretrained(
                model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=remote
            )
        except OSError as err:
            raise UserError(f"cannot read the config of {model_cfg.name_or_path}: {err}") from None
        if not scalar_head:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    config.num_labels = 1
    return AutoModelForSequenceClassification.from_config(config, trust_remote_code=remote)


def world_size(cfg: Any) -> int:
    from rlhf_cli.config.batches import planned_world_size  # the rule the stage's composition checks use

    return planned_world_size(cfg)


def trained_row(name: str, model_cfg: Any, cfg: Any, scalar_head: bool = False, note: str = "trained") -> Row:
    """The row of a model the stage trains with Adam in its DeepSpeed engine."""
    ds = cfg.deepspeed
    n, t, largest = count_model(model_cfg, scalar_head)
    states = model_state_bytes(
        n, t, largest, ds.zero_stage, ds.precision, world_size(cfg), ds.offload_optimizer, ds.offload_param
    )
    what = f"{model_cfg.name_or_path}, {n / 1e6:.1f}M parameters, {t / 1e6:.1f}M trainable; {note}"
    return Row(name, what, n, t, largest, states)


def frozen_row(
    name: str, model_cfg: Any, cfg: Any, scalar_head: bool = False, offload_frozen: bool | None = None, note: str = ""
) -> Row:
    """The row of a frozen model (engine.frozen). `offload_frozen`: whether the stage moves it to the CPU between
    uses; None reads stage.offload_frozen (the online stages' reference, reward and teacher; dpo has no such key).
    rlhf eval's policies and judge never move (stages/common.py: frozen_policy), whatever the key says."""
    ds = cfg.deepspeed
    offload = cfg.stage.get("offload_frozen", False) if offload_frozen is None else offload_frozen
    n, _, largest = count_model(model_cfg, scalar_head)
    states = frozen_state_bytes(n, ds.zero_stage, ds.precision, world_size(cfg), offload, ds.offload_param)
    where = "partitioned over the ranks (ZeRO-3)" if ds.zero_stage == 3 else "a full copy on every GPU"
    if states.cpu:
        where = "in CPU memory " + (
            "(deepspeed.offload_param)" if ds.zero_stage == 3 else "between uses (stage.offload_frozen)"
        )
    what = f"{model_cfg.name_or_path}, {n / 1e6:.1f}M parameters; frozen, {where}" + (f"; {note}" if note else "")
    return Row(name, what, n, 0, largest, states)
