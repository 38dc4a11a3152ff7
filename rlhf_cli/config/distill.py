"""The typed schema of `rlhf distill` (on-policy distillation, docs/algorithms.md section 13) and its cross-key rules,
checked at composition without torch (rlhf_cli/registry.py). The same rules as config/online.py: every field has its
only default here, the tuples list a field's allowed values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf_cli.config.online import GenerationConfig, RewardConfig, RolloutConfig
from rlhf_cli.config.schema import PromptDataConfig, RootConfig, TrainStageConfig
from rlhf_cli.errors import UserError

# sampled: the sampled token's l_s - l_t as a negative per-token advantage (policy gradient); full: the reverse KL
# over the whole vocabulary (or the student's top-k and a tail bucket) at each position, differentiated through the
# student; jsd: GKD's generalised JSD(beta) over the whole vocabulary.
ESTIMATORS = ("sampled", "full", "jsd")
# The estimators that read the teacher's whole distribution at each position (a teacher forward in the update).
FULL_VOCABULARY = ("full", "jsd")


@dataclass
class DistillStageConfig(TrainStageConfig):
    """`rlhf distill`: one step = one iteration: `rollout_batch_size` prompts (all ranks together) x `n_samples`
    responses sampled from the student, the rows dealt evenly over the ranks; the frozen teacher's log-probs of those
    tokens; then `ppo_epochs` passes over the rows in mini-batches of micro_batch_size x gradient_accumulation_steps
    rows per rank (one optimizer step each), minimising the divergence of the student from the teacher."""

    name: str = "distill"
    # The frozen teacher: stage:<name> (this run's), a folder (another run's stage folder or its final/) or a hub id.
    # Its tokenizer must be the student's (refused before any weights load otherwise). Default: this run's PPO policy.
    teacher: str | None = "stage:ppo"
    estimator: str = "sampled"  # sampled | full | jsd
    top_k: int = 0  # estimator=full: the student's k most likely tokens and a tail bucket; 0 = the whole vocabulary
    jsd_beta: float = 0.5  # estimator=jsd: 0 = forward KL(t || s), 1 = reverse KL(s || t)
    # The weight of the divergence to the teacher in the loss; with a reward (stage.reward), the trade-off between
    # the two: A = score advantage - kl_to_teacher_coef x divergence.
    kl_to_teacher_coef: float = 1.0
    rollout_batch_size: int = 32  # prompts per iteration, all ranks together
    n_samples: int = 1  # responses per prompt; >= 2 with a reward (its baseline is the prompt's other samples)
    ppo_epochs: int = 1
    clip_eps_low: float = 0.2  # the policy-gradient terms' ratio clipped to [1 - low, 1 + high]
    clip_eps_high: float = 0.2
    loss_aggregation: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    entropy_coef: float = 0.0
    offload_frozen: bool = False  # the teacher (and a reward model) on the CPU between uses
    eval_sampling: bool = False
    # A gold metric scored on the held-out answers: module:function, or a second reward model.
    gold_reward: str | None = None
    sample_every: int = 10
    sample_rows: int = 4
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # An optional reward mixed with the divergence: none by default (pure distillation).
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(model=None))


@dataclass
class DistillRoot(RootConfig):
    """The composed config of `rlhf distill`."""

    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    stage: DistillStageConfig = field(default_factory=DistillStageConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


def has_reward(st: Any) -> bool:
    """True when `stage.reward` names a reward source (a function, weighted functions or a model) to mix in."""
    r = st.reward
    return bool(r.function or getattr(r, "functions", None) or r.model)


def distill_rows(st: Any, world_size: int) -> int:
    """Rollout rows per rank of an iteration: the critic-free stages' rule (rows dealt evenly, whole mini-batches)."""
    from rlhf_cli.config.batches import critic_free_rows

    return critic_free_rows(st, world_size)


def check_distill(cfg: Any) -> None:
    """The rules across keys of `rlhf distill`, before anything loads."""
    from rlhf_cli.config.functions import check_function_spec, function_specs

    for spec, key in function_specs(cfg.stage):  # reward / gold functions well formed, their modules found
        check_function_spec(spec, key)
    from rlhf_cli.config.batches import planned_world_size

    st = cfg.stage
    if not st.teacher:
        raise UserError(
            "stage.teacher is not set: name the model to distil from, e.g. stage.teacher=stage:ppo (this run's "
            "stage), a folder (another run's stage folder or its final/) or a hub id"
        )
    if st.top_k and st.estimator != "full":
        raise UserError(
            f"stage.top_k={st.top_k} restricts the full-vocabulary reverse KL; it needs stage.estimator=full "
            f"(got {st.estimator}); set stage.top_k=0"
        )
    if has_reward(st) and st.n_samples < 2:
        raise UserError(
            f"a reward (stage.reward) is mixed in: its advantage compares a response with the other samples of its "
            f"prompt, so stage.n_samples must be >= 2 (got {st.n_samples})"
        )
    if has_reward(st) and st.reward.normalize == "rm_stats" and not st.reward.model:
        raise UserError("stage.reward.normalize=rm_stats needs stage.reward.model; use running or none")
    distill_rows(st, planned_world_size(cfg))
