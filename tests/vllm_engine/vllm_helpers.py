"""Shared by the vLLM tests (`make test-vllm`, in .venv-vllm): the tiny model vLLM's CPU build accepts, prompts, a
one-process `dist`, an engine factory, and the trainer's own log-probs of a rollout.

The model is tests/unit/helpers.py's TINY but for its attention: vLLM's CPU attention supports head sizes 32, 64,
80, 96, ... only, and TINY's 32 / 4 heads = 8 is refused ("Unsupported CPU attention configuration: head_dim=8"),
so VLLM_TINY has 2 heads of 32 (1 key/value head: grouped-query attention, as TINY)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from rlhf_cli.config.online import RolloutConfig
from rlhf_cli.config.schema import ModelConfig, TinyModelConfig
from rlhf_cli.data.prompts import collate_prompts, tokenize_prompt
from rlhf_cli.models.tiny import build_tiny_llama, tiny_tokenizer
from rlhf_cli.rollout.generation import response_logits, response_logprobs, sampling_config

VLLM_TINY = TinyModelConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
)
DIST = SimpleNamespace(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
TEXTS = ["What is the capital of France?", "Name a fruit.", "Hi", "Write a poem about the sea.", "Is 7 even or odd?"]
TOK = tiny_tokenizer()


def tiny_model(seed: int = 0) -> torch.nn.Module:
    return build_tiny_llama(VLLM_TINY, TOK, seed).eval()


def prompts(texts: list[str] = TEXTS, repeat: int = 1) -> dict[str, torch.Tensor]:
    """Left-padded chat prompts {"input_ids", "attention_mask"} (B, P), B = len(texts) * repeat."""
    rows = [tokenize_prompt(TOK, [{"role": "user", "content": t}], 64) for t in texts for _ in range(repeat)]
    return collate_prompts(rows, TOK.pad_token_id)


def config(max_new_tokens: int = 24, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy=False):
    gen = SimpleNamespace(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    return sampling_config(gen, TOK.eos_token_id, TOK.pad_token_id, greedy=greedy)


def engine(**rollout):
    """A VLLMEngine as a stage makes it (rollout/engines.py make_engine), vLLM started at its first generate."""
    from rlhf_cli.rollout.vllm_engine import VLLMEngine

    cfg = dataclasses.replace(RolloutConfig(engine="vllm"), **rollout)
    return VLLMEngine(cfg, ModelConfig(tiny=VLLM_TINY), TOK, DIST)


@torch.no_grad()
def trainer_logprobs(model: torch.nn.Module, seq, temperature: float) -> torch.Tensor:
    """What the trainer recomputes for a rollout (rollout/experience.py collect): (B, R), 0 after the end."""
    return response_logprobs(response_logits(model, seq), seq, temperature)
