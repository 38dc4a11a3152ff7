"""One rollout batch of an online stage (docs/algorithms.md sections 4 and 8): sample N responses per prompt, read back
the rollout policy's log-probs at the sampling temperature and, where the stage has them, the reference's log-probs
and the critic's values (all in eval mode, without gradients), and score the responses (rollout/scoring.py).

`collect` gives a `Rollout`; what a method derives from it (per-token rewards, advantages, returns) goes in a
separate `Advantages`, so one rollout can feed several estimators. PPO's (KL in the reward, GAE) is `advantages`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.losses.mismatch import sampler_weights
from rlhf_cli.losses.ppo import gae, kl_penalty, masked_whiten, per_token_rewards
from rlhf_cli.models.reward import head_outputs
from rlhf_cli.rollout.engines import HF
from rlhf_cli.rollout.generation import (
    Sequences,
    decode_responses,
    model_inputs,
    response_logits,
    response_logprobs,
)
from rlhf_cli.rollout.scoring import Scores, Stats, score_responses


@dataclass
class Rollout:
    """B = prompts x n_samples rows, a prompt's samples consecutive. Tensors are (B, R) over response tokens unless
    noted. `group` (B,) long: the index of the row's prompt in this rank's batch (row i: i // n_samples);
    `logprobs` (the rollout policy's) is None when not computed, `ref_logprobs` None without a reference, `values`
    None without a critic; `scores` raw and shaped (B,). When the sampler is not the trainer (rollout.engine=vllm):
    `sampler_diff`, l_old - l_sampler per token (the engine's own log-probs of the sampled tokens against the
    trainer's), `is_weights` the truncated importance
    weights pi_old / pi_sampler the policy loss multiplies by, and `is_truncated` (1 where the cap acted); else
    None (docs/algorithms.md section 12)."""

    seq: Sequences
    prompts: list[Any]
    responses: list[str]
    group: torch.Tensor
    logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None
    scores: Scores
    seconds: dict[str, float] = field(default_factory=dict)
    sampler_diff: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    is_truncated: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.seq.response_mask


# The Rollout's optional per-token (B, R) tensors, in field order.
PER_TOKEN = ("logprobs", "ref_logprobs", "values", "sampler_diff", "is_weights", "is_truncated")


@dataclass
class Advantages:
    """What an estimator derives from a rollout, (B, R) over response tokens, 0 after the end: `advantages` (what
    the policy loss reads); with a critic, `returns` (the value targets); with KL in the reward, `kl` (the per-token
    estimate), `rewards` (KL penalty + score on the last token) and `non_score` (the KL penalty alone)."""

    advantages: torch.Tensor
    returns: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    non_score: torch.Tensor | None = None


class Reference:
    """The frozen reference policy: a separate model, or (LoRA actor) the actor with its adapters disabled."""

    def __init__(self, model: Any | None, offload: bool, device: torch.device):
        self.model, self.offload, self.device = model, offload, device

    def describe(self, source: str) -> str:
        return "the policy with LoRA adapters disabled" if self.model is None else f"frozen copy of {source}"

    @torch.no_grad()
    def logprobs(self, actor: Any, seq: Sequences, temperature: float) -> torch.Tensor:
        """log pi_ref of the response tokens at `temperature`: (B, R), 0 after the end."""
        if self.model is None:
            with unwrap_peft(actor).disable_adapter():
                return response_logprobs(response_logits(actor, seq), seq, temperature)
        with eng.on_device(self.model, self.device, self.offload) as model:
            return response_logprobs(response_logits(model, seq), seq, temperature)


def unwrap_peft(model: Any) -> Any:
    """The PeftModel inside a DeepSpeed engine."""
    return getattr(model, "module", model)


def critic_values(critic: Any, seq: Sequences) -> torch.Tensor:
    """V(state before response token t): the value head at positions P-1 .. P+R-2 -> (B, R), 0 after the end."""
    out = head_outputs(critic, **model_inputs(seq))[..., 0].float()
    return out[:, seq.prompt_len - 1 : -1] * seq.response_mask


def expand(prompts: list[Any], n: int) -> tuple[list[Any], torch.Tensor]:
    """Each prompt n times, its copies consecutive: (prompts (B*n), group (B*n,) long, row i -> prompt i // n)."""
    if n < 1:
        raise ValueError(f"n_samples must be >= 1, got {n}")
    return [p for p in prompts for _ in range(n)], torch.arange(len(prompts)).repeat_interleave(n)


@dataclass(frozen=True)
class RolloutModels:
    """The models a rollout reads: the policy (`actor`, a training engine or a plain module), the reward source, and
    where the stage has them the critic and the frozen reference."""

    actor: Any
    reward: Any
    critic: Any | None = None
    ref: Reference | None = None


@dataclass(frozen=True)
class Collecting:
    """How `collect` samples and scores: the tokenizer, the stage's config (`st`: micro_batch_size,
    generation.temperature, reward), the sampling config, `n_samples` per prompt, the score normalisation `stats`,
    `allow_invalid` (a reward function's None / NaN kept as invalid), `old_logprobs` (see `collect`); the rollout
    `engine` (rollout/engines.py) and, for an engine whose sampler is not the trainer, the importance-weight
    `correction` (rollout.correction) and its cap."""

    tokenizer: Any
    st: Any
    gen_config: Any
    n_samples: int = 1
    stats: Stats = None
    allow_invalid: bool = False
    old_logprobs: bool = True
    engine: Any = HF
    correction: str = "none"
    correction_cap: float = 2.0


@torch.no_grad()
def collect(models: RolloutModels, prompts: list[Any], batch: dict, how: Collecting) -> Rollout:
    """Sample `how.n_samples` responses per prompt from `models.actor` and read back, in micro-batches of
    `st.micro_batch_size`, the old log-probs at `st.generation.temperature`, the reference's log-probs (`models.ref`,
    or None) and the values (`models.critic`, or None); then score them (`score_responses` with `st.reward`,
    `how.stats` and `how.allow_invalid`). `prompts` (B,) are the PromptExamples of the left-padded `batch`
    {"input_ids", "attention_mask"} (B, P); the rollout has B * n_samples rows, a prompt's samples consecutive.
    The models' train / eval modes are restored afterwards. `old_logprobs=False` skips the rollout policy's
    log-probs (`logprobs` is then None): a method that updates once per rollout takes its ratio from the detached
    current log-probs and needs no KL in the reward. An engine whose sampler is not the trainer always gets them:
    they are pi_old of the importance weights (see `Rollout`)."""
    actor, critic, ref, reward = models.actor, models.critic, models.ref, models.reward
    tokenizer, st, gen_config, n_samples = how.tokenizer, how.st, how.gen_config, how.n_samples
    t0 = time.perf_counter()
    prompts, group = expand(prompts, n_samples)
    if n_samples > 1:
        batch = {k: v.repeat_interleave(n_samples, dim=0) for k, v in batch.items()}
    seq = how.engine.generate(actor, batch, gen_config)
    t1 = time.perf_counter()
    sampler_lp = None if how.engine.sampler_is_trainer else seq.sampler_logprobs
    responses = decode_responses(tokenizer, seq)
    trained = [m for m in (actor, critic) if m is not None]
    modes = [m.training for m in trained]
    for m in trained:
        m.eval()
    tau = st.generation.temperature
    parts: dict[str, list[torch.Tensor]] = {"old": [], "ref": [], "values": []}
    for start in range(0, len(prompts), st.micro_batch_size):
        sub = seq.rows(slice(start, start + st.micro_batch_size), trim=False)
        if how.old_logprobs or sampler_lp is not None:
            parts["old"].append(response_logprobs(response_logits(actor, sub), sub, tau))
        if ref is not None:
            parts["ref"].append(ref.logprobs(actor, sub, tau))
        if critic is not None:
            parts["values"].append(critic_values(critic, sub))
    scores = score_responses(reward, prompts, seq, responses, st.reward, how.stats, how.allow_invalid)
    for m, mode in zip(trained, modes, strict=True):
        m.train(mode)
    old, ref_lp, values = (torch.cat(parts[k]) if parts[k] else None for k in ("old", "ref", "values"))
    out = Rollout(seq, prompts, responses, group.to(seq.input_ids.device), old, ref_lp, values, scores)
    out.seconds = {"generation": t1 - t0, "scoring": time.perf_counter() - t1}
    if sampler_lp is not None:
        out.sampler_diff = (old - sampler_lp.to(old.device)) * seq.response_mask
        out.is_weights, out.is_truncated = sampler_weights(
            old, sampler_lp.to(old.device), seq.response_mask, how.correction, how.correction_cap
        )
        if not how.old_logprobs:  # the method's ratio is still against the detached current log-probs
            out.logprobs = None
    return out


@torch.no_grad()
def advantages(ro: Rollout, st: Any, kl_coef: float) -> Advantages:
    """PPO's estimator (docs/algorithms.md sections 4.3-4.5): the KL to the reference (`st.kl_estimator`, from the
    rollout policy's log-probs) in the per-token reward with the shaped score on the last token, optional reward
    whitening, GAE over response tokens (`st.gamma`, `st.lam`), returns before whitening, whitened advantages. Needs
    the reference's log-probs and the critic's values."""
    if ro.ref_logprobs is None or ro.values is None:
        raise ValueError("PPO's advantages need a rollout with reference log-probs and critic values")
    mask = ro.mask
    kl = kl_penalty(ro.logprobs, ro.ref_logprobs, st.kl_estimator) * mask
    rewards, non_score = per_token_rewards(kl, ro.scores.shaped, mask, kl_coef)
    whitened = masked_whiten(rewards, mask, shift_mean=False) if st.whiten_rewards else rewards
    adv, returns = gae(whitened, ro.values, mask, st.gamma, st.lam)
    return Advantages(masked_whiten(adv, mask), returns, kl, rewards, non_score)


def concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts (each from its own generate call) as one: prompts left-padded to the widest prompt, responses and
    per-token tensors right-padded to the longest response (pad ids, mask 0, log-probs 0). `group` renumbered so
    that prompt indices stay distinct. Timings add up."""
    if len(parts) == 1:
        return parts[0]
    p_len = max(r.seq.prompt_len for r in parts)
    r_len = max(r.mask.shape[1] for r in parts)

    def widen(x: torch.Tensor, left: int, right: int, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(x, (left, right), value=value)

    seqs, per_token = [], {k: [] for k in PER_TOKEN}
    for r in parts:
        s, left, right = r.seq, p_len - r.seq.prompt_len, r_len - r.mask.shape[1]
        seqs.append(
            Sequences(
                widen(s.input_ids, left, right, pad_id),
                widen(s.attention_mask, left, right, 0),
                widen(s.position_ids, left, right, 0),
                widen(s.response_mask, 0, right, 0.0),
                s.has_eos,
                p_len,
            )
        )
        for key in per_token:
            value = getattr(r, key)
            per_token[key].append(None if value is None else widen(value, 0, right, 0.0))
    fields = ("input_ids", "attention_mask", "position_ids", "response_mask", "has_eos")
    seq = Sequences(*(torch.cat([getattr(s, f) for s in seqs]) for f in fields), p_len)
    offsets = torch.tensor([0] + [int(r.group.max()) + 1 for r in parts[:-1]]).cumsum(0)
    group = torch.cat([r.group + int(o) for r, o in zip(parts, offsets, strict=True)])
    joined = {k: None if any(v is None for v in vs) else torch.cat(vs) for k, vs in per_token.items()}
    scores = Scores(torch.cat([r.scores.raw for r in parts]), torch.cat([r.scores.shaped for r in parts]))
    seconds = {k: sum(r.seconds.get(k, 0.0) for r in parts) for k in parts[0].seconds}
    return Rollout(
        seq,
        [p for r in parts for p in r.prompts],
        [t for r in parts for t in r.responses],
        group,
        joined["logprobs"],
        joined["ref_logprobs"],
        joined["values"],
        scores,
        seconds,
        *(joined[k] for k in PER_TOKEN[3:]),
    )


def take_rows(ro: Rollout, idx: list[int]) -> Rollout:
    """The rows `idx` of a rollout (same widths)."""
    t = torch.tensor(idx, dtype=torch.long, device=ro.mask.device)
    s = ro.seq
    seq = Sequences(
        s.input_ids[t], s.attention_mask[t], s.position_ids[t], s.response_mask[t], s.has_eos[t], s.prompt_len
    )
    pick = lambda x: None if x is None else x[t]  # noqa: E731
    return Rollout(
        seq,
        [ro.prompts[i] for i in idx],
        [ro.responses[i] for i in idx],
        ro.group[t],
        pick(ro.logprobs),
        pick(ro.ref_logprobs),
        pick(ro.values),
        Scores(ro.scores.raw[t], ro.scores.shaped[t]),
        dict(ro.seconds),
        *(pick(getattr(ro, k)) for k in PER_TOKEN[3:]),
    )
