"""models/shapes.py: parameter counts from safetensors headers or the built-in config equal the counts of the model
built on the meta device (explain's reference path), for causal LMs and scalar heads, tied and untied, sharded."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_cli.commands.model_states import count_model, meta_counts
from rlhf_cli.config.compose import compose
from rlhf_cli.models.shapes import fast_shapes

SMALL = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _model_cfg(name, *extra):
    return compose("sft", [f"model.name_or_path={name}", *extra]).model


def _same(model_cfg, scalar_head):
    assert fast_shapes(model_cfg, scalar_head) is not None  # the fast path is the one under test
    assert count_model(model_cfg, scalar_head) == meta_counts(model_cfg, scalar_head)


@pytest.mark.parametrize("scalar_head", [False, True])
def test_builtin_tiny_counts_match_the_meta_model(scalar_head):
    _same(_model_cfg("builtin:tiny-llama", "model.tiny.hidden_size=48", "model.tiny.num_hidden_layers=3"), scalar_head)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scalar_head", [False, True])
def test_local_causal_checkpoint_counts_match(tmp_path, tied, scalar_head):
    with torch.device("cpu"):
        LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied)).save_pretrained(tmp_path)
    _same(_model_cfg(tmp_path), scalar_head)


def test_sharded_checkpoint_and_reward_model_checkpoint(tmp_path):
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(tmp_path / "lm", max_shard_size="20KB")
    assert (tmp_path / "lm" / "model.safetensors.index.json").is_file()
    _same(_model_cfg(tmp_path / "lm"), scalar_head=False)
    LlamaForSequenceClassification(LlamaConfig(**SMALL, num_labels=1)).save_pretrained(tmp_path / "rm")
    _same(_model_cfg(tmp_path / "rm"), scalar_head=True)


def test_the_meta_model_is_used_where_shapes_cannot_be_known(tmp_path):
    assert fast_shapes(_model_cfg("builtin:tiny-llama", "model.lora.enabled=true"), False) is None
    (tmp_path / "config.json").write_text("{}")  # no weights: the config alone (test_explain counts it on meta)
    assert fast_shapes(_model_cfg(tmp_path), False) is None
    (tmp_path / "model.safetensors").write_bytes(b"\x05")  # truncated header
    assert fast_shapes(_model_cfg(tmp_path), False) is None
