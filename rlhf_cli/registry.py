"""The stage registry: `STAGES`, one entry per stage, read by the CLI (verbs, `rlhf --help`, dispatch), by composition
and validation (root schema, data formats, allowed choices, numeric ranges), by the run directory's checks
(stage_state.py, provenance.py) and by `rlhf explain`.

Adding a stage: its root schema in config/schema.py, configs/stage/<name>.yaml (only what differs from the schema's
defaults), an entry here, and the module `rlhf_cli.stages.<name>` with `run(cfg, run)` (its set-up, the shared loop
and the end of the stage: rlhf_cli/stages/context.py). Every table of an entry has a default, so a stage without
choices or ranges of its own leaves them out.

Kept light: only the schema dataclasses are imported here (no torch, transformers or DeepSpeed), so `rlhf --help` and a
refused stage answer at once (tests/unit/test_startup.py). It sits in the config layer (scripts/check_layers.py): the
cross-key checks call only config-layer rules (config/batches.py, config/functions.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_cli.config import distill as d
from rlhf_cli.config import online as o
from rlhf_cli.config import schema as s
from rlhf_cli.config.evaluate import EvalRoot
from rlhf_cli.errors import UserError

# A numeric range in the syntax of rlhf_cli/config/compose.py (`> 0`, `>= 1 or null`, `[0, 1)`, `finite`), or
# (range, why) where the message should explain the rule. A choice: the allowed values, or (allowed values, why).
Range = str | tuple[str, str]
Choice = tuple | tuple[tuple, str]


# What every stage reads: the model, its tokenizer and the data (each a source a pipeline may have to run first).
_BASE_INPUTS = ("model.name_or_path", "model.tokenizer", "data.source")


@dataclass(frozen=True)
class StageSpec:
    """One stage: one name everywhere (CLI verb, configs/stage/<name>.yaml, module, run-dir folder)."""

    name: str
    module: str  # the module with `run(cfg, run)`, imported only when the stage runs
    schema: type  # the root dataclass of the composed config
    summary: str  # its line in `rlhf --help`
    example: str  # a command, in `rlhf --help` and `rlhf <stage> --help`
    formats: tuple[str, ...] = ()  # data.format values; () leaves the check to the data adapters
    choices: Mapping[str, Choice] = field(default_factory=dict)  # key -> allowed values, next to the common ones
    ranges: Mapping[str, Range] = field(default_factory=dict)  # key -> range; adds to or overrides the common ones
    # key -> (other key, value): the key must not be null when the other key has that value.
    required_when: Mapping[str, tuple[str, object]] = field(default_factory=dict)
    # Further data groups inside the stage (PPO-ptx's stage.ptx.data): the data.* choices and ranges apply to them too.
    nested_data: tuple[str, ...] = ()
    # A rule across keys, called with the validated config (raises UserError): checked at composition, so a bad
    # combination is refused before anything is loaded, and before a pipeline runs its first stage.
    check: Callable[[Any], None] | None = None
    # The config keys that name what the stage reads (docs/run-directory.md "Provenance"): `stage:<name>` values are the
    # stages it depends on (a pipeline must run them first), and each input is fingerprinted into its provenance.
    inputs: tuple[str, ...] = _BASE_INPUTS
    optional_inputs: tuple[str, ...] = ()  # keys whose `stage:<name>` may be absent (the stage then goes without)
    # A resume under another config is refused, unless the stage checks what its saved work was made with itself
    # (rejection sampling: each round's candidates and selection carry their own settings).
    resume_needs_same_config: bool = True
    trained_model: str = "policy"  # `rlhf explain`: what the model the stage trains is called
    scalar_head: bool = False  # the trained model is a one-label sequence classifier (a reward model)
    # What a completed stage leaves in its folder: the refusal to run it again names it, so it must exist (eval
    # writes eval.json and no final/).
    output: str = "final"
    # How to see a completed stage's result again without computing it (`{run}`: the run's arguments), said in that
    # refusal; "" for none.
    shown_by: str = ""


_ONLINE_INPUTS = (*_BASE_INPUTS, "stage.reference", "stage.reward", "stage.gold_reward")

# Sampling and scoring of generated responses: the same keys, the same ranges in every online stage.
ONLINE_RANGES: dict[str, Range] = {
    "stage.generation.max_new_tokens": ">= 1",
    "stage.generation.top_k": ">= 0",
    "stage.generation.top_p": "(0, 1]",
    "stage.reward.missing_eos_penalty": ">= 0 or null",
    "stage.reward.missing_eos_score": "finite or null",
    "stage.reward.clip": "> 0 or null",
    "rollout.correction_cap": (
        "> 1",
        "a cap at or under 1 would scale down or drop tokens the sampler and the trainer agree on",
    ),
    "rollout.vllm_gpu_memory_utilization": "(0, 1)",
    "rollout.vllm_cpu_kvcache_gb": "> 0",
}
ONLINE_CHOICES: dict[str, Choice] = {
    "rollout.engine": o.ROLLOUT_ENGINES,
    "rollout.correction": o.SAMPLER_CORRECTIONS,
    "rollout.vllm_lora": o.VLLM_LORA,
    "stage.reward.reduce": o.REWARD_REDUCES,
    "stage.reward.text": o.REWARD_TEXTS,
    "stage.reward.normalize": o.REWARD_NORMALIZATIONS,
}

# Packed training (SFT, RM, DPO): a forward must hold the longest example (for pairs the stage also checks 2x).
_PACKING_RANGES: dict[str, Range] = {
    "data.max_tokens_per_batch": (">= data.max_length or null", "a packed forward must hold the longest example"),
}

# PPO's rollouts are its training data: the log-probs of the ratio and the KL are those of softmax(logits / T).
_ON_POLICY = (
    "training rollouts must sample from the distribution whose log-probs enter the ratio and the KL, "
    "softmax(logits / temperature); top-k / top-p sampling would make PPO silently off-policy"
)
# Training rollouts of PPO and the critic-free stages: the ratio and the KL read softmax(logits / T) itself.
_ON_POLICY_SAMPLING: dict[str, Range] = {
    "stage.generation.temperature": ("> 0", _ON_POLICY),
    "stage.generation.top_k": ("== 0", _ON_POLICY),
    "stage.generation.top_p": ("== 1", _ON_POLICY),
    "stage.sample_every": ">= 0",
    "stage.sample_rows": ">= 0",
}
_PPO_RANGES: dict[str, Range] = {
    **ONLINE_RANGES,
    "stage.rollout_batch_size": ">= 1",
    "stage.ppo_epochs": ">= 1",
    "stage.clip_eps": "> 0",
    "stage.value_clip_eps": "> 0",
    "stage.vf_coef": ">= 0",
    "stage.gamma": "[0, 1]",
    "stage.lam": "[0, 1]",
    "stage.entropy_coef": ">= 0",
    "stage.kl_coef": ">= 0",
    "stage.kl_target": "> 0",
    "stage.kl_horizon": ">= 1",
    "stage.target_kl": "> 0 or null",
    "stage.critic.lr": "> 0",
    "stage.ptx.coef": ">= 0",
    "stage.ptx.micro_batch_size": ">= 1",
    **_ON_POLICY_SAMPLING,
}
_RS_RANGES: dict[str, Range] = {
    **ONLINE_RANGES,
    "stage.rounds": ">= 1",
    "stage.n_samples": ">= 1",
    "stage.top_k": ">= 1",
    "stage.threshold": "finite or null",
    "stage.prompts_per_round": ">= 1 or null",
    "stage.generation_batch_size": ">= 1",
    "stage.generation.temperature": ("> 0", "N samples at temperature 0 are one greedy answer N times"),
}
# Selection compares scores of candidates drawn in different generate calls (and with stage.threshold): a running
# mean / std moves between those calls, so the same answer would score differently.
_RS_NORMALIZE = (
    tuple(n for n in o.REWARD_NORMALIZATIONS if n != "running"),
    "a running normalisation moves between the generate calls of a round, so the candidates it selects from (and "
    "stage.threshold) would be scored on different scales; use rm_stats (the reward model's recorded mean / std) "
    "or none",
)

# GRPO / RLOO / REINFORCE++: the same keys and rules under three verbs (their defaults differ).
_CRITIC_FREE_RANGES: dict[str, Range] = {
    **ONLINE_RANGES,
    "stage.rollout_batch_size": ">= 1",
    "stage.n_samples": ">= 1",
    "stage.ppo_epochs": ">= 1",
    "stage.clip_eps_low": "> 0",
    "stage.clip_eps_high": "> 0",
    "stage.kl_coef": ">= 0",
    "stage.gamma": "[0, 1]",
    "stage.entropy_coef": ">= 0",
    "stage.max_sampling_batches": ">= 1",
    **_ON_POLICY_SAMPLING,
}
_CRITIC_FREE_CHOICES: dict[str, Choice] = {
    "stage.advantage": o.ADVANTAGES,
    "stage.scale_rewards": o.REWARD_SCALINGS,
    "stage.loss_aggregation": o.LOSS_AGGREGATIONS,
    "stage.policy_loss": o.POLICY_LOSSES,
    **ONLINE_CHOICES,
}


def _functions_check(cfg: Any) -> None:
    """The reward and gold functions an online stage names: well formed and their modules found, before any model."""
    from rlhf_cli.config.functions import check_function_spec, function_specs

    for spec, key in function_specs(cfg.stage):
        check_function_spec(spec, key)


def _ppo_check(cfg: Any) -> None:
    from rlhf_cli.config.batches import check_ppo_batches

    check_ppo_batches(cfg.stage)
    _functions_check(cfg)


def _critic_free_check(cfg: Any) -> None:
    from rlhf_cli.config.batches import check_groups, critic_free_rows, planned_world_size

    check_groups(cfg.stage)
    critic_free_rows(cfg.stage, planned_world_size(cfg))
    _functions_check(cfg)


def _rejection_sampling_check(cfg: Any) -> None:
    """Each round after the first samples from the previous round's exported policy, which must be a whole model."""
    lora = cfg.model.lora
    if lora.enabled and not lora.merge and cfg.stage.rounds > 1:
        raise UserError(
            "model.lora.merge=false with stage.rounds > 1: each round samples from the previous round's exported "
            "policy, which must be a whole model; set model.lora.merge=true or stage.rounds=1"
        )
    _functions_check(cfg)


