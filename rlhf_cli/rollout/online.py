"""What every online stage (PPO, rejection sampling, GRPO/RLOO...) builds and reports around its rollouts: the frozen
reference, the reward statistics that normalise scores, the rollout's sequence-level metrics, the time split, and the
sample rows written next to the metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rlhf_cli import engine as eng
from rlhf_cli.errors import UserError
from rlhf_cli.losses.ppo import masked_sum
from rlhf_cli.models import disable_dropout, load_causal_lm
from rlhf_cli.models.kind import check_reward_sources
from rlhf_cli.models.reward import REWARD_STATS_FILE
from rlhf_cli.rollout.controllers import RunningMoments
from rlhf_cli.rollout.experience import Advantages, Reference, Rollout


def build_reference(cfg: Any, run: Any, source: str, tokenizer: Any, dist: Any) -> tuple[Reference, str]:
    """(the frozen reference, where it comes from): `stage.reference` (a stage:<name>, folder or hub id) or the
    policy's starting checkpoint `source`; with a LoRA policy and no `stage.reference`, the policy itself with its
    adapters disabled (no second copy). Dropout off, eval mode, no gradients; ZeRO-3-partitioned under zero_stage=3;
    on the CPU between uses with `stage.offload_frozen`."""
    st = cfg.stage
    if cfg.model.lora.enabled and not st.reference:
        return Reference(None, False, dist.device), source  # the actor's own base weights: no second copy
    ref_source = run.resolve_source(st.reference) if st.reference else source
    model = load_causal_lm(OmegaConf.merge(cfg.model, {"name_or_path": ref_source}), tokenizer, seed=cfg.seed)
    disable_dropout(model)
    home = torch.device("cpu") if st.offload_frozen else dist.device
    return Reference(
        eng.frozen(model, cfg.deepspeed, st.micro_batch_size, home), st.offload_frozen, dist.device
    ), ref_source


def reward_stats(st: Any, run: Any) -> tuple[float, float] | None:
    """(mean, std) of the reward model actually used, for stage.reward.normalize=rm_stats: the `reward_stats.json`
    that `rlhf rm` writes next to its weights (for this run's `stage:rm`, also its manifest record, as older runs
    have no file). Refused, before any model is loaded, where no statistics describe the scores that get normalised:
    a reward function, `reduce=prob`, another label, or a model without the file. None for other normalisations."""
    check_reward_sources(st, run)  # a causal LM as reward / gold model: refused before any model loads
    r = st.reward
    if r.normalize != "rm_stats":
        return None
    fix, file = "; use stage.reward.normalize=running (or none)", REWARD_STATS_FILE
    if r.function or getattr(r, "functions", None) or not r.model:
        raise UserError(
            f"stage.reward.normalize=rm_stats needs a reward model trained by `rlhf rm`, whose recorded "
            f"eval mean / std it uses; the reward here is the function {r.function}{fix}"
        )
    if r.reduce != "logit" or r.label not in (None, "0", 0):
        raise UserError(
            f"stage.reward.normalize=rm_stats: the recorded mean / std are of the reward model's logit "
            f"(label 0), not of reduce={r.reduce} label={r.label} (stage.reward){fix}"
        )
    folder = Path(run.resolve_source(r.model))
    stats_file = folder / REWARD_STATS_FILE
    if stats_file.is_file():
        recorded = json.loads(stats_file.read_text())
    elif r.model == "stage:rm":
        recorded = run.stage_record("rm").get("metrics", {})
    else:
        recorded = {}
    if "reward_mean" not in recorded or "reward_std" not in recorded:
        raise UserError(
            f"stage.reward.normalize=rm_stats needs the reward mean / std that `rlhf rm` records from its "
            f"eval split ({file} next to the weights), and {r.model} has none{fix}"
        )
    return float(recorded["reward_mean"]), float(recorded["reward_std"])


def score_stats(st: Any, scores: torch.Tensor, moments: RunningMoments, rm_stats: tuple | None) -> tuple | None:
    """The (mean, std) to normalise this batch's raw scores (B,) with, per stage.reward.normalize: `rm_stats` the
    recorded ones, `running` the running moments after adding every rank's valid (finite) scores (collective), else
    None. Pass it to `score_responses` / `collect` as `stats=lambda raw: score_stats(st, raw, moments, rm_stats)`."""
    if st.reward.normalize == "rm_stats":
        return rm_stats
    if st.reward.normalize != "running":
        return None
    local = scores.detach().double().cpu()
    moments.update(eng.all_gather_cat(local[torch.isfinite(local)]))
    return moments.mean, moments.std


def sampler_sums(ro: Rollout) -> dict[str, torch.Tensor]:
    """This rank's sums of the sampler-trainer mismatch over valid tokens (docs/algorithms.md section 12): tokens,
    k3 of KL(sampler || trainer), |l_old - l_sampler|, tokens the cap changed; {} when the sampler is the trainer."""
    if ro.sampler_diff is None:
        return {}
    d, mask = ro.sampler_diff, ro.mask
    return {
        "stok": mask.sum(),
        "sk3": masked_sum(torch.expm1(d) - d, mask),
        "sabs": masked_sum(d.abs(), mask),
        "strunc": masked_sum(ro.is_truncated, mask),
    }


@torch.no_grad()
def rollout_metrics(ro: Rollout, adv: Advantages | None = None) -> dict[str, float]:
    """Sequence-level means over all ranks (collective): raw score mean / std over the scored responses, response
    length, EOS fraction, generated tokens; with a reference, the KL to it (sum over the response of k1, whatever
    estimator the reward uses); with `adv.rewards`, the non-score and total reward; with values and returns, their
    explained variance over all valid tokens. `invalid_fraction` appears when some response could not be scored.
    A sampler other than the trainer adds token means of the mismatch: `sampler_kl` (k3 of KL(sampler || trainer)),
    `sampler_abs_logp_diff` and `sampler_truncated` (the share of tokens whose weight the cap changed)."""
    mask, valid = ro.mask, ro.scores.valid
    scores = torch.where(valid, ro.scores.raw, 0.0)
    lengths = mask.sum(1)
    parts = {
        "n": torch.tensor(float(len(ro.prompts))),
        "valid": valid.float().sum(),
        "s": scores.sum(),
        "s2": (scores**2).sum(),
        "length": lengths.sum(),
        "eos": ro.seq.has_eos.float().sum(),
    }
    if ro.ref_logprobs is not None and ro.logprobs is not None:
        parts["kl"] = ((ro.logprobs - ro.ref_logprobs) * mask).sum(1).sum()
    if adv is not None and adv.rewards is not None:
        parts["non_score"], parts["total"] = adv.non_score.sum(), adv.rewards.sum()
    parts.update(sampler_sums(ro))
    if ro.values is not None and adv is not None and adv.returns is not None:
        returns, resid = adv.returns, adv.returns - ro.values
        parts.update(
            tok=mask.sum(),
            r=masked_sum(returns, mask),
            r2=masked_sum(returns**2, mask),
            d=masked_sum(resid, mask),
            d2=masked_sum(resid**2, mask),
        )
    local = torch.stack([v.double().cpu() for v in parts.values()])  # the count is a CPU tensor, the rest may not be
    sums = dict(zip(parts, eng.all_reduce_sum(local).tolist(), strict=True))
    n, k = sums["n"], sums["valid"]
    mean = sums["s"] / k if k else math.nan
    out = {
        "rollout_sequences": n,
        "score_mean": mean,
        "score_std": max(sums["s2"] / k - mean**2, 0.0) ** 0.5 if k else math.nan,
    }
    if "kl" in sums:
        out["kl"] = sums["kl"] / n
    if "total" in sums:
        out["non_score_reward"], out["total_reward"] = sums["non_score"] / n, sums["total"] / n
    out.update(response_length=sums["length"] / n, eos_fraction=sums["eos"] / n, generated_tokens=sums["length"])
    if "stok" in sums:
        tok = max(sums["stok"], 1.0)
        out.update(sampler_kl=sums["sk3"] / tok, sampler_abs_logp_diff=sums["sabs"] / tok)
        out["sampler_truncated"] = sums["strunc"] / tok
    if "tok" in sums:
        var_r = sums["r2"] / sums["tok"] - (sums["r"] / sums["tok"]) ** 2
        var_d = sums["d2"] / sums["tok"] - (sums["d"] / sums["tok"]) ** 2
        out["explained_variance"] = 1.0 - var_d / var_r if var_r > 1e-12 else float("nan")
    if k < n:
        out["invalid_fraction"] = 1.0 - k / n
    return out


def check_scorable(invalid_fraction: float | None, reward: Any, where: str) -> None:
    """Stop the stage when the reward scored none of a batch's replies (`invalid_fraction` 1: every one None / NaN /
    inf): every advantage would be 0 and the stage would run to the end learning nothing. `where` completes "the
    replies ...", e.g. "of iteration 3". Call it with a value that is the same on every rank (all-reduced)."""
    if invalid_fraction is None or invalid_fraction < 1.0:
        return
    raise UserError(
        f"the reward {reward.describe()} scored none of the replies {where}: it returned None / NaN for "
        "every one, so there is nothing to learn from. Check that it understands the replies as the policy "
        "writes them (`rlhf generate` shows some) and the prompts of this data"
    )


