"""One rollout batch with everything PPO needs (ALGORITHMS.md section 4): sample responses, read back the old
policy's and the reference's log-probs at the sampling temperature and the critic's values (all in eval mode,
without gradients), score the responses, then build the per-token rewards (KL in the reward), advantages and
returns."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.losses.ppo import (
    apply_missing_eos,
    clip_scores,
    gae,
    kl_penalty,
    masked_whiten,
    normalize_scores,
    per_token_rewards,
)
from rlhf_cli.models.reward import head_outputs
from rlhf_cli.rollout.generation import Sequences, model_inputs, response_logits, response_logprobs, sample


@dataclass
class Rollout:
    """Tensors are (B, R) over response tokens unless noted; `scores` (B,) are the reward source's scores after
    the missing-EOS rule, before normalisation; `used_scores` (B,) after normalisation and clipping."""

    seq: Sequences
    prompts: list[Any]
    responses: list[str]
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    used_scores: torch.Tensor = None
    kl: torch.Tensor = None
    rewards: torch.Tensor = None
    non_score: torch.Tensor = None
    advantages: torch.Tensor = None
    returns: torch.Tensor = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def mask(self) -> torch.Tensor:
        return self.seq.response_mask


class Reference:
    """The frozen reference policy: a separate model, or (LoRA actor) the actor with its adapters disabled."""

    def __init__(self, model: Any | None, offload: bool, device: torch.device):
        self.model, self.offload, self.device = model, offload, device

    def describe(self, source: str) -> str:
        return "the policy with LoRA adapters disabled" if self.model is None else f"frozen copy of {source}"

    @torch.no_grad()
    def logprobs(self, actor: Any, seq: Sequences, temperature: float) -> torch.Tensor:
        if self.model is None:
            with unwrap_peft(actor).disable_adapter():
                return response_logprobs(response_logits(actor, seq), seq, temperature)
        model = eng.place(self.model, self.device) if self.offload else self.model
        try:
            return response_logprobs(response_logits(model, seq), seq, temperature)
        finally:
            if self.offload:
                eng.place(self.model, torch.device("cpu"))


def unwrap_peft(model: Any) -> Any:
    """The PeftModel inside a DeepSpeed engine."""
    return getattr(model, "module", model)


def critic_values(critic: Any, seq: Sequences) -> torch.Tensor:
    """V(state before response token t): the value head at positions P-1 .. P+R-2 -> (B, R), 0 after the end."""
    out = head_outputs(critic, **model_inputs(seq))[..., 0].float()
    return out[:, seq.prompt_len - 1 : -1] * seq.response_mask


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def collect(actor: Any, critic: Any, ref: Reference, reward: Any, prompts: list[Any], batch: dict, tokenizer: Any,
            st: Any, gen_config: Any, micro: int) -> Rollout:  # fmt: skip
    """Sample one response per prompt (left-padded batch {"input_ids", "attention_mask"} (B, P)) and read back the
    old log-probs, reference log-probs, values and scores, micro-batch by micro-batch."""
    t0 = time.perf_counter()
    with eng.gathered_for_generation(actor) as module:
        seq = sample(module, batch, gen_config, tokenizer.eos_token_id, tokenizer.pad_token_id)
    t1 = time.perf_counter()
    responses = tokenizer.batch_decode(seq.response_ids.masked_fill(seq.response_mask == 0, tokenizer.pad_token_id),
                                       skip_special_tokens=True)  # fmt: skip
    actor.eval(), critic.eval()
    tau = st.generation.temperature
    parts: dict[str, list[torch.Tensor]] = {"old": [], "ref": [], "values": []}
    for part in _chunks(len(prompts), micro):
        sub = _full_width(seq, part)
        parts["old"].append(response_logprobs(response_logits(actor, sub), sub, tau))
        parts["ref"].append(ref.logprobs(actor, sub, tau))
        parts["values"].append(critic_values(critic, sub))
    scores = reward.score(prompts, seq, responses).float()
    actor.train(), critic.train()
    t2 = time.perf_counter()
    out = Rollout(seq, prompts, responses, *(torch.cat(parts[k]) for k in ("old", "ref", "values")), scores)
    out.seconds = {"generation": t1 - t0, "scoring": t2 - t1}
    return out


def _full_width(seq: Sequences, part: slice) -> Sequences:
    """Rows `part` at the batch's full width (old log-probs keep the rollout's (B, R) shape)."""
    return Sequences(seq.input_ids[part], seq.attention_mask[part], seq.position_ids[part], seq.response_mask[part],
                     seq.has_eos[part], seq.prompt_len)  # fmt: skip


def shape_scores(ro: Rollout, reward_cfg: Any, stats: tuple[float, float] | None) -> torch.Tensor:
    """Missing-EOS rule, then optional normalisation with (mean, std), then optional clipping -> (B,)."""
    scores = apply_missing_eos(ro.scores, ro.seq.has_eos, reward_cfg.missing_eos_penalty, reward_cfg.missing_eos_score)
    ro.scores = scores
    if stats is not None:
        return normalize_scores(scores, stats[0], stats[1], reward_cfg.clip)
    return clip_scores(scores, reward_cfg.clip)


def advantages(ro: Rollout, st: Any, kl_coef: float, used_scores: torch.Tensor) -> Rollout:
    """KL-in-reward per token, GAE over response tokens, returns before whitening, whitened advantages."""
    mask = ro.mask
    ro.used_scores = used_scores
    ro.kl = kl_penalty(ro.logprobs, ro.ref_logprobs, st.kl_estimator) * mask
    ro.rewards, ro.non_score = per_token_rewards(ro.kl, used_scores, mask, kl_coef)
    rewards = masked_whiten(ro.rewards, mask, shift_mean=False) if st.whiten_rewards else ro.rewards
    adv, ro.returns = gae(rewards, ro.values, mask, st.gamma, st.lam)
    ro.advantages = masked_whiten(adv, mask)
    return ro
