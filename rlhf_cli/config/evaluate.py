"""Typed schema of `rlhf eval` (stages/eval.py): which policies of the run, against which reference, judged by which
reward and gold metric, on which held-out prompts. Same rules as rlhf_cli/config/schema.py: every field's only
default is here."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_cli.config.online import GenerationConfig, RewardConfig, RolloutConfig
from rlhf_cli.config.schema import PromptDataConfig, RootConfig


@dataclass
class EvalGenerationConfig(GenerationConfig):
    """Decoding of the judged responses (reward, win rate, gold, length, EOS): greedy at temperature 0, as the stages'
    own held-out evaluations decode; above 0, `n_samples` samples per prompt."""

    temperature: float = 0.0


@dataclass
class EvalStageConfig:
    """`rlhf eval`: every policy answers each held-out prompt (`generation`: greedy by default); each answer is scored
    by the reward and the gold metric and compared with the reference's answer to the same prompt (win rate).
    Separately, `kl_samples` samples per prompt at temperature 1 (the policy itself) give a Monte-Carlo estimate of
    KL(policy || reference). The reference is `model.name_or_path` (default: this run's sft), whose tokenizer and
    chat template every policy shares."""

    name: str = "eval"
    # Stages of this run whose final/ is evaluated ([] = every completed policy stage, in the order they ran).
    policies: list[str] = field(default_factory=list)
    # The judge of reward and win rate. The default `stage:rm` is skipped (with a note) when the run has no reward
    # model; any other source must exist.
    reward: RewardConfig = field(default_factory=RewardConfig)
    # A gold metric next to the reward: `module:function(prompts, responses) -> list[float]`, or a second reward model
    # (`stage:<name>`, a folder or hub id). None: none.
    gold: str | None = None
    # A teacher as a judge: a causal LM (`stage:<name>`, a folder or hub id) whose log-likelihood of each answer is
    # reported, per token and per answer (response tokens only, at temperature 1). Its tokenizer must be the
    # policies'. None: none.
    judge: str | None = None
    n_samples: int = 1  # judged responses per prompt and policy (more than 1 needs generation.temperature > 0)
    kl_samples: int = 4  # samples per prompt at temperature 1 for the KL estimate (0: no KL)
    max_prompts: int | None = None  # held-out prompts used (None: all)
    eval_batch_size: int = 32  # prompts per generate call
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)
    offload_frozen: bool = False  # the reward model(s) wait on the CPU between uses


@dataclass
class EvalRoot(RootConfig):
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    stage: EvalStageConfig = field(default_factory=EvalStageConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