def _eval_check(cfg: Any) -> None:
    st = cfg.stage
    if st.n_samples > 1 and st.generation.temperature == 0:
        raise UserError(
            f"stage.n_samples={st.n_samples} needs stage.generation.temperature > 0: greedy decoding gives "
            "one answer per prompt"
        )
    _functions_check(cfg)


def _critic_free(name: str, summary: str, example: str) -> StageSpec:
    return StageSpec(
        name,
        "rlhf_cli.stages.critic_free",
        o.CriticFreeRoot,
        summary=summary,
        example=example,
        formats=s.PROMPT_FORMATS,
        choices=_CRITIC_FREE_CHOICES,
        ranges=_CRITIC_FREE_RANGES,
        check=_critic_free_check,
        inputs=_ONLINE_INPUTS,
    )


STAGES: dict[str, StageSpec] = {
    "sft": StageSpec(
        "sft",
        "rlhf_cli.stages.sft",
        s.SFTRoot,
        summary="supervised fine-tuning (default: tiny built-in demo)",
        example="rlhf sft +experiment=dolly optim.lr=2e-5",
        formats=s.SFT_FORMATS,
        ranges=_PACKING_RANGES,
    ),
    "rm": StageSpec(
        "rm",
        "rlhf_cli.stages.rm",
        s.RMRoot,
        summary="reward model on preference pairs, from this run's sft",
        example="rlhf rm +experiment=hh_rlhf",
        formats=s.PREFERENCE_FORMATS,
        ranges={**_PACKING_RANGES, "stage.center_coef": ">= 0 or null", "stage.min_eval_accuracy": "[0, 1] or null"},
        trained_model="reward model",
        scalar_head=True,
    ),
    "dpo": StageSpec(
        "dpo",
        "rlhf_cli.stages.dpo",
        s.DPORoot,
        summary="DPO family on preference pairs, from this run's sft",
        example="rlhf dpo stage.loss=ipo stage.beta=0.5",
        formats=s.PREFERENCE_FORMATS,
        choices={"stage.loss": s.DPO_LOSSES},
        inputs=(*_BASE_INPUTS, "stage.reference"),
        ranges={
            **_PACKING_RANGES,
            "stage.beta": "> 0",
            "stage.label_smoothing": "[0, 0.5)",
            "stage.rpo_alpha": ">= 0",
            "stage.simpo_gamma": ">= 0",
            "stage.orpo_lambda": ">= 0",
        },
    ),
    "ppo": StageSpec(
        "ppo",
        "rlhf_cli.stages.ppo",
        o.PPORoot,
        summary="PPO with a critic: policy from sft, reward + critic from rm",
        example="rlhf ppo stage.kl_coef=0.1",
        formats=s.PROMPT_FORMATS,
        choices={
            "stage.kl_estimator": o.KL_ESTIMATORS,
            "stage.kl_control": o.KL_CONTROLS,
            **ONLINE_CHOICES,
            "stage.critic.init": o.CRITIC_INITS,
            "stage.ptx.data.format": s.SFT_FORMATS,
        },
        ranges=_PPO_RANGES,
        check=_ppo_check,
        nested_data=("stage.ptx.data",),
        inputs=(*_ONLINE_INPUTS, "stage.critic.source", "stage.ptx.data.source"),
        trained_model="actor",
    ),
    "rejection_sampling": StageSpec(
        "rejection_sampling",
        "rlhf_cli.stages.rejection_sampling",
        o.RejectionSamplingRoot,
        summary="best-of-N rejection sampling in rounds, from sft; reward from rm",
        example="rlhf rejection_sampling stage.n_samples=8 stage.rounds=2",
        formats=s.PROMPT_FORMATS,
        choices={
            "stage.selection": o.SELECTIONS,
            "stage.init": o.ROUND_INITS,
            **ONLINE_CHOICES,
            "stage.reward.normalize": _RS_NORMALIZE,
        },
        ranges=_RS_RANGES,
        required_when={"stage.threshold": ("stage.selection", "threshold")},
        check=_rejection_sampling_check,
        inputs=_ONLINE_INPUTS,
        resume_needs_same_config=False,
    ),
    "grpo": _critic_free(
        "grpo",
        "GRPO (group-relative, no critic; Dr. GRPO / DAPO options), from sft",
        "rlhf grpo +experiment=grpo_parity stage.n_samples=8",
    ),
    "rloo": _critic_free(
        "rloo",
        "RLOO (leave-one-out baseline, no critic), from sft",
        "rlhf rloo +experiment=grpo_parity stage.advantage=rloo",
    ),
    "reinforce_pp": _critic_free(
        "reinforce_pp",
        "REINFORCE++ (global whitening, no critic), from sft",
        "rlhf reinforce_pp stage.advantage=reinforce_pp_baseline",
    ),
    # The critic-free stages' sampling and batch rules; a teacher (an input) instead of a reference.
    "distill": StageSpec(
        "distill",
        "rlhf_cli.stages.distill",
        d.DistillRoot,
        summary="on-policy distillation: the student samples, a frozen teacher scores (reverse KL / GKD)",
        example="rlhf distill stage.teacher=stage:ppo stage.estimator=full",
        formats=s.PROMPT_FORMATS,
        choices={
            "stage.estimator": d.ESTIMATORS,
            "stage.loss_aggregation": o.LOSS_AGGREGATIONS,
            **ONLINE_CHOICES,
        },
        ranges={
            **ONLINE_RANGES,
            "stage.rollout_batch_size": ">= 1",
            "stage.n_samples": ">= 1",
            "stage.ppo_epochs": ">= 1",
            "stage.clip_eps_low": "> 0",
            "stage.clip_eps_high": "> 0",
            "stage.entropy_coef": ">= 0",
            "stage.top_k": ">= 0",
            "stage.jsd_beta": "[0, 1]",
            "stage.kl_to_teacher_coef": "> 0",
            **_ON_POLICY_SAMPLING,
        },
        check=d.check_distill,
        inputs=(*_BASE_INPUTS, "stage.teacher", "stage.reward", "stage.gold_reward"),
        trained_model="student",
    ),
    "eval": StageSpec(
        "eval",
        "rlhf_cli.stages.eval",
        EvalRoot,
        summary="held-out comparison of the run's policies with sft: reward, win rate, KL, gold",
        example="rlhf eval stage.policies=[sft,ppo,dpo] stage.n_samples=4",
        formats=s.PROMPT_FORMATS,
        choices=ONLINE_CHOICES,
        ranges={
            **ONLINE_RANGES,
            "stage.n_samples": ">= 1",
            "stage.kl_samples": ">= 0",
            "stage.max_prompts": ">= 1 or null",
            "stage.eval_batch_size": ">= 1",
            "stage.generation.temperature": ">= 0",
        },
        check=_eval_check,
        inputs=(*_BASE_INPUTS, "stage.policies", "stage.reward", "stage.gold", "stage.judge"),
        optional_inputs=("stage.reward.model",),  # no reward model in the run: no reward and no win rate
        trained_model="reference policy (nothing is trained)",
        output="eval.json",
        shown_by="`rlhf runs {run}` prints its table again",
    ),
}


def completed_refusal(stage: str, run_root: Path, stale: str = "") -> str:
    """Why `stage` does not run again in the run `run_root`: it is complete. Names its output (which exists), the
    command that shows its result again when there is one, and how to replace it. `stale`: `; it is stale: ...`."""
    spec = STAGES.get(stage)
    output, shown_by = (spec.output, spec.shown_by) if spec else ("final", "")
    run = f"run.name={run_root.name}" + (f" run.root={run_root.parent}" if run_root.parent != Path("runs") else "")
    again = f"; {shown_by.format(run=run)}" if shown_by else ""
    redo = "train it again" if output == "final" else "run it again"
    return (
        f"stage `{stage}` of run `{run_root.name}` is already complete ({run_root / stage / output}){stale}"
        f"{again}; add run.overwrite=true to {redo} (replacing it), or choose another run.name"
    )
