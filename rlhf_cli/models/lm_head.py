"""Logits only where a loss reads them (SFT, DPO): the LM head projects the target positions alone, in chunks.

A causal LM's forward projects every position, prompt and padding included, through the LM head, and the loss then
reads only the completion tokens. Here the backbone's last hidden states are taken with a forward hook on the decoder
(inside the model's own forward, so DeepSpeed's ZeRO-3 hooks, PEFT adapters and gradient checkpointing all apply as
usual), the positions whose next-token label is trained are gathered, and the head is called on them a chunk at a
time (`chunked_target_logprobs`): the (tokens, vocab) fp32 tensor is never held. The model's own projection is given
nothing to do (`logits_to_keep`, a boolean mask with no position set: transformers' own position selection).

The head alone gives the logits only for the families listed below, whose forward is `lm_head(hidden)` and nothing
else, or whose post-processing is elementwise and applied here identically (Gemma 2/3 soft-capping, Cohere's logit
scale, Granite's logit scaling). Any other class, and remote code, falls back to the model's full logits: correct,
just without the saving. tests/unit/test_lm_head.py builds a tiny model of every listed class and checks its
log-probs against the model's own logits, so a transformers upgrade that changes one of them fails there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rlhf_cli.losses.logprobs import IGNORE_INDEX, chunked_target_logprobs, token_logprobs
from rlhf_cli.models.load import unwrap

# fp32 logits per chunk (2^26 = 256 MiB): positions per chunk = CHUNK_ELEMENTS // vocab (443 for Qwen2.5's 151,936,
# every position at once for the tiny model's 1,538). A module constant rather than a config key: it changes memory,
# never results.
CHUNK_ELEMENTS = 1 << 26

# transformers causal LMs whose forward ends in `logits = self.lm_head(hidden_states)` with nothing after it.
PLAIN_HEADS = frozenset(
    [
        f"{name}ForCausalLM"
        for name in (
            "Llama",
            "Mistral",
            "Ministral",
            "Mixtral",
            "Qwen2",
            "Qwen2Moe",
            "Qwen3",
            "Qwen3Moe",
            "Phi",
            "Phi3",
            "Gemma",
            "Olmo",
            "Olmo2",
            "GPTNeoX",
            "SmolLM3",
            "Starcoder2",
            "StableLm",
            "Glm4",
            "Exaone4",
        )
    ]
    + ["GPT2LMHeadModel"]
)


def _softcap(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    cap = model.config.final_logit_softcapping
    return None if cap is None else lambda x: torch.tanh(x / cap) * cap  # the models' own order of operations


# Families that post-process the head's output: the same elementwise function, applied to each chunk.
POSTPROCESS: dict[str, Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor] | None]] = {
    "Gemma2ForCausalLM": _softcap,
    "Gemma3ForCausalLM": _softcap,
    "CohereForCausalLM": lambda m: lambda x: x * m.logit_scale,
    "GraniteForCausalLM": lambda m: lambda x: x / m.config.logits_scaling,
}


def logit_projection(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """hidden (n, d) -> the model's logits (n, V) through its output head module, or None when the head alone does not
    reproduce the model's logits (an unlisted class): the caller then uses the full logits. `model` may be a DeepSpeed
    engine or a PeftModel; a LoRA adapter on the head is part of the head module and so applies."""
    inner = unwrap(model)
    name = type(inner).__name__
    head = inner.get_output_embeddings()
    if head is None or not type(inner).__module__.startswith("transformers.models."):
        return None
    if name in PLAIN_HEADS:
        return head
    if name not in POSTPROCESS:
        return None
    post = POSTPROCESS[name](inner)
    return head if post is None else lambda h: post(head(h))


def target_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi(label_{t+1} | prefix) in fp32, computed only where the label is trained; 0 elsewhere.

    input_ids, attention_mask, labels (B, T), labels unshifted with IGNORE_INDEX on prompt and pad -> (B, T-1), the
    same as `token_logprobs(model(...).logits, labels)` (to float rounding) at a fraction of the head's cost and
    memory. `chunk_size` positions per head call (default: CHUNK_ELEMENTS // vocab). Gradients flow as usual.
    A packed batch (`data.packing`) comes with `position_ids` (B, T) restarting per sequence and no attention mask."""
    project = logit_projection(model)
    # Packed rows: no KV cache, or transformers skips its packed-sequence detection and attention crosses sequences.
    packed = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
    if project is None:
        return token_logprobs(model(input_ids=input_ids, attention_mask=attention_mask, **packed).logits, labels)
    inner = unwrap(model)
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts label t+1
    size = chunk_size or max(1, CHUNK_ELEMENTS // inner.config.get_text_config().vocab_size)
    found: list[torch.Tensor] = []

    def at_targets(_module: nn.Module, _args: tuple, output: tuple) -> None:
        hidden = output[0][:, :-1]  # last_hidden_state (B, T-1, d)
        found.append(chunked_target_logprobs(project, hidden[mask], labels[:, 1:][mask], size))

    handle = inner.get_decoder().register_forward_hook(at_targets)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=_no_logits(labels), **packed)
    finally:
        handle.remove()
    if len(found) != 1:
        raise RuntimeError(f"{type(inner).__name__}: the decoder ran {len(found)} times in one forward, expected 1")
    out = torch.zeros(mask.shape, dtype=torch.float32, device=found[0].device)
    return out.masked_scatter(mask, found[0])


def _no_logits(labels: torch.Tensor) -> torch.Tensor | int:
    """`logits_to_keep` that makes the model's own head compute (almost) nothing: an all-False (B, T) mask where
    transformers takes a boolean mask (5.20 on: `slice_logits_to_keep`), else 1, the last position's (B, 1, V)
    logits, which nothing reads (the versions vLLM's CPU build needs index with a mask as if it were positions)."""
    from transformers import modeling_utils

    if hasattr(modeling_utils, "slice_logits_to_keep"):
        return torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    return 1
