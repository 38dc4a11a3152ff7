"""The built-in `builtin:tiny-llama`: a randomly initialised Llama and the tokenizer shipped with the package.

It exists so the default run and every test work offline on a CPU in seconds. The tokenizer is made by
scripts/make_tiny_tokenizer.py from the shipped sample data (see rlhf_cli/assets/README.md).
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from rlhf_cli.config.schema import TinyModelConfig
from rlhf_cli.models.source import BUILTIN_TINY  # noqa: F401 (re-exported)
from rlhf_cli.models.tokenizer import tiny_tokenizer, tiny_tokenizer_path  # noqa: F401 (re-exported)

# New tokens the tiny model may generate unless a caller asks for more: the sample responses are one or two
# sentences (at most about 50 tokens), so this is generous without letting an untrained model ramble for long.
TINY_MAX_NEW_TOKENS = 128


def build_tiny_llama(tiny_cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A fresh Llama of the configured shape, identical for the same (config, tokenizer, seed).

    vocab_size = len(tokenizer), so every tokenizer id (added tokens included) has an embedding row. Dropout is 0
    (attention_dropout is Llama's only dropout): RLHF ratios and KL must be exact at step 0. Embeddings are untied,
    like the Llama-2/3 checkpoints users swap in: then LoRA, resizing, safetensors export and ZeRO-3 gathers never
    meet a shared tensor, and the extra lm_head (vocab x hidden, ~0.1M parameters here) costs nothing.
    The global torch RNG is left untouched, so building a model does not shift a later data shuffle.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny_cfg.hidden_size,
        intermediate_size=tiny_cfg.intermediate_size,
        num_hidden_layers=tiny_cfg.num_hidden_layers,
        num_attention_heads=tiny_cfg.num_attention_heads,
        num_key_value_heads=tiny_cfg.num_key_value_heads,
        max_position_embeddings=tiny_cfg.max_position_embeddings,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = tiny_generation_config(tokenizer)
    return model


def tiny_generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Greedy by default: `generate()` on the tiny model is for demos and tests, where reproducible output is
    what you want; rollout code passes its own sampling settings (do_sample, temperature) explicitly."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=TINY_MAX_NEW_TOKENS,
    )
