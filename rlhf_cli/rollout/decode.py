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

from rlhf_cli.rollout.decode_step import DecodeStep, supported


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


class _TransformersSteps:
    """The decoding step through transformers' forward and its DynamicCache (any model; rollout/decode_step.py runs
    the Llama family without it), with the same interface as `DecodeStep`."""

    def __init__(self, module: Any, cache: Any, mask: torch.Tensor):
        self.module, self.cache, self.mask = module, cache, mask

    def keep(self, going: torch.Tensor) -> torch.Tensor:
        order = going.nonzero().squeeze(1)  # finished rows leave the batch and the cache
        self.cache.batch_select_indices(order)
        self.mask = self.mask[order]
        return order

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tok), 1)], dim=1)
        out = self.module(
            input_ids=tok[:, None],
            attention_mask=self.mask,
            position_ids=pos[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()


@torch.no_grad()
def decode(module: Any, prompts: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
    """Responses to left-padded prompts {"input_ids", "attention_mask"} (B, P) with `module` (a transformers causal
    LM or a PeftModel over one): -> (B, R) token ids, each row cut after its first EOS (pad after it), R the steps
    run (at most config.max_new_tokens, fewer when every row ended)."""
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    eos, n_new = config.eos_token_id, config.max_new_tokens
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    cache, logits = prefill(module, ids, mask, pos)
    if supported(module, ids.shape[1] + n_new):
        step = DecodeStep(module, cache, mask, n_new)
    else:
        step = _TransformersSteps(module, cache, mask)
    warp = warpers(config)
    out = torch.full((len(ids), n_new), config.pad_token_id, dtype=ids.dtype, device=ids.device)
    live = torch.arange(len(ids), device=ids.device)  # the batch row of each slot
    pos = pos[:, -1]
    steps, shuffled = 0, False
    for t in range(n_new):
        if shuffled:  # draw in batch-row order, as with rows kept in order: the same samples whichever step runs
            rows = live.argsort()
            tok = torch.empty_like(live)
            tok[rows] = next_tokens(logits[rows], warp, config.do_sample)
        else:
            tok = next_tokens(logits, warp, config.do_sample)
        out[live, t] = tok
        steps = t + 1
        going = tok != eos
        if steps == n_new or not going.any():
            break
        if not going.all():
            order = step.keep(going)
            live, tok, pos = live[order], tok[order], pos[order]
            shuffled = bool((live[1:] < live[:-1]).any())
        pos = pos + 1
        logits = step(tok, pos, t)
    return out[:, :steps]
