"""Typed schemas of the online stages (ppo, rejection_sampling, and the critic-free grpo / rloo / reinforce_pp):
sampling, the reward source, and each stage's keys. Builds on rlhf_cli/config/schema.py, which does not import it
(the stage registry reads both); the same rules hold: every field has its only default here, the tuples list a
field's allowed values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf_cli.config.schema import DataConfig, PromptDataConfig, RootConfig, TrainStageConfig


@dataclass
class GenerationConfig:
    """Sampling of rollouts. Every log-prob that enters a ratio or a KL uses the same temperature."""

    max_new_tokens: int = 32
    temperature: float = 0.7
    top_k: int = 0  # 0 = off
    top_p: float = 1.0


ROLLOUT_ENGINES = ("hf", "vllm", "auto")
SAMPLER_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none")
VLLM_LORA = ("merged", "adapter")


@dataclass
class RolloutConfig:
    """Which engine generates the responses of the online stages and of `rlhf eval` (docs/rollout-engines.md), and
    how a sampler that is not the trainer is corrected for (docs/algorithms.md section 12)."""

    # hf (transformers in the training process) | vllm (vLLM in the training process, pip install '.[vllm]') |
    # auto (vllm when it is installed and a GPU is visible, else hf). The trainer always recomputes the log-probs
    # it trains on; the engine's own log-probs only measure and correct the mismatch.
    engine: str = "hf"
    # A sampler other than the trainer (vllm, or another precision): each token's loss is weighted by
    # pi_trainer / pi_sampler of the sampled tokens, truncated at `correction_cap` (token_truncate / sequence_truncate)
    # or zeroed above it (token_mask / sequence_mask); sequence_* use the product over the response. none: no weight.
    correction: str = "token_truncate"
    correction_cap: float = 2.0
    # vllm: the share of GPU memory its weights and KV cache may take beside training (on a CPU: its KV cache,
    # `vllm_cpu_kvcache_gb`); its memory is put to sleep while the policy trains (`vllm_sleep`, GPU only).
    vllm_gpu_memory_utilization: float = 0.3
    vllm_cpu_kvcache_gb: float = 1.0
    vllm_sleep: bool = True
    # LoRA policies: `merged` (the adapter merged into a copy of the weights sent to vLLM) or `adapter` (vLLM's LoRA).
    vllm_lora: str = "merged"


REWARD_REDUCES = ("logit", "prob")
REWARD_TEXTS = ("conversation", "response")
REWARD_NORMALIZATIONS = ("none", "rm_stats", "running")


@dataclass
class RewardFunctionConfig:
    """One term of a weighted reward: `fn` is module:function(prompts, responses) -> list[float]."""

    fn: str = ""
    weight: float = 1.0


@dataclass
class RewardConfig:
    """Where the score of a (prompt, response) comes from: a reward model / classifier, or a Python function."""

    # `stage:rm` (this run's reward model), a local folder or hub id of a sequence classifier. Unused with `function`.
    model: str | None = "stage:rm"
    # `module:function(prompts, responses) -> list[float]` (e.g. rlhf_cli.tasks.word_order:gold_reward).
    function: str | None = None
    # A classifier with several labels: which one (index or label name); `logit` or `prob` (softmax / sigmoid).
    label: str | None = None
    reduce: str = "logit"
    # What the model reads: `conversation` (prompt + response, as `rlhf rm` trains) or `response` alone (a classifier
    # of the text itself, e.g. toxicity, which the prompt's own wording must not sway).
    text: str = "conversation"
    # Responses without EOS: `missing_eos_penalty` (>= 0) is subtracted from their score; missing_eos_score, when
    # set, replaces the score (the penalty is then not applied); both apply after normalisation and clipping, in the
    # units of the normalised score.
    missing_eos_penalty: float | None = 1.0
    missing_eos_score: float | None = None
    # none | rm_stats (the reward-model stage's recorded eval mean / std) | running (running mean / std)
    normalize: str = "none"
    clip: float | None = None  # clip the (normalised) score to [-clip, clip]
    # Several weighted functions instead of one: [{fn: module:function, weight: 1.0}, ...]; the score is the
    # weighted sum, and each function's mean is logged (reward/<function>). Wins over `function` and `model`.
    functions: list[RewardFunctionConfig] = field(default_factory=list)


CRITIC_INITS = ("reward", "policy")


@dataclass
class CriticConfig:
    """The value model: a scalar head read at every token."""

    # reward: start from the reward model (InstructGPT); policy: the policy's weights with a fresh value head.
    init: str = "reward"
    # An explicit checkpoint (stage:<name>, folder or hub id) instead of the one `init` names.
    source: str | None = None
    lr: float = 5e-5  # the critic's own optimizer (the rest of `optim` is shared with the actor)


@dataclass
class PtxConfig:
    """InstructGPT's PPO-ptx: add coef * (mean token NLL on pretraining / SFT data) to the policy loss."""

    coef: float = 0.0
    data: DataConfig = field(default_factory=DataConfig)
    micro_batch_size: int = 4


KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CONTROLS = ("fixed", "adaptive")


@dataclass
class PPOStageConfig(TrainStageConfig):
    """One step = one iteration: a rollout batch, then `ppo_epochs` passes over it in mini-batches of
    micro_batch_size x gradient_accumulation_steps sequences per rank (one actor and one critic optimizer step
    each). `max_steps` caps the iterations; else `epochs` passes over the prompts."""

    name: str = "ppo"
    rollout_batch_size: int = 16  # prompts per rank per iteration
    ppo_epochs: int = 4
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    entropy_coef: float = 0.0
    # KL to the reference, in the reward per token: k1 | k2 | k3; fixed or adaptive (Ziegler) coefficient.
    kl_estimator: str = "k1"
    kl_coef: float = 0.05
    kl_control: str = "fixed"
    kl_target: float = 6.0
    kl_horizon: int = 10000
    whiten_rewards: bool = False
    # Stop this iteration's remaining mini-batches when the approximate KL to the rollout policy exceeds this.
    target_kl: float | None = None
    # The frozen reference: None = the policy's starting checkpoint (LoRA: the policy with adapters disabled).
    reference: str | None = None
    # Move the reference and reward models to CPU between uses (frees accelerator memory during training).
    offload_frozen: bool = False
    # Held-out prompts are answered greedily, or (eval_sampling) sampled like the rollouts, seeded by stage and seed.
    eval_sampling: bool = False
    # A gold metric scored on the held-out answers next to the reward (`eval_gold` beside `eval_score`: reward
    # over-optimisation shows as the proxy rising while the gold stalls or falls): module:function, or a second reward
    # model (stage:<name>, a folder or a hub id) read like stage.reward.model.
    gold_reward: str | None = None
    # Every `sample_every` iterations, `sample_rows` prompt/response/score rows go to <stage>/samples.jsonl.
    sample_every: int = 10
    sample_rows: int = 4
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ptx: PtxConfig = field(default_factory=PtxConfig)


SELECTIONS = ("best", "top_k", "threshold")
ROUND_INITS = ("previous", "sft")


@dataclass
class RejectionSamplingStageConfig(TrainStageConfig):
    """Best-of-N rejection sampling (Llama 2), in rounds: sample n_samples responses per prompt from the current
    policy, score them, keep the best (selection), fine-tune on them with the SFT loss. The TrainStageConfig keys
    (epochs, max_steps, micro_batch_size, ...) describe the fine-tuning of ONE round."""

    name: str = "rejection_sampling"
    rounds: int = 1  # sample, select, fine-tune: that many times, each round from the policy of the one before; >= 1
    n_samples: int = 4  # N candidates per prompt, >= 1
    selection: str = "best"  # best | top_k | threshold
    top_k: int = 2  # selection=top_k: the k best valid candidates per prompt, >= 1
    threshold: float | None = None  # selection=threshold: every valid candidate scoring >= threshold (required then)
    keep_previous: bool = False  # round k also trains on the selected samples of rounds 1..k-1 (Llama 2)
    init: str = "previous"  # previous | sft: a round fine-tunes the previous round's policy, or the starting one
    prompts_per_round: int | None = None  # a seeded subset of the training prompts per round; None = all; >= 1
    generation_batch_size: int = 8  # prompts per generate call (x n_samples rows), >= 1
    save_candidates: bool = True  # write every candidate with its score (round-k/candidates.jsonl)
    # A gold metric scored on the held-out answers next to the reward: module:function (e.g.
    # rlhf_cli.tasks.parity:gold_reward), or a second reward model (stage:<name>, a folder or a hub id).
    gold_reward: str | None = None
    # Held-out prompts are answered greedily, or (eval_sampling) sampled like the candidates (as PPO's).
    eval_sampling: bool = False
    # Move the reward model to CPU between uses (as PPO's).
    offload_frozen: bool = False
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


ADVANTAGES = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
# The critic-free estimators (docs/algorithms.md section 8), the one place that says, for each, where the KL to the
# reference goes and which baseline its score is compared with; the update, the rollout's need for old log-probs,
# the estimator and the batch checks read them from here.
# KL: "loss", a k3 term of the policy loss (GRPO); "reward", k1 subtracted from the reward before the advantages
# (RLOO: the sequence's sum; REINFORCE++: per token).
KL_PLACEMENT = {"grpo": "loss", "rloo": "reward", "reinforce_pp": "reward", "reinforce_pp_baseline": "reward"}
# Baseline: "group", the mean of the prompt's samples (GRPO, divided by the std of stage.scale_rewards);
# "leave_one_out", the mean of the prompt's other samples (RLOO); "group_mean", the group's mean, then whitened over
# the batch (REINFORCE++-baseline); "batch", none of its own: whitened over the batch (plain REINFORCE++).
BASELINE = {"grpo": "group", "rloo": "leave_one_out", "reinforce_pp": "batch", "reinforce_pp_baseline": "group_mean"}
GROUPED = tuple(a for a in ADVANTAGES if BASELINE[a] != "batch")  # the estimators that compare a prompt's samples


