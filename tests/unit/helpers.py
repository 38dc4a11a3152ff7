"""Shared by the unit tests: repository paths, message builders (`user("hi")` -> {"role": "user", "content":
"hi"}) and the shape of a very small Llama for model-level tests."""

from pathlib import Path

import torch

from rlhf_cli.config.schema import TinyModelConfig

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "rlhf_cli" / "assets"
HH_REAL = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"  # real data, when beside the repo

TINY = TinyModelConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def t(rows) -> torch.Tensor:
    """A float32 tensor of hand-written numbers."""
    return torch.tensor(rows, dtype=torch.float32)


def close(actual: torch.Tensor, expected, **kw) -> None:
    torch.testing.assert_close(actual, t(expected), **kw)
