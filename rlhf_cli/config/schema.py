"""Typed schemas for every config group and stage.

Hydra composes plain YAML; `rlhf_cli.config.compose.validate` then checks the result against these
dataclasses, so a mistyped key or a wrong type fails before any model is built. Every field has a
default, and these defaults are the only ones: a YAML file under configs/ names only what it changes
(tests/unit/test_config_defaults.py checks it). The tuples next to a field list its allowed values, once:
validation and the stage registry (rlhf_cli/stages/__init__.py) read them, and unit tests compare them with the
code that dispatches on the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunConfig:
    """Where the stage reads and writes: `<root>/<name>/`."""

    # The run's folder name: the stages of one run share <root>/<name>/, each starting from the one before.
    name: str = "demo"
    # The folder that holds the runs.
    root: str = "runs"
    # A completed stage is never overwritten unless this is true.
    overwrite: bool = False


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Merge the adapters into the base weights when writing final/ (a plain HF checkpoint).
    merge: bool = True


@dataclass
class TinyModelConfig:
    """Shape of the built-in randomly initialised Llama used by the default run and the tests."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512


@dataclass
class ModelConfig:
    # A Hugging Face hub id, a local HF folder, `stage:<name>` (that stage's final/ in this run), or
    # `builtin:tiny-llama` (built from `tiny`, random init).
    name_or_path: str = "builtin:tiny-llama"
    # Tokenizer to load; None means the same as name_or_path.
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    # Attention kernel passed to from_pretrained (sdpa, eager, flash_attention_2).
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # Chat template to use when the tokenizer has none (a Jinja string); None means "must have one".
    chat_template: str | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


SFT_FORMATS = ("dolly", "alpaca", "oasst1", "jsonl")
TRUNCATIONS = ("drop", "truncate_response", "truncate_prompt")  # every data group; prompt data: drop | truncate_prompt
BAD_ROWS = ("skip", "fail")


@dataclass
class DataConfig:
    # A hub dataset id, a local .json/.jsonl/.parquet file, or `builtin:<name>` (files shipped in the package).
    source: str = "builtin:sample_dolly"
    # Row format: dolly | alpaca | oasst1 | jsonl (prompt/response or messages).
    format: str = "dolly"
    subset: str | None = None  # hub dataset configuration name
    split: str = "train"
    # Evaluation rows: a split of the same source, or (when None) a seeded held-out fraction of `split`.
    eval_split: str | None = None
    eval_fraction: float = 0.05
    max_samples: int | None = None  # cap on rows read (after the eval split is taken)
    max_length: int = 512  # tokens of prompt + response
    # When prompt + response exceed max_length: `drop` the example, `truncate_response` (keep the whole
    # prompt, cut the response; dropped anyway if fewer than min_response_tokens remain), or `truncate_prompt`
    # (keep the final turns and the whole reply, cut the oldest context of the prompt).
    truncation: str = "drop"
    min_response_tokens: int = 1
    # A malformed row (missing field, wrong type, empty response): `skip` it (counted, reported) or `fail`.
    bad_rows: str = "skip"
    system_prompt: str | None = None
    # OASST1 only: keep threads in these languages (empty list keeps all).
    languages: list[str] = field(default_factory=list)


PREFERENCE_FORMATS = ("hh_rlhf", "shp", "ultrafeedback", "jsonl")


@dataclass
class PreferenceDataConfig:
    """Preference pairs for the reward model and the DPO family: a prompt, a chosen and a rejected reply."""

    # A hub dataset id, a local .json/.jsonl/.parquet file, or `builtin:<name>`.
    source: str = "builtin:sample_preferences"
    # Row format: hh_rlhf | shp | ultrafeedback | jsonl (prompt/chosen/rejected as strings or message lists).
    format: str = "jsonl"
    subset: str | None = None
    split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = 0.1
    max_samples: int | None = None
    max_length: int = 512  # tokens of prompt + the longer reply
    # Too long: `drop` the pair, `truncate_response` (keep the whole prompt, cut both replies; dropped
    # anyway if either keeps fewer than min_response_tokens), or `truncate_prompt` (keep the final turns and both
    # whole replies, cut the oldest context of the prompt).
    truncation: str = "drop"
    min_response_tokens: int = 1
    bad_rows: str = "skip"
    system_prompt: str | None = None
    # Llama 2-style margin: a numeric column, or a column of preference-strength labels mapped to margins.
    margin_column: str | None = None
    strength_column: str | None = None
    margin_map: dict = field(default_factory=dict)
    # SHP only: keep pairs whose score ratio (preferred / other) is at least this (the SHP authors use 2).
    shp_min_score_ratio: float = 2.0


PROMPT_FORMATS = ("jsonl", "dolly", "alpaca", "hh_rlhf", "shp", "ultrafeedback")


@dataclass
class PromptDataConfig:
    """Prompts for the online stages (PPO): the conversation up to the reply the policy writes.

    Formats: jsonl (a `prompt` string or a `messages` list; a final assistant message is dropped) | dolly | alpaca
    (instruction + context/input; the response column is not needed) | hh_rlhf | shp | ultrafeedback (the prompt of
    each pair)."""

    # A hub dataset id, a local .json/.jsonl/.parquet file, or `builtin:<name>`.
    source: str = "builtin:sample_prompts"
    # Row format: jsonl | dolly | alpaca | hh_rlhf | shp | ultrafeedback (the prompt of each pair).
    format: str = "jsonl"
    subset: str | None = None
    split: str = "train"
    # Held-out prompts (evaluated greedily every stage.eval_every iterations): a split, or a seeded fraction.
    eval_split: str | None = None
    eval_fraction: float = 0.1
    max_samples: int | None = None  # cap on training prompts (after the eval split is taken)
    max_prompt_length: int = 256  # tokens after the chat template
    # A longer prompt is dropped (`drop`, counted) or cut from the left (`truncate_prompt`: the oldest context goes,
    # the final turns stay).
    truncation: str = "drop"
    bad_rows: str = "skip"
    system_prompt: str | None = None


SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    """AdamW. These values serve every stage; a stage file sets its own lr (and schedule)."""

    # Peak learning rate, reached after the warmup.
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # cosine | linear | constant (all with linear warmup)
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class DeepSpeedConfig:
    # ZeRO partitions over the ranks: 1 the optimizer states, 2 also the gradients, 3 also the parameters; 0 none.
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    # fp32 | bf16 | fp16
    precision: str = "fp32"
    # Extra keys merged last into the generated DeepSpeed JSON (expert escape hatch).
    extra: dict = field(default_factory=dict)


@dataclass
class LoggingConfig:
    log_every: int = 10  # optimizer steps between metric lines
    tensorboard: bool = False
    # Rich progress bar; off automatically when stdout is not a terminal.
    progress: bool = True


@dataclass
class LauncherConfig:
    """`nproc_per_node` > 1 makes `rlhf` start that many ranks itself (through torchrun). Under an outside
    launcher (torchrun, deepspeed, srun) these keys are ignored."""

    # Processes (one per GPU) on this node.
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


@dataclass
class TrainStageConfig:
    """Keys every training stage has (optimizer steps, batches, evaluation, checkpoints)."""

    name: str = ""
    # Passes over the training data (a fraction is allowed).
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 4  # examples (pairs for rm and dpo) per rank and forward
    gradient_accumulation_steps: int = 1
    eval_every: int = 0  # optimizer steps; 0 = only at the end
    eval_batch_size: int = 8
    save_every: int = 50  # optimizer steps between resume checkpoints; 0 = only at the end
    keep_last: int = 2
    # A completed stage drops its resume checkpoints (final/ stays); true keeps them (e.g. to fine-tune on from there).
    keep_checkpoints: bool = False
    # End the run (after a checkpoint) once this step is reached; the same command then resumes.
    stop_after_steps: int | None = None


@dataclass
class SFTStageConfig(TrainStageConfig):
    name: str = "sft"


@dataclass
class RMStageConfig(TrainStageConfig):
    name: str = "rm"
    # Eisenstein et al. reward centering: adds center_coef * mean((r_chosen + r_rejected)^2).
    center_coef: float | None = None
    # Fail the stage (after training) when held-out pair accuracy is below this.
    min_eval_accuracy: float | None = None


DPO_LOSSES = ("sigmoid", "cdpo", "robust", "hinge", "ipo", "rpo", "simpo", "orpo")


@dataclass
class DPOStageConfig(TrainStageConfig):
    name: str = "dpo"
    # sigmoid (DPO) | cdpo | robust | hinge | ipo | rpo | simpo | orpo (see rlhf_cli/losses/dpo.py)
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # cdpo / robust
    rpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    # The frozen reference: None = the policy's starting checkpoint. Ignored by simpo / orpo.
    reference: str | None = None
    # Compute the reference log-probs in one pass before training, so no reference model is held.
    precompute_ref: bool = False


@dataclass
class GenerationConfig:
    """Sampling of rollouts. Every log-prob that enters a ratio or a KL uses the same temperature."""

    max_new_tokens: int = 32
    temperature: float = 0.7
    top_k: int = 0  # 0 = off
    top_p: float = 1.0


REWARD_REDUCES = ("logit", "prob")
REWARD_NORMALIZATIONS = ("none", "rm_stats", "running")


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
    # Responses without EOS: `missing_eos_penalty` (>= 0) is subtracted from their score; missing_eos_score, when
    # set, replaces the score (the penalty is then not applied); both apply after normalisation and clipping, in the
    # units of the normalised score.
    missing_eos_penalty: float | None = 1.0
    missing_eos_score: float | None = None
    # none | rm_stats (the reward-model stage's recorded eval mean / std) | running (running mean / std)
    normalize: str = "none"
    clip: float | None = None  # clip the (normalised) score to [-clip, clip]


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
    # module:function of a gold metric scored on the held-out answers next to the reward (e.g.
    # rlhf_cli.tasks.parity:gold_reward).
    gold_reward: str | None = None
    # Held-out prompts are answered greedily, or (eval_sampling) sampled like the candidates (as PPO's).
    eval_sampling: bool = False
    # Move the reward model to CPU between uses (as PPO's).
    offload_frozen: bool = False
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class RootConfig:
    """Groups every stage's config has; a stage's root adds `data` and `stage`."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    seed: int = 42


@dataclass
class SFTRoot(RootConfig):
    """The composed config of `rlhf sft`."""

    data: DataConfig = field(default_factory=DataConfig)
    stage: SFTStageConfig = field(default_factory=SFTStageConfig)


@dataclass
class RMRoot(RootConfig):
    """The composed config of `rlhf rm`. `model.name_or_path` may be `stage:<name>` (that stage's final/)."""

    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    stage: RMStageConfig = field(default_factory=RMStageConfig)


@dataclass
class DPORoot(RootConfig):
    """The composed config of `rlhf dpo`."""

    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    stage: DPOStageConfig = field(default_factory=DPOStageConfig)


@dataclass
class PPORoot(RootConfig):
    """The composed config of `rlhf ppo`."""

    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    stage: PPOStageConfig = field(default_factory=PPOStageConfig)


@dataclass
class RejectionSamplingRoot(RootConfig):
    """The composed config of `rlhf rejection_sampling`."""

    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    stage: RejectionSamplingStageConfig = field(default_factory=RejectionSamplingStageConfig)
