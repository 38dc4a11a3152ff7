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
from rlhf_cli.rollout.generation import (
    Sequences,
    decode_responses,
    model_inputs,
    response_logits,
    response_logprobs,
    sample,
)


@dataclass
class Rollout:
    """Tensors are (B, R) over response tokens unless noted; `scores` (B,) are the reward source's scores as it gave
    them; `used_scores` (B,) after normalisation, clipping and the missing-EOS rule (`shape_scores`)."""

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
        with eng.on_device(self.model, self.device, self.offload) as model:
            return response_logprobs(response_logits(model, seq), seq, temperature)


def unwrap_peft(model: Any) -> Any:
    """The PeftModel inside a DeepSpeed engine."""
    return getattr(model, "module", model)


def critic_values(critic: Any, seq: Sequences) -> torch.Tensor:
    """V(state before response token t): the value head at positions P-1 .. P+R-2 -> (B, R), 0 after the end."""
    out = head_outputs(critic, **model_inputs(seq))[..., 0].float()
    return out[:, seq.prompt_len - 1 : -1] * seq.response_mask


@torch.no_grad()
def collect(actor: Any, critic: Any, ref: Reference, reward: Any, prompts: list[Any], batch: dict, tokenizer: Any,
            st: Any, gen_config: Any) -> Rollout:  # fmt: skip
    """Sample one response per prompt (left-padded batch {"input_ids", "attention_mask"} (B, P)) and read back the
    old log-probs, reference log-probs and values (micro-batch by micro-batch) and the reward source's scores."""
    t0 = time.perf_counter()
    with eng.gathered_for_generation(actor) as module:
        seq = sample(module, batch, gen_config, tokenizer.eos_token_id, tokenizer.pad_token_id)
    t1 = time.perf_counter()
    responses = decode_responses(tokenizer, seq)
    actor.eval(), critic.eval()
    tau = st.generation.temperature
    parts: dict[str, list[torch.Tensor]] = {"old": [], "ref": [], "values": []}
    for start in range(0, len(prompts), st.micro_batch_size):
        sub = seq.rows(slice(start, start + st.micro_batch_size), trim=False)
        parts["old"].append(response_logprobs(response_logits(actor, sub), sub, tau))
        parts["ref"].append(ref.logprobs(actor, sub, tau))
        parts["values"].append(critic_values(critic, sub))
    scores = reward.score(prompts, seq, responses).float()
    actor.train(), critic.train()
    out = Rollout(seq, prompts, responses, *(torch.cat(parts[k]) for k in ("old", "ref", "values")), scores)
    out.seconds = {"generation": t1 - t0, "scoring": time.perf_counter() - t1}
    return out


def shape_scores(scores: torch.Tensor, has_eos: torch.Tensor, reward_cfg: Any,
                 stats: tuple[float, float] | None) -> torch.Tensor:  # fmt: skip
    """The score that enters the reward: optional normalisation with (mean, std), optional clipping, then the
    missing-EOS rule (stage.reward.missing_eos_penalty, or missing_eos_score in its place) in the units of the
    normalised score, as InstructGPT-style setups do: a penalty of 1 is then one standard deviation whatever the
    reward model's scale, and the statistics describe the reward model's own scores. (B,), (B,) bool -> (B,)."""
    shaped = normalize_scores(scores, *stats, reward_cfg.clip) if stats else clip_scores(scores, reward_cfg.clip)
    return apply_missing_eos(shaped, has_eos, reward_cfg.missing_eos_penalty, reward_cfg.missing_eos_score)


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
