"""The hf engine's one-token decoding step for the Llama family (Llama, Mistral, Qwen2, Qwen3), without
transformers' forward (docs/rollout-engines.md#the-hf-engine).

A decoding step through transformers' forward pays, besides its arithmetic, for about 60 module calls, a causal mask
and rotary tables rebuilt, and a cache that grows by concatenation: on the tiny default 4.4-5.6 ms a step at 1-8
rows, against 2-4 ms here (scripts/bench_rollout.py). This step does the same arithmetic with the model's own weights
and in the order of transformers' modules (RMSNorm in fp32 then cast, rotary embedding, softmax in fp32, gated MLP),
over

- a key / value cache preallocated for the whole generation and written in place (the prompt's columns copied
  from the prefill, one new column per step);
- an additive mask for the prompts' padding built once (none at all once no live row is padded);
- cos / sin tables computed once, by the model's own rotary module, for every position the rollout reaches.

It runs only where it computes what transformers computes: the listed classes with their RMSNorm, a rotary type
whose tables do not depend on the sequence length, no sliding window shorter than the rollout. Linear layers that
are not a plain `nn.Linear` (a LoRA layer, the fp32 output head, a quantized layer) are called as modules, so they
apply as in training. Anything else takes transformers' forward (rollout/decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CLASSES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
ROPE_TYPES = {"default", "linear", "llama3", "yarn"}  # tables independent of the sequence length
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


def _linear(m: nn.Module) -> Any:
    """x (n, in) -> m(x) (n, out): for a plain nn.Linear W @ x^T without a module call (on this machine's MKL the
    product in that orientation ran 10-30% faster than x @ W^T at 4-32 rows), else the module itself."""
    if type(m) is not nn.Linear:
        return m
    weight, bias = m.weight, m.bias
    if bias is None:
        return lambda x: torch.matmul(weight, x.T).T
    return lambda x: torch.matmul(weight, x.T).T + bias


def _rms(m: nn.Module | None) -> Any:
    """transformers' RMSNorm, op for op: fp32 variance, rsqrt, cast back, times the weight."""
    if m is None:
        return None
    weight, eps = m.weight, m.variance_epsilon

    def norm(x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    return norm


@dataclass
class _Layer:
    attn_norm: Any
    q: Any
    k: Any
    v: Any
    o: Any
    q_norm: Any
    k_norm: Any
    mlp_norm: Any
    gate: Any
    up: Any
    down: Any
    act: Any
    scaling: float


def causal_lm(module: Any) -> Any:
    """The transformers model under `module` (a PeftModel's base model, with its adapters injected)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def supported(module: Any, length: int) -> bool:
    """Whether this step computes what transformers' forward computes for `module`, for sequences of up to `length`
    columns."""
    model = causal_lm(module)
    if type(model).__name__ not in CLASSES:
        return False
    config, layers = model.config, model.model.layers
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in layers]  # Qwen2 / Qwen3, per layer
    if type(model).__name__ == "MistralForCausalLM":
        windows.append(getattr(config, "sliding_window", None))
    norms = [
        model.model.norm,
        *(m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)),
    ]
    return (
        rope in ROPE_TYPES
        and all(w is None or length <= w for w in windows)
        and getattr(config, "pretraining_tp", 1) == 1
        and all(type(m).__name__ in NORMS for m in norms)
        and len(layers) == config.num_hidden_layers
    )


def _layers(model: Any) -> list[_Layer]:
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out.append(
            _Layer(
                _rms(layer.input_layernorm),
                _linear(attn.q_proj),
                _linear(attn.k_proj),
                _linear(attn.v_proj),
                _linear(attn.o_proj),
                _rms(getattr(attn, "q_norm", None)),
                _rms(getattr(attn, "k_norm", None)),
                _rms(layer.post_attention_layernorm),
                _linear(mlp.gate_proj),
                _linear(mlp.up_proj),
                _linear(mlp.down_proj),
                mlp.act_fn,
                attn.scaling,
            )
        )
    return out


class DecodeStep:
    """One decoding step of up to B rows over a cache of L = P + max_new columns.

    Rows are slots 0..n-1 of the buffers; `keep` moves live rows into the slots of finished ones so the live rows
    stay a prefix (the caller tracks which batch row each slot holds)."""

    def __init__(self, module: Any, cache: Any, mask: torch.Tensor, max_new: int):
        model = causal_lm(module)
        config = model.config
        self.embed, self.norm, self.head = model.model.embed_tokens, _rms(model.model.norm), _linear(model.lm_head)
        self.layers = _layers(model)
        b, p = mask.shape
        self.p = p
        first = cache.layers[0].keys
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, first.shape[1], first.shape[3]
        # every layer's keys and values in one buffer (layer, key / value, row, KV head, column, D): moving a row is
        # one copy for the whole cache
        self.kv = first.new_empty(len(cache.layers), 2, b, self.kv_heads, p + max_new, self.head_dim)
        for i, layer in enumerate(cache.layers):  # the prefill's cache, copied once
            self.kv[i, 0, :, :, :p], self.kv[i, 1, :, :, :p] = layer.keys, layer.values
        self.bias = torch.zeros(b, 1, 1, p + max_new, dtype=first.dtype, device=first.device)
        self.bias[:, 0, 0, :p].masked_fill_(mask == 0, torch.finfo(first.dtype).min)
        self.padded = bool((mask == 0).any())
        positions = torch.arange(int(mask.sum(1).max()) + max_new, device=mask.device)[None]
        cos, sin = model.model.rotary_emb(first, positions)  # (1, positions, D), the model's own tables
        half = self.head_dim // 2
        self.cos = cos[0]
        # rotate_half(x) * sin == x.roll(half) * sin with the first half's sign flipped: one op fewer per step
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        """tok, pos (n,): the newest token of each live slot and its position id; t: the step (its column is
        P + t) -> fp32 logits (n, V) of the next token."""
        n, col = len(tok), self.p + t
        x = self.embed(tok)  # (n, hidden)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (n, 1, D)
        bias = self.bias[:n, :, :, : col + 1] if self.padded else None
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer, layer.attn_norm(x), cos, sin, bias, i, n, col)
            h = layer.mlp_norm(x)
            x = x + layer.down(layer.act(layer.gate(h)) * layer.up(h))
        return self.head(self.norm(x)).float()

    def _attention(self, layer: _Layer, h, cos, sin, bias, i: int, n: int, col: int) -> torch.Tensor:
        """h (n, hidden) -> the attention block's output (n, hidden), the step's key and value written at `col`."""
        d = self.head_dim
        q, k, v = layer.q(h).view(n, -1, d), layer.k(h).view(n, -1, d), layer.v(h).view(n, -1, d)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q = q * cos + q.roll(d // 2, dims=-1) * sin
        self.kv[i, 0, :n, :, col] = k * cos + k.roll(d // 2, dims=-1) * sin
        self.kv[i, 1, :n, :, col] = v
        keys, values = self.kv[i, :, :n, :, : col + 1]  # each (n, KV, col + 1, D)
        q = q.view(n, self.kv_heads, self.heads // self.kv_heads, d)  # grouped query heads share a key head
        scores = torch.matmul(q, keys.transpose(2, 3)) * layer.scaling  # (n, KV, G, col + 1)
        if bias is not None:
            scores = scores + bias
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return layer.o(torch.matmul(weights, values).reshape(n, self.heads * d))

    def keep(self, going: torch.Tensor) -> torch.Tensor:
        """going (n,) bool, the slots still generating -> order (m,): the old slot each new slot 0..m-1 holds.
        Live slots past the new end move into the finished slots before it (one copy per finished row, not a
        compaction of the whole cache)."""
        m = int(going.sum())
        holes = (~going[:m]).nonzero().squeeze(1)
        fillers = going[m:].nonzero().squeeze(1) + m
        order = torch.arange(m, device=going.device)
        order[holes] = fillers
        self.kv[:, :, holes] = self.kv[:, :, fillers]
        self.bias[holes] = self.bias[fillers]
        self.padded = self.padded and bool((self.bias[:m, 0, 0, : self.p] != 0).any())
        return order
