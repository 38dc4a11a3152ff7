"""Sampling responses and reading log-probs back (docs/algorithms.md section 1).

Layout of a rollout batch: each row is `[left-padded prompt | response right-padded after its first EOS]`, so every
prompt ends at column P and response token t sits at column P + t. Position ids count real tokens only
(`attention_mask.cumsum - 1`), which is what generation used, so a training forward over the same tensors sees the
same positions (RoPE models do not care about a constant offset; absolute-position models do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from rlhf_cli.losses import IGNORE_INDEX, token_logprobs
from rlhf_cli.rollout.decode import decode


@dataclass
class Sequences:
    """A batch of prompt + response token ids in the layout above.

    input_ids, attention_mask, position_ids: (B, P + R); response_mask: (B, R) float, 1 up to and including the
    first EOS; has_eos: (B,) bool; prompt_len: P. sampler_logprobs: (B, R), the log-probs of the sampled tokens
    as an engine other than the trainer computed them while sampling (rollout/engines.py), else None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    prompt_len: int
    sampler_logprobs: torch.Tensor | None = None

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    def rows(self, idx: torch.Tensor | slice, trim: bool = True) -> Sequences:
        """The sub-batch `idx`; with `trim`, columns that are padding in every selected row are cut from the right
        (without, it keeps the batch's width, so per-row results stack back into (B, R))."""
        mask = self.response_mask[idx]
        width = int(mask.sum(0).nonzero().max()) + 1 if trim and mask.any() else mask.shape[1]
        end = self.prompt_len + width
        return Sequences(
            self.input_ids[idx, :end],
            self.attention_mask[idx, :end],
            self.position_ids[idx, :end],
            mask[:, :width],
            self.has_eos[idx],
            self.prompt_len,
        )


def sampling_config(gen: Any, eos_id: int, pad_id: int, greedy: bool = False) -> GenerationConfig:
    """The GenerationConfig of a rollout: temperature (and the top-k / top-p that a stage allows) and nothing else.
    The engines read only these fields: a checkpoint's own `generation_config` (a chat model's repetition_penalty,
    no_repeat_ngram_size, min_p, suppress_tokens...) would shape the sampled distribution while every log-prob we
    compute is plain softmax(logits / T), a biased ratio and KL from the first step (docs/algorithms.md 1.3)."""
    common = {"max_new_tokens": gen.max_new_tokens, "eos_token_id": eos_id, "pad_token_id": pad_id, "use_cache": True}
    if greedy or gen.temperature <= 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, **common)


def truncate_at_eos(
    response: torch.Tensor, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first EOS: response (B, R) -> (ids with pad after the EOS, mask (B, R) float
    that is 1 up to and including the first EOS (everything when there is none), has_eos (B,) bool)."""
    is_eos = response == eos_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, response.shape[1], dtype=torch.long)
    )
    positions = torch.arange(response.shape[1], device=response.device)
    mask = positions[None, :] <= first[:, None]
    return response.masked_fill(~mask, pad_id), mask.float(), has_eos


def join(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response: torch.Tensor,
    response_mask: torch.Tensor,
    has_eos: torch.Tensor,
) -> Sequences:
    """Prompt (B, P) left-padded + response (B, R) right-padded -> Sequences with real-token position ids."""
    attention = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return Sequences(
        torch.cat([prompt_ids, response], dim=1), attention, position_ids, response_mask, has_eos, prompt_ids.shape[1]
    )


@torch.no_grad()
def sample(
    module: Any, prompts: dict[str, torch.Tensor], config: GenerationConfig, eos_id: int, pad_id: int
) -> Sequences:
    """Generate responses for left-padded prompts {"input_ids", "attention_mask"} (B, P) with `module` (a plain
    model or PeftModel, parameters already gathered under ZeRO-3) by the hf engine's loop (rollout/decode.py); stop
    at EOS; returns the joined batch."""
    response, mask, has_eos = truncate_at_eos(decode(module, prompts, config), eos_id, pad_id)
    if response.shape[1] == 0:  # max_new_tokens reached before any token: keep one pad column
        response = torch.full((response.shape[0], 1), pad_id, dtype=response.dtype, device=response.device)
        mask = torch.zeros(response.shape, device=response.device)
    return join(prompts["input_ids"], prompts["attention_mask"], response, mask, has_eos)


def decode_responses(tokenizer: Any, seq: Sequences) -> list[str]:
    """The responses as text, up to and including their EOS (special tokens dropped)."""
    ids = seq.response_ids.masked_fill(seq.response_mask == 0, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def model_inputs(seq: Sequences) -> dict[str, torch.Tensor]:
    return {"input_ids": seq.input_ids, "attention_mask": seq.attention_mask, "position_ids": seq.position_ids}


def response_logits(model: Any, seq: Sequences) -> torch.Tensor:
    """Logits that predict the response tokens: (B, R, V), from positions P-1 .. P+R-2. Only the last R + 1
    positions go through the LM head (`logits_to_keep`): with long prompts and large vocabularies the (B, P, V)
    logits of the prompt are most of a forward's memory, and nothing reads them."""
    width = seq.response_mask.shape[1]
    logits = model(**model_inputs(seq), use_cache=False, logits_to_keep=width + 1).logits
    return logits[:, :-1]


def response_logprobs(logits: torch.Tensor, seq: Sequences, temperature: float) -> torch.Tensor:
    """log pi(response_t | prompt, response_<t) at `temperature` (fp32), 0 after the end: logits (B, R, V) from
    `response_logits` -> (B, R)."""
    labels = seq.response_ids.masked_fill(seq.response_mask == 0, IGNORE_INDEX)
    return token_logprobs(logits, labels, temperature=temperature if temperature > 0 else 1.0, shift=False)