def timing(ro: Rollout, train_seconds: float, out: dict) -> dict[str, float]:
    """Seconds in generation, scoring (old/ref log-probs, values, reward) and training, and their throughputs; `out`
    holds the iteration's "generated_tokens" (`rollout_metrics`) and trained "tokens"."""
    gen, scoring = ro.seconds["generation"], ro.seconds["scoring"]
    total = gen + scoring + train_seconds
    return {
        "generation_seconds": gen,
        "scoring_seconds": scoring,
        "update_seconds": train_seconds,
        "generation_share": gen / total,
        "scoring_share": scoring / total,
        "update_share": train_seconds / total,
        "gen_tok/s": out["generated_tokens"] / max(gen, 1e-9),
        "train_tok/s": out["tokens"] / max(train_seconds, 1e-9),
    }


def write_samples(path: Path, iteration: int, ro: Rollout, n: int) -> None:
    """Append the first `n` rows of the rollout to `path` (JSON lines: iteration, prompt, response, raw score (null
    when it could not be scored), ended_with_eos). Rank 0 only."""
    with open(path, "a") as fh:
        for i in range(min(n, len(ro.prompts))):
            score = float(ro.scores.raw[i])
            row = {
                "iteration": iteration,
                "prompt": ro.prompts[i].text,
                "response": ro.responses[i],
                "score": score if math.isfinite(score) else None,
                "ended_with_eos": bool(ro.seq.has_eos[i]),
            }
            fh.write(json.dumps(row) + "\n")
