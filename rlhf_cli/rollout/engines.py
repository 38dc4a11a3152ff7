"""Rollout engines: one interface for what generates the responses of PPO, GRPO / RLOO / REINFORCE++, rejection
sampling and `rlhf eval` (docs/rollout-engines.md).

An engine's `generate(model, prompts, config)` takes the model as the stage holds it (a DeepSpeed training engine,
a frozen model or a plain module), left-padded prompts {"input_ids", "attention_mask"} (B, P) and the rollout's
`transformers.GenerationConfig` (from `generation.sampling_config`: temperature, top-k / top-p, max new tokens, EOS
and pad ids, nothing else), and returns `Sequences` in the layout of rollout/generation.py, whichever engine ran.

- `hf`: transformers in the training process, on the trainer's own weights (under ZeRO-3 gathered for the call).
  The sampler is the trainer: no correction applies.
- `vllm`: vLLM in the training process (rollout/vllm_engine.py), its weights synced from the trainer whenever the
  trainer's optimizer has stepped since the last sync. It also returns its own log-probs of the sampled tokens
  (`Sequences.sampler_logprobs`), which only measure and correct the mismatch (losses/mismatch.py).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from rlhf_cli import engine as eng
from rlhf_cli.rollout.generation import Sequences, sample


class RolloutEngine(Protocol):
    name: str
    sampler_is_trainer: bool  # True: the sampled tokens come from the trained weights at the trainer's precision

    def generate(self, model: Any, prompts: dict[str, torch.Tensor], config: Any) -> Sequences: ...

    def describe(self) -> str: ...  # the stage's opening line: which engine runs and why


class HFEngine:
    """transformers' decoding on the trainer's weights (rollout/generation.py `sample`)."""

    name = "hf"
    sampler_is_trainer = True

    def __init__(self, reason: str = "rollout.engine=hf"):
        self.reason = reason

    def describe(self) -> str:
        return f"rollout engine: hf ({self.reason})"

    def generate(self, model: Any, prompts: dict[str, torch.Tensor], config: Any) -> Sequences:
        with eng.gathered_for_generation(model) as module:
            return sample(module, prompts, config, config.eos_token_id, config.pad_token_id)


HF = HFEngine()  # the default where no stage config chose one (tools, tests)


def make_engine(rollout_cfg: Any, model_cfg: Any, tokenizer: Any, dist: Any) -> RolloutEngine:
    """The engine `rollout_cfg.engine` asks for (`auto` resolved by config/rollout_engine.py, which also says why).
    `model_cfg` (cfg.model, its source resolved) gives vLLM the architecture it builds; the weights it samples with
    are always the trainer's, synced before the first generation."""
    from rlhf_cli.config.rollout_engine import choose_engine

    name, why = choose_engine(rollout_cfg.engine, torch.cuda.is_available())
    if name == "hf":
        return HFEngine(why)
    from rlhf_cli.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(rollout_cfg, model_cfg, tokenizer, dist, why)
