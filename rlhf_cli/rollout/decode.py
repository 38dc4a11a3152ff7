"""The hf engine's decoding loop (rollout/engines.py): transformers' model forward with its KV cache, without
`generate`'s per-step machinery, and with two savings that rollouts allow (docs/rollout-engines.md):

- each distinct prompt is prefilled once: GRPO, RLOO and rejection sampling repeat every prompt N times, and the N
  copies share one forward over the prompt, whose cache and last logits are then copied N times;
- a row leaves the batch once it has sampled EOS (its cache rows are dropped), so the later decoding steps run only
  the rows still generating: with responses of mixed lengths most of the last steps' rows are done.

Sampling is `generate`'s: the logits in fp32, transformers' own temperature, top-k and top-p warpers in generate's
order, softmax and one draw per row from the global RNG (greedy: argmax). Only the settings of the
given config count: nothing is read from the checkpoint's `generation_config`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def warpers(config: Any) -> LogitsProcessorList:
    """What `generate` applies to the next-token logits for `config` (do_sample, temperature, top_k, top_p)."""
    out = LogitsProcessorList()
    if not config.do_sample:
        return out
    if config.temperature is not None and config.temperature != 1.0:
        out.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        out.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return out


def next_tokens(logits: torch.Tensor, warp: LogitsProcessorList, do_sample: bool) -> torch.Tensor:
    """One token per row from fp32 logits (N, V) -> (N,): warped, then the argmax, or a draw from softmax by the
    inverse of its cumulative sum at one uniform number per row (the same distribution as `torch.multinomial`,
    which on a CPU draws one exponential number per vocabulary entry: 10-20x the time of the whole draw here)."""
    scores = warp(None, logits)
    if not do_sample:
        return scores.argmax(dim=-1)
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    total = cdf[:, -1:]
    # u in [0, total): strictly below the last entry, so the first entry above u is a token of non-zero probability
    u = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def prefill(module: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The prompts' forward, once per distinct (ids, mask) row: ids, mask, pos (B, P) -> (the KV cache of all B
    rows, the fp32 logits (B, V) of each row's next token)."""
    rows, inverse = torch.unique(torch.cat([ids, mask.long()], dim=1), dim=0, return_inverse=True)
    distinct = len(rows) < len(ids)
    first = torch.zeros(len(rows), dtype=torch.long, device=ids.device).scatter_(
        0, inverse.flip(0), torch.arange(len(ids), device=ids.device).flip(0)
    )  # a row of the batch for each distinct prompt
    pick = first if distinct else slice(None)
    cache = DynamicCache(config=getattr(module, "config", None))
    out = module(
        input_ids=ids[pick],
        attention_mask=mask[pick],
        position_ids=pos[pick],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1].float()
    if distinct:
        cache.batch_select_indices(inverse)
        logits = logits[inverse]
    return cache, logits


@torch.no_grad()
def decode(module: Any, prompts: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
    """Responses to left-padded prompts {"input_ids", "attention_mask"} (B, P) with `module` (a transformers causal
    LM or a PeftModel over one): -> (B, R) token ids, each row cut after its first EOS (pad after it), R the steps
    run (at most config.max_new_tokens, fewer when every row ended)."""
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    eos, pad = config.eos_token_id, config.pad_token_id
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    cache, logits = prefill(module, ids, mask, pos)
    warp = warpers(config)
    out = torch.full((len(ids), config.max_new_tokens), pad, dtype=ids.dtype, device=ids.device)
    live = torch.arange(len(ids), device=ids.device)
    pos = pos[:, -1:]
    steps = 0
    for t in range(config.max_new_tokens):
        tok = next_tokens(logits, warp, config.do_sample)
        out[live, t] = tok
        steps = t + 1
        going = tok != eos
        if steps == config.max_new_tokens or not going.any():
            break
        if not going.all():  # finished rows leave the batch and the cache
            keep = going.nonzero().squeeze(1)
            live, tok, mask, pos = live[keep], tok[keep], mask[keep], pos[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        pos = pos + 1
        out_t = module(
            input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
        )
        logits = out_t.logits[:, -1].float()
    return out[:, :steps]
