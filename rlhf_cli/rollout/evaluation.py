"""Held-out evaluation of a policy, shared by the online stages and `rlhf eval`: responses to every held-out prompt
(greedy, or seeded sampling), scored by the reward source and, when given, by a gold metric; and `rlhf eval`'s
teacher as a judge: its log-likelihood of each response."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_cli.data import collate_prompts
from rlhf_cli.data.sharding import eval_batches
from rlhf_cli.metrics import Sums
from rlhf_cli.rollout.comparison import mean_and_se
from rlhf_cli.rollout.engines import HF
from rlhf_cli.rollout.generation import decode_responses, response_logits, response_logprobs, sampling_config
from rlhf_cli.rollout.rewards import check_scores
from rlhf_cli.rollout.scoring import score_responses

# The sums over the held-out prompts: prompts, score (valid ones), scored prompts, response tokens, responses that
# ended with EOS, gold metric.
SUMS = ("prompts", "score", "scored", "length", "eos", "gold")
# A judge's log-likelihood of a response (`judge_loglik`): the mean per token, and the sum over the response.
JUDGE_QUANTITIES = ("judge_logp_token", "judge_logp_seq")


@dataclass(frozen=True)
class PolicyEval:
    """How `evaluate_policy` answers and scores: the tokenizer, the generation settings (a stage's `generation`
    group), the distributed group, the seed, prompts per forward; decoding greedy unless `sampling`; the gold metric
    (`gold(prompts, responses) -> list[float]` or a reward model, `rollout.rewards.build_gold`) when given;
    `allow_invalid`: a reward function's None / NaN is left out of the score mean (`eval_invalid_fraction` says how
    many) instead of an error; the rollout `engine` that answers (rollout/engines.py)."""

    tokenizer: Any
    gen_cfg: Any
    dist: Any
    seed: int
    batch_size: int
    sampling: bool = False
    gold: Callable[[list[str], list[str]], list[float]] | Any | None = None
    allow_invalid: bool = False
    engine: Any = HF

    @classmethod
    def of_stage(cls, ctx: Any, gold: Any = None, allow_invalid: bool = False) -> PolicyEval:
        """An online stage's settings from its context (stages/context.py): `stage.generation`,
        `stage.eval_batch_size`, `stage.eval_sampling`."""
        st = ctx.cfg.stage
        return cls(
            ctx.tokenizer,
            st.generation,
            ctx.dist,
            ctx.cfg.seed,
            st.eval_batch_size,
            st.eval_sampling,
            gold,
            allow_invalid,
            ctx.rollout if ctx.rollout is not None else HF,
        )


@torch.no_grad()
def evaluate_policy(model: Any, reward: Any, examples: list, how: PolicyEval) -> dict[str, float]:
    """Mean reward score (`eval_score`, raw: no normalisation or missing-EOS rule), response length in tokens
    (`eval_response_length`) and fraction that ended with EOS (`eval_eos_fraction`) of `model`'s responses to the
    held-out `examples` (PromptExamples); `eval_gold` too when `how.gold` is given. {} without examples.

    `model`: a training engine, a frozen model (`engine.frozen`) or a plain module (see
    `engine.gathered_for_generation`; its mode is restored). Sampling (`how.sampling`) draws with `seed + rank` at
    every evaluation (scores differ only by the policy), the global RNG state restored afterwards.

    Sharded by `data.sharding.eval_batches` (forwards of at most `batch_size` prompts): every rank generates and
    scores the same number of batches (ZeRO-3 collectives in the gathering and the reward model's forwards line up);
    filler prompts are left out of the sums, so the result equals one process's. Collective."""
    tokenizer, dist, gold = how.tokenizer, how.dist, how.gold
    if not examples:
        return {}
    config = sampling_config(how.gen_cfg, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=not how.sampling)
    rng = torch.get_rng_state()
    torch.manual_seed(how.seed + dist.rank)  # the same draws at every evaluation: scores differ only by the policy
    sums = Sums(*SUMS)
    for part in eval_batches(len(examples), how.batch_size, dist.rank, dist.world_size):
        prompts = [examples[i] for i in part.idx]
        batch = {k: v.to(dist.device) for k, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
        seq = how.engine.generate(model, batch, config)
        texts = decode_responses(tokenizer, seq)
        scores = score_responses(reward, prompts, seq, texts, None, allow_invalid=how.allow_invalid).raw.double().cpu()
        scored = torch.isfinite(scores)
        per_prompt = {
            "prompts": part.weight,
            "score": scores.where(scored, 0.0),
            "scored": scored,
            "length": seq.response_mask.sum(-1),
            "eos": seq.has_eos,
            "gold": torch.zeros(len(prompts), dtype=torch.float64)
            if gold is None
            else gold_values(gold, prompts, seq, texts),
        }
        sums.add_columns(per_prompt, keep=part.real)
    torch.set_rng_state(rng)
    total = sums.all_reduced()
    n, scored = total["prompts"], total["scored"]
    out = {
        "eval_score": total["score"] / scored if scored else float("nan"),
        "eval_response_length": total["length"] / n,
        "eval_eos_fraction": total["eos"] / n,
    }
    if gold is not None:
        out["eval_gold"] = total["gold"] / n
    if how.allow_invalid:
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


def judge_loglik(logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A judge's log-likelihood of each response from its log-probs of the response tokens: logprobs, mask (B, R) ->
    {judge_logp_seq: sum_t m_t l_t, judge_logp_token: that / the response's tokens}, each (B,) float64 on the CPU.
    Only the response's tokens count (its EOS included, nothing after it: the mask); a row without a token (none is
    generated so, but a filler row may be) has NaN for both, which the means leave out, not 0 and 0 / 0. Junk at
    masked positions never enters (`torch.where`)."""
    valid = mask.bool()
    total = torch.where(valid, logprobs.double(), 0.0).sum(1)
    count = valid.sum(1)
    some = count > 0
    per_token = torch.where(some, total / count.clamp(min=1), torch.nan)
    return {"judge_logp_seq": torch.where(some, total, torch.nan).cpu(), "judge_logp_token": per_token.cpu()}


@torch.no_grad()
def judge_values(judge: Any, seq: Any) -> dict[str, torch.Tensor]:
    """`judge_loglik` of a frozen causal LM `judge` (it reads the policies' token ids: same tokenizer) on the
    responses of `seq` (rollout.generation.Sequences), at temperature 1: the judge's own distribution, whatever
    temperature the policy sampled at. (B,) each."""
    return judge_loglik(response_logprobs(response_logits(judge, seq), seq, 1.0), seq.response_mask)


def judge_sums(values: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """(len(JUDGE_QUANTITIES), 3) float64 of (count, sum, sum of squares) over the rows with `weight` > 0 (filler
    rows have 0) and a finite value: added over batches and ranks, then `judge_summary`. values: name -> (B,)."""
    out = torch.zeros(len(JUDGE_QUANTITIES), 3, dtype=torch.float64)
    for i, name in enumerate(JUDGE_QUANTITIES):
        v = values[name].double().cpu()
        keep = (weight.double().cpu() > 0) & torch.isfinite(v)
        v = torch.where(keep, v, 0.0)
        out[i] = torch.stack([keep.double().sum(), v.sum(), (v * v).sum()])
    return out


def judge_summary(sums: torch.Tensor) -> dict[str, float]:
    """`judge_sums` over every batch and rank -> {name: mean over responses, name_se: its standard error}."""
    out: dict[str, float] = {}
    for i, name in enumerate(JUDGE_QUANTITIES):
        count, total, squares = sums[i].tolist()
        if count > 0:
            out[name], out[name + "_se"] = mean_and_se(count, total, squares)
    return out
