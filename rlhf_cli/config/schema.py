"""Typed schemas for every config group and stage.

Hydra composes plain YAML; `rlhf_cli.config.compose.validate` then checks the result against these
dataclasses, so a mistyped key or a wrong type fails before any model is built. Every field has a
default, and these defaults are the only ones: a YAML file under configs/ names only what it changes
(tests/unit/test_config_defaults.py checks it). The tuples next to a field list its allowed values, once:
validation and the stage registry (rlhf_cli/registry.py) read them, and unit tests compare them with the
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
    # Start the stage again from scratch: a completed stage is never replaced, nor a stopped one's resume checkpoints
    # dropped, unless this is true. Applies once per command: run again after an interruption, it continues.
    overwrite: bool = False
    # Use an input stage although its own inputs changed since it completed (refused otherwise).
    allow_stale_inputs: bool = False


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


@dataclass
class PackingFields:
    """Padding-free packing of the training steps (SFT, RM, DPO; rlhf_cli/data/packing.py)."""

    # Several examples per row, position ids restarting per example so attention never crosses them: the same loss
    # and gradients, fewer pad tokens. None (the default): on where the model's attention keeps packed examples
    # apart (decoders of the listed families with sdpa, eager or flash attention), off elsewhere; true refuses a
    # model that cannot.
    packing: bool | None = None
    # Tokens (padding included) per packed forward, at least data.max_length (2 x data.max_length for pairs). None:
    # stage.micro_batch_size x the step's longest example (pair), the size of the step's widest padded micro-batch.
    max_tokens_per_batch: int | None = None


@dataclass
class SFTDataConfig(PackingFields, DataConfig):
    """The data of `rlhf sft`: DataConfig and the packing keys."""


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


@dataclass
class PairDataConfig(PackingFields, PreferenceDataConfig):
    """The pairs of `rlhf rm` and `rlhf dpo`: PreferenceDataConfig and the packing keys."""

    # Packed pairs: the prompt computed once for both replies (each reply sees it, never the other reply), the same
    # loss and gradients with fewer tokens. None: on where packing is on and the attention takes an explicit mask
    # (sdpa, eager; no sliding window shorter than data.max_length); true refuses where it cannot.
    share_prompt: bool | None = None


PROMPT_FORMATS = ("jsonl", "dolly", "alpaca", "dialogsum", "hh_rlhf", "shp", "ultrafeedback")


@dataclass
class PromptDataConfig:
    """Prompts for the online stages (PPO): the conversation up to the reply the policy writes.

    Formats: jsonl (a `prompt` string or a `messages` list; a final assistant message is dropped) | dolly | alpaca
    (instruction + context/input; the response column is not needed) | dialogsum (summarise the `dialogue` column) |
    hh_rlhf | shp | ultrafeedback (the prompt of each pair)."""

    # A hub dataset id, a local .json/.jsonl/.parquet file, or `builtin:<name>`.
    source: str = "builtin:sample_prompts"
    # Row format: jsonl | dolly | alpaca | dialogsum | hh_rlhf | shp | ultrafeedback (the prompt of each pair).
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
WANDB_MODES = ("online", "offline")


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
    # Weights & Biases (pip install 'rlhf-cli[wandb]'): every metrics.jsonl row, the resolved config and the run name
    # (<run>/<stage>); its files go to <stage>/wandb/. A resumed stage continues the same W&B run.
    wandb: bool = False
    wandb_project: str = "rlhf"
    wandb_entity: str | None = None
    wandb_mode: str = "online"  # online | offline (sync later with `wandb sync <stage>/wandb/offline-run-*`)
    # Rich progress bar; off automatically when stdout is not a terminal.
    progress: bool = True
    # <stage>/metrics.png, the training curves, drawn when a stage completes (about 0.5 s); `rlhf plot` draws it later.
    plots: bool = True


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
DPO_REFERENCE_FREE = ("simpo", "orpo")  # the losses that read no reference log-probs


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

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    stage: SFTStageConfig = field(default_factory=SFTStageConfig)


@dataclass
class RMRoot(RootConfig):
    """The composed config of `rlhf rm`. `model.name_or_path` may be `stage:<name>` (that stage's final/)."""

    data: PairDataConfig = field(default_factory=PairDataConfig)
    stage: RMStageConfig = field(default_factory=RMStageConfig)


@dataclass
class DPORoot(RootConfig):
    """The composed config of `rlhf dpo`."""

    data: PairDataConfig = field(default_factory=PairDataConfig)
    stage: DPOStageConfig = field(default_factory=DPOStageConfig)
