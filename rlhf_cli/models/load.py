"""Load tokenizers and causal LMs from `builtin:tiny-llama`, a local Hugging Face folder (a run-dir stage output
included) or a hub id; wrap them with LoRA; produce the plain model that `final/` is written from.

Every failure a user can fix (a missing folder, no network, no chat template, a LoRA target that does not exist)
becomes a `UserError` naming the path or key and what to do.
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_cli.config.schema import LoRAConfig, ModelConfig
from rlhf_cli.errors import UserError
from rlhf_cli.models.source import (  # noqa: F401 (re-exported: loaders import them from here)
    BUILTIN_TINY,
    MODEL_MARKER,
    TOKENIZER_MARKERS,
    _attn_error,
    is_builtin,
    load_pretrained,
    resolve_source,
)
from rlhf_cli.models.tiny import build_tiny_llama
from rlhf_cli.models.tokenizer import (  # noqa: F401 (re-exported)
    NEW_PAD_TOKEN,
    PAD_CANDIDATES,
    ensure_distinct_pad,
    load_tokenizer,
)

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)


def load_causal_lm(
    model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A causal LM matching `tokenizer`: embeddings cover every token id, pad/eos ids agree with the tokenizer.

    `seed` only matters for the built-in model (random init). Dropout and gradient checkpointing are the
    caller's business (see `enable_gradient_checkpointing`).
    """
    if is_builtin(model_cfg.name_or_path):
        model = build_tiny_llama(model_cfg.tiny, tokenizer, seed).to(dtype)
        if model.config._attn_implementation != model_cfg.attn_implementation:
            try:
                model.set_attn_implementation(model_cfg.attn_implementation)
            except (ImportError, ValueError) as e:
                raise _attn_error(model_cfg, e) from e
    else:
        model = load_pretrained(
            AutoModelForCausalLM,
            model_cfg.name_or_path,
            model_cfg,
            dtype=dtype,
            attn_implementation=model_cfg.attn_implementation,
        )
    resize_for_tokenizer(model, tokenizer)
    sync_special_ids(model, tokenizer)
    fp32_output_head(model)
    return model


class FP32OutputHead(nn.Linear):
    """An LM head that computes its logits in fp32 whatever the dtype of its weights and inputs: (..., d) -> (..., V)
    fp32. Under bf16 a bf16 head rounds every logit before the log-softmax (about 1e-2 nats per token, 0.5 nats
    summed over a 255-token reply: the size of a DPO margin), and upcasting the rounded logits does not undo it
    (docs/algorithms.md section 1.2). Only the positions that reach the head pay for it (`logits_to_keep`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), self.weight.float(), bias)


def fp32_output_head(model: PreTrainedModel) -> None:
    """Make the model's output projection an `FP32OutputHead`, in place. The class of the existing module is
    swapped rather than the module replaced, so its parameters stay the same objects: tied embeddings stay tied,
    state-dict names and checkpoints are unchanged, and DeepSpeed's ZeRO-3 hooks gather its weight as before."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        head.__class__ = FP32OutputHead


def resize_for_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Grow the embedding (and untied output) matrices to len(tokenizer) rows if they are smaller. True if grown.

    Never shrinks: many checkpoints pad their matrices beyond the tokenizer (Qwen: 151936 rows for 151665
    tokens). New rows are the mean of the old rows, deterministic and cheap (transformers' mean_resizing samples
    from a full covariance, minutes of CPU for a large hidden size); a new pad row is masked out of every loss,
    and a mean output row keeps its logit at the average, so the model does not start emitting it.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                emb.weight[old:] = emb.weight[:old].float().mean(dim=0).to(emb.weight.dtype)
    log.info("resized embeddings from %d to %d rows", old, len(tokenizer))
    return True


def sync_special_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make model.config and model.generation_config agree with the tokenizer's pad and eos.

    The config's eos becomes the tokenizer's eos unless it is a list that already holds it (Llama 3 Instruct).
    Generation stops at the tokenizer's eos first and at the checkpoint's own stop ids too, so a chat model
    still stops on its other end-of-turn tokens.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = pad
    if not (isinstance(model.config.eos_token_id, list) and eos in model.config.eos_token_id):
        model.config.eos_token_id = eos
    if tokenizer.bos_token_id is not None:
        model.config.bos_token_id = tokenizer.bos_token_id
    gen = getattr(model, "generation_config", None)  # sequence classifiers have none
    if gen is None:
        return
    gen.pad_token_id = pad
    old = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stops = [eos] + [i for i in old if i is not None and i != eos and i != pad]
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops


def disable_dropout(model: nn.Module) -> None:
    """Dropout off, for preference and RL training (docs/algorithms.md section 1.6): else pi/pi_ref != 1 at step 0.

    Sets p = 0 in every nn.Dropout, and zeroes the float `*dropout*` attributes that attention modules
    copy from the config at build time (Llama/Qwen attention dropout is functional, not an nn.Dropout)
    and the config's own probabilities, so a saved checkpoint keeps them off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
                setattr(config, key, 0.0)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (PreTrainedModel or PeftModel).

    Non-reentrant checkpointing needs no `enable_input_require_grads` hack for frozen (LoRA) embeddings, and
    use_cache=False stops every training forward from building a KV cache it throws away. Set
    `config.use_cache = True` again on the model you export.
    """
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_lora(
    model: PreTrainedModel,
    lora_cfg: LoRAConfig,
    task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
) -> PeftModel:
    """Wrap `model` (in place, peft's way) with LoRA adapters; only adapter weights (and `modules_to_save`,
    trained in full) stay trainable. Reward models pass peft's task type "SEQ_CLS", which keeps their head trainable."""
    from peft import LoraConfig, TaskType, get_peft_model  # here: only LoRA runs pay for importing peft

    if lora_cfg.r < 1 or lora_cfg.alpha <= 0:
        raise UserError(f"model.lora: r must be >= 1 and alpha > 0 (got r={lora_cfg.r}, alpha={lora_cfg.alpha})")
    _check_lora_targets(model, list(lora_cfg.target_modules))
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        bias="none",
        task_type=TaskType(task_type),
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def _check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """peft only fails when *no* target matches; a partly wrong list (Llama names on GPT-2) would silently
    train fewer layers than asked. Every name must match a module name or its last components, as in peft."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not targets or missing:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
            }
        )
        raise UserError(
            f"model.lora.target_modules: {missing or '[] (empty)'} not found in {type(model).__name__}; "
            f"its linear layers are {linear}"
        )


def merged_for_export(model: nn.Module, merge: bool = True) -> nn.Module:
    """The model to write to `final/`: LoRA merged into a plain model when `merge` (model.lora.merge) is true.

    Merges a deep copy, so the live PeftModel keeps its adapters and optimizer references (the stage may go on
    training, evaluating or writing a resume checkpoint after export); merging in place and unmerging later would
    add rounding error to the base weights. The cost is one extra model in memory during export.
    Not a PeftModel, or merge is false: `model` itself (a PeftModel then saves as an adapter folder).
    """
    if not is_peft_model(model) or not merge:
        return model
    return copy.deepcopy(model).merge_and_unload()


def is_peft_model(model: Any) -> bool:
    """isinstance(model, PeftModel) without importing peft: a PeftModel only exists once something imported peft."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a DeepSpeed engine (`.module`) and/or a PeftModel."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if is_peft_model(model):
        model = model.get_base_model()
    return model
