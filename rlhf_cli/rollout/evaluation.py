"""Held-out evaluation of a policy, shared by the online stages and `rlhf eval`: responses to every held-out prompt
(greedy, or seeded sampling), scored by the reward source and, when given, by a gold metric."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.data import collate_prompts
from rlhf_cli.data.sharding import eval_batches
from rlhf_cli.rollout.generation import decode_responses, sample, sampling_config
from rlhf_cli.rollout.rewards import check_scores
from rlhf_cli.rollout.scoring import score_responses

# Rows of the sums vector (one column per prompt before summing): prompts, score (valid ones), scored prompts,
# response tokens, responses that ended with EOS, gold metric.
PROMPTS, SCORE, SCORED, LENGTH, EOS, GOLD = range(6)


@torch.no_grad()
def evaluate_policy(model: Any, reward: Any, examples: list, tokenizer: Any, gen_cfg: Any, dist: Any, seed: int,
                    batch_size: int, sampling: bool = False,
                    gold: Callable[[list[str], list[str]], list[float]] | None = None,
                    allow_invalid: bool = False) -> dict[str, float]:  # fmt: skip
    """Mean reward score (`eval_score`, raw: no normalisation or missing-EOS rule), response length in tokens
    (`eval_response_length`) and fraction that ended with EOS (`eval_eos_fraction`) of `model`'s responses to the
    held-out `examples` (PromptExamples); `eval_gold` too when `gold` is given: a `gold(prompts, responses) ->
    list[float]` function or a reward model (`rollout.rewards.build_gold`). {} without examples.

    `model`: a training engine, a frozen model (`engine.frozen`) or a plain module (see
    `engine.gathered_for_generation`; its mode is restored). `gen_cfg`: a stage's `generation` group; decoding is
    greedy unless `sampling`, which draws with `seed + rank` at every evaluation (scores differ only by the policy),
    the global RNG state restored afterwards. `allow_invalid`: a reward function's None / NaN is left out of the
    score mean (`eval_invalid_fraction` says how many) instead of an error.

    Sharded by `data.sharding.eval_batches` (forwards of at most `batch_size` prompts): every rank generates and
    scores the same number of batches (ZeRO-3 collectives in the gathering and the reward model's forwards line up);
    filler prompts are left out of the sums, so the result equals one process's. Collective."""
    if not examples:
        return {}
    config = sampling_config(gen_cfg, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=not sampling)
    rng = torch.get_rng_state()
    torch.manual_seed(seed + dist.rank)  # the same draws at every evaluation: scores differ only by the policy
    sums = torch.zeros(6, dtype=torch.float64)
    for part in eval_batches(len(examples), batch_size, dist.rank, dist.world_size):
        prompts = [examples[i] for i in part.idx]
        batch = {k: v.to(dist.device) for k, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
        with eng.gathered_for_generation(model) as module:
            seq = sample(module, batch, config, tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts = decode_responses(tokenizer, seq)
        scores = score_responses(reward, prompts, seq, texts, None, allow_invalid=allow_invalid).raw.double().cpu()
        scored = torch.isfinite(scores)
        per_prompt = torch.zeros(6, len(prompts), dtype=torch.float64)  # rows as in `sums`
        per_prompt[PROMPTS], per_prompt[SCORE], per_prompt[SCORED] = part.weight, scores.where(scored, 0.0), scored
        per_prompt[LENGTH] = seq.response_mask.sum(-1).double().cpu()
        per_prompt[EOS] = seq.has_eos.double().cpu()
        if gold is not None:
            per_prompt[GOLD] = gold_values(gold, prompts, seq, texts)
        sums += per_prompt[:, part.real].sum(dim=1)
    torch.set_rng_state(rng)
    n, score, scored, length, eos, gold_sum = eng.all_reduce_sum(sums).tolist()
    out = {"eval_score": score / scored if scored else float("nan"), "eval_response_length": length / n,
           "eval_eos_fraction": eos / n}  # fmt: skip
    if gold is not None:
        out["eval_gold"] = gold_sum / n
    if allow_invalid:
        out["eval_invalid_fraction"] = 1.0 - scored / n
    return out


def gold_values(gold: Any, prompts: list, seq: Any, texts: list[str]) -> torch.Tensor:
    """(B,) float64 on the CPU: the gold metric of each response, from a function (`gold_scores`) or a second reward
    model (`rollout.rewards.build_gold`: its raw score)."""
    if hasattr(gold, "score"):
        return score_responses(gold, prompts, seq, texts, None).raw.double().cpu()
    return torch.tensor(gold_scores(gold, prompts, texts), dtype=torch.float64)


def gold_scores(gold: Callable[[list[str], list[str]], list[float]], prompts: list, texts: list[str]) -> list[float]:
    """The gold metric of each response: `gold([prompt texts], [responses])`, one finite number per response."""
    name = f"gold metric {getattr(gold, '__module__', '?')}:{getattr(gold, '__name__', gold)}"
    return check_scores(gold([p.text for p in prompts], texts), len(texts), name)