def kl_in_loss(st: Any) -> bool:
    """True when `st.advantage` puts its KL to the reference in the loss (GRPO), not in the reward."""
    return KL_PLACEMENT[st.advantage] == "loss"


def baseline(st: Any) -> str:
    """The baseline of `st.advantage` (BASELINE)."""
    return BASELINE[st.advantage]


def compares_group(st: Any) -> bool:
    """True when `st.advantage` compares a response with the other samples of its prompt (it needs n_samples >= 2,
    and a group of equal scores carries no signal)."""
    return st.advantage in GROUPED


REWARD_SCALINGS = ("group", "batch", "none")
# How per-token losses become the step's loss (rlhf_cli/losses/critic_free.py AGGREGATIONS).
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
# The policy-gradient surrogate (rlhf_cli/losses/policy_losses.py POLICY_LOSSES; docs/algorithms.md 8.5, 8.9, 8.10).
POLICY_LOSSES = ("clip", "gspo", "cispo")


@dataclass
class CriticFreeStageConfig(TrainStageConfig):
    """`rlhf grpo` / `rlhf rloo` / `rlhf reinforce_pp` (docs/algorithms.md section 8): one step = one iteration:
    `rollout_batch_size` prompts (all ranks together) x `n_samples` responses, the rows dealt evenly over the ranks
    (a prompt's group may straddle two ranks: group statistics are taken over the whole batch); advantages from the
    scores by `advantage`; then `ppo_epochs` passes over the rows in mini-batches of micro_batch_size x
    gradient_accumulation_steps rows per rank (one optimizer step each). No critic."""

    name: str = "grpo"
    advantage: str = "grpo"  # grpo | rloo | reinforce_pp | reinforce_pp_baseline
    rollout_batch_size: int = 16  # prompts per iteration, all ranks together
    n_samples: int = 8  # responses per prompt (GRPO's G, RLOO's k); >= 2 for grpo, rloo, reinforce_pp_baseline
    # 1: one optimizer pass; the ratio is taken against the detached current log-probs (no old-log-prob forward).
    ppo_epochs: int = 1
    # clip: each token's ratio | gspo: each response's ratio, the geometric mean of its tokens' (Zheng et al. 2025)
    # | cispo: each token's ratio as a detached weight on its log-prob, so no token loses its gradient (MiniMax-M1)
    policy_loss: str = "clip"
    # The range [1 - clip_eps_low, 1 + clip_eps_high] of the ratio (clip, gspo) or of the weight (cispo). clip: DAPO
    # clip-higher 0.2 / 0.28. gspo: a mean log-ratio moves far less than one token's, so the GSPO paper uses
    # 3e-4 / 4e-4. cispo: MiniMax-M1 sets no lower bound (clip_eps_low >= 1) and tunes the upper one.
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    # grpo: advantages divided by the group's std | the whole batch's std | nothing (Dr. GRPO)
    scale_rewards: str = "group"
    loss_aggregation: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm (Dr. GRPO)
    # KL to the reference: grpo: a k3 loss term; rloo: the sequence's k1 sum in the reward; reinforce_pp: k1 per
    # token in the reward. 0 = no KL and no reference model loaded.
    kl_coef: float = 0.0
    gamma: float = 1.0  # reinforce_pp: discount of the per-token returns
    entropy_coef: float = 0.0
    mask_truncated: bool = False  # responses without EOS (cut at max_new_tokens) leave the loss (DAPO)
    # DAPO dynamic sampling: groups whose rewards are all equal (no signal) are dropped and more prompts sampled,
    # up to max_sampling_batches generate rounds per iteration; still short, the dropped groups fill the gap.
    dynamic_sampling: bool = False
    max_sampling_batches: int = 3
    reference: str | None = None  # None = the policy's starting checkpoint (LoRA: adapters disabled)
    offload_frozen: bool = False
    eval_sampling: bool = False
    # A gold metric scored on the held-out answers next to the reward: module:function, or a second reward model.
    gold_reward: str | None = None
    sample_every: int = 10
    sample_rows: int = 4
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class PPORoot(RootConfig):
    """The composed config of `rlhf ppo`."""

    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    stage: PPOStageConfig = field(default_factory=PPOStageConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class RejectionSamplingRoot(RootConfig):
    """The composed config of `rlhf rejection_sampling`."""

    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    stage: RejectionSamplingStageConfig = field(default_factory=RejectionSamplingStageConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class CriticFreeRoot(RootConfig):
    """The composed config of `rlhf grpo`, `rlhf rloo` and `rlhf reinforce_pp` (one schema, their own defaults)."""

    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    stage: CriticFreeStageConfig = field(default_factory=CriticFreeStageConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
