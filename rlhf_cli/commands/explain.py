"""`rlhf explain <stage> [overrides]`: the batch algebra and a per-GPU memory estimate of the model states
(parameters, gradients, optimizer states) under the chosen ZeRO stage and offload, without training.

The byte counts of a trained model follow DeepSpeed's own estimators (mixed precision with Adam: 16-bit parameters
and gradients, fp32 gradient partition, fp32 master weights, two fp32 Adam moments), so they agree with
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` (tested). `rlhf explain ppo` has a
row for each of PPO's four models (actor and critic trained, reference and reward model frozen) and prints the
iteration plan from the stage's own functions (stages/plan.py); `rlhf explain rejection_sampling` adds the frozen
reward model and the size of a round's generation; `rlhf explain distill` the frozen teacher (no reference) and the
answers the student samples; `rlhf explain eval` the judge of stage.judge. A gold metric that is a model has a row
of its own. Activations are not included: they depend on the batch and the sequence length. Models are counted from
their configs or built on the meta device: no weights are read or allocated.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from rlhf_cli.commands.model_states import (
    COLUMNS,
    GIB,
    MIB,
    ModelStates,
    Row,
    add_states,
    frozen_row,
    trained_row,
    world_size,
)
from rlhf_cli.errors import UserError


def resolve_model(cfg: Any, name: str, overrides: list[str]) -> Any:
    """The model config (LoRA off) that `name` stands for in this run: `stage:<x>` is that stage's final/ when it
    exists, else the model `rlhf <x>` would start from, given the model.* and run.* overrides (the architecture is
    the same); any other name as it is."""
    from omegaconf import OmegaConf

    if name.startswith("stage:"):
        source = name.split(":", 1)[1]
        final = Path(cfg.run.root) / cfg.run.name / source / "final"
        if not final.is_dir():
            upstream = compose_upstream(source, tuple(upstream_overrides(overrides)))
            return resolve_model(upstream, upstream.model.name_or_path, overrides)
        name = str(final)
    return OmegaConf.merge(cfg.model, {"name_or_path": name, "lora": {"enabled": False}})


@functools.lru_cache
def compose_upstream(stage: str, overrides: tuple[str, ...]) -> Any:
    """An earlier stage's config, composed once: PPO's four models lead back to the same sft and rm configs."""
    from rlhf_cli.config.compose import compose

    return compose(stage, list(overrides))


def upstream_overrides(overrides: list[str]) -> list[str]:
    """The overrides that also hold for an earlier stage: its model's settings and the run, not this stage's keys
    (another stage's schema would refuse them) nor model.name_or_path (this stage's own starting point)."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return [
        o
        for o, k in zip(overrides, keys, strict=True)
        if k.split(".")[0] in ("model", "run") and k != "model.name_or_path"
    ]


def memory_rows(cfg: Any, stage: str, policy: Any, overrides: list[str]) -> list[Row]:
    """The models a stage holds on every GPU: the trained one (for ppo the actor, then critic, reference, reward)."""
    from rlhf_cli.registry import STAGES

    spec = STAGES[stage]
    if stage == "eval":
        return eval_rows(cfg, policy, overrides)
    rows = [trained_row(spec.trained_model, policy, cfg, scalar_head=spec.scalar_head)]
    more = _MORE_ROWS.get(stage)
    return rows + more(cfg, overrides) if more else rows


def ppo_rows(cfg: Any, overrides: list[str]) -> list[Row]:
    """PPO's critic (trained by its own AdamW), frozen reference and reward model, chosen as `rlhf ppo` does
    (stages/ppo.py: build_critic; rollout/online.py: build_reference; rollout/rewards.py: build_reward)."""
    st, policy_name = cfg.stage, cfg.model.name_or_path
    from_rm = st.critic.init == "reward" and st.reward.model and not st.reward.function
    critic = resolve_model(cfg, st.critic.source or (st.reward.model if from_rm else policy_name), overrides)
    rows = [trained_row("critic", critic, cfg, scalar_head=True, note="trained by its own AdamW (stage.critic.lr)")]
    if cfg.model.lora.enabled and not st.reference:
        rows.append(Row("reference", "none: the actor's base weights with its LoRA adapters disabled"))
    else:
        rows.append(frozen_row("reference", resolve_model(cfg, st.reference or policy_name, overrides), cfg))
    return rows + reward_rows(cfg, overrides) + gold_rows(cfg, st.gold_reward, overrides)


def reward_rows(cfg: Any, overrides: list[str]) -> list[Row]:
    """The frozen reward model of an online stage, or none when Python functions score."""
    st = cfg.stage
    functions = [f.fn for f in st.reward.get("functions", [])]
    if functions:
        return [Row("reward", f"none: the functions {', '.join(functions)}")]
    if st.reward.function or not st.reward.model:
        return [Row("reward", f"none: the function {st.reward.function}")]
    return [frozen_row("reward", resolve_model(cfg, st.reward.model, overrides), cfg, scalar_head=True)]


def dpo_rows(cfg: Any, overrides: list[str]) -> list[Row]:
    """DPO's reference, as `rlhf dpo` holds it while training (stages/dpo.py: Reference): none for SimPO / ORPO, none
    when its log-probs were computed before training, the policy itself with LoRA, else a frozen copy."""
    from rlhf_cli.config.schema import DPO_REFERENCE_FREE

    st = cfg.stage
    if st.loss in DPO_REFERENCE_FREE:
        return [Row("reference", f"none: stage.loss={st.loss} reads no reference")]
    if st.precompute_ref:
        return [Row("reference", "none while training: its log-probs computed before (stage.precompute_ref)")]
    if cfg.model.lora.enabled and not st.reference:
        return [Row("reference", "none: the policy's base weights with its LoRA adapters disabled")]
    return [frozen_row("reference", resolve_model(cfg, st.reference or cfg.model.name_or_path, overrides), cfg)]


def critic_free_rows(cfg: Any, overrides: list[str]) -> list[Row]:
    """GRPO / RLOO / REINFORCE++: no critic; a frozen reference only when stage.kl_coef > 0 (stages/critic_free.py)."""
    st = cfg.stage
    if not st.kl_coef:
        rows = [Row("reference", "none: stage.kl_coef=0 (no KL, no reference model loaded)")]
    elif cfg.model.lora.enabled and not st.reference:
        rows = [Row("reference", "none: the policy's base weights with its LoRA adapters disabled")]
    else:
        rows = [frozen_row("reference", resolve_model(cfg, st.reference or cfg.model.name_or_path, overrides), cfg)]
    return rows + reward_rows(cfg, overrides) + gold_rows(cfg, st.gold_reward, overrides)


def distill_model_rows(cfg: Any, overrides: list[str]) -> list[Row]:
    """`rlhf distill`'s models besides the student, as stages/distill.py `distill_parts` loads them: the frozen
    teacher (a causal LM, on the CPU between uses with stage.offload_frozen), no reference (the divergence is to the
    teacher), the reward model only when stage.reward.model mixes one in, a gold model."""
    from rlhf_cli.config.distill import has_reward

    st = cfg.stage
    rows = [
        frozen_row("teacher", resolve_model(cfg, st.teacher, overrides), cfg, note=f"stage.teacher={st.teacher}"),
        Row("reference", "none: the student's divergence is to the teacher; no reference model is loaded"),
    ]
    if has_reward(st):
        rows += reward_rows(cfg, overrides)
    else:
        rows.append(Row("reward", "none: pure distillation (stage.reward sets none)"))
    return rows + gold_rows(cfg, st.gold_reward, overrides)


def eval_rows(cfg: Any, policy: Any, overrides: list[str]) -> list[Row]:
    """`rlhf eval` trains nothing: it holds the reference, one policy at a time (counted with the reference's
    architecture), the judge of stage.judge (a causal LM), the reward model and a gold model (stages/eval.py).
    stage.offload_frozen moves only the reward models: the others are built by frozen_policy, which keeps them."""
    st = cfg.stage
    rows = [frozen_row(name, policy, cfg, offload_frozen=False) for name in ("reference", "policy")]
    if st.judge:
        judge = resolve_model(cfg, st.judge, overrides)
        rows.append(frozen_row("judge", judge, cfg, offload_frozen=False, note=f"stage.judge={st.judge}"))
    return rows + reward_rows(cfg, overrides) + gold_rows(cfg, st.gold, overrides)


def gold_rows(cfg: Any, spec: str | None, overrides: list[str]) -> list[Row]:
    """The gold metric's model when `spec` names one (a second reward model: rollout/rewards.py build_gold); a
    function or none holds no model and adds no row."""
    from rlhf_cli.config.functions import is_model_source

    if not spec or not is_model_source(spec):
        return []
    return [frozen_row("gold", resolve_model(cfg, spec, overrides), cfg, scalar_head=True)]


# Stage -> the models it holds besides the one it trains (rejection sampling: no reference, no critic; sft and rm:
# none).
_MORE_ROWS = {
    "dpo": dpo_rows,
    "ppo": ppo_rows,
    "rejection_sampling": lambda cfg, overrides: (
        reward_rows(cfg, overrides) + gold_rows(cfg, cfg.stage.gold_reward, overrides)
    ),
    "distill": distill_model_rows,
    "grpo": critic_free_rows,
    "rloo": critic_free_rows,
    "reinforce_pp": critic_free_rows,
}


def memory_lines(rows: list[Row], ds: Any) -> list[str]:
    """The table (per GPU, one row per model and the total; MiB below 1 GiB), then what each row is."""
    total = add_states([r.states for r in rows])
    unit, scale = ("GiB", GIB) if max(total.gpu_total, total.cpu) >= GIB else ("MiB", MIB)

    def cells(s: ModelStates) -> str:
        values = (s.params, s.grads, s.optimizer, s.working, s.gpu_total, s.cpu)
        return "".join(f"{v / scale:>{width}.3f}" for v, (_, width) in zip(values, COLUMNS, strict=True))

    lines = [
        f"memory per GPU in {unit}, model states (ZeRO-{ds.zero_stage}, {ds.precision}, offload optimizer "
        f"{ds.offload_optimizer}, offload parameters {ds.offload_param}); activations not included",
        f"  {'model':<14}" + "".join(f"{title:>{width}}" for title, width in COLUMNS),
        *(f"  {r.name:<14}{cells(r.states)}" for r in rows),
        f"  {'total':<14}{cells(total)}",
        f"  = {total.gpu_total / scale:.3f} {unit} per GPU"
        + (f", and {total.cpu / scale:.3f} {unit} per GPU in CPU memory (offloaded)" if total.cpu else ""),
    ]
    return lines + [f"  {r.name}: {r.what}" for r in rows]


def batch_lines(cfg: Any, stage: str, policy: Any) -> list[str]:
    st, world = cfg.stage, world_size(cfg)
    if stage == "eval":
        return [
            "rlhf eval: sampling",
            f"  per generate call at most {st.eval_batch_size} prompts x {st.n_samples} judged answer(s) "
            f"({'greedy' if st.generation.temperature == 0 else f'temperature {st.generation.temperature:g}'}), "
            f"then x {st.kl_samples} samples at temperature 1 for the KL; at most {max_tokens(cfg)} tokens per "
            f"sequence, the held-out prompts shared over {world} rank(s); the reference, then each policy in turn"
            + (f"; the judge ({st.judge}) reads every judged answer" if st.judge else ""),
        ]
    lines = [
        f"rlhf {stage}: batch algebra",
        f"  micro batch {st.micro_batch_size} x accumulation {st.gradient_accumulation_steps} x world size {world} "
        f"({cfg.launcher.nnodes} node(s) x {cfg.launcher.nproc_per_node}) = global batch "
        f"{st.micro_batch_size * st.gradient_accumulation_steps * world} sequences per optimizer step",
        f"  at most {st.micro_batch_size * max_tokens(cfg)} tokens per micro-batch ({max_tokens(cfg)} per sequence)",
    ]
    if stage in ("sft", "rm", "dpo"):
        from rlhf_cli.stages.plan import packing_summary

        lines += packing_summary(cfg.data, st, cfg.model.attn_implementation, 1 if stage == "sft" else 2)
    more = _MORE_LINES.get(stage)
    return lines + more(cfg, policy) if more else lines


def ppo_plan_lines(cfg: Any, policy: Any) -> list[str]:
    """The iteration plan `rlhf ppo` prints, from its own functions and the prompts it would train on."""
    from rlhf_cli.data import build_prompt_datasets
    from rlhf_cli.models.tokenizer import load_tokenizer
    from rlhf_cli.stages.plan import describe_plan, iteration_plan, ppo_updates

    data = build_prompt_datasets(cfg.data, load_tokenizer(policy), seed=cfg.seed)
    plan = iteration_plan(len(data.train), cfg.stage, world_size(cfg))
    updates = ppo_updates(plan, cfg.stage)
    return [f"  {describe_plan(plan, cfg.stage)}", f"  = {updates} optimizer steps of the actor, as many of the critic"]


def rejection_sampling_lines(cfg: Any, policy: Any) -> list[str]:
    """A round's generation (prompts x n_samples) and the most its fine-tuning can train on: every selected sample
    (how many there are, the selection decides once the candidates are scored)."""
    from rlhf_cli.data import build_prompt_datasets
    from rlhf_cli.models.tokenizer import load_tokenizer

    st, world = cfg.stage, world_size(cfg)
    n_train = len(build_prompt_datasets(cfg.data, load_tokenizer(policy), seed=cfg.seed).train)
    prompts = min(st.prompts_per_round or n_train, n_train)
    per_rank = math.ceil(prompts / world)
    per_prompt = {"best": 1, "top_k": min(st.top_k, st.n_samples)}.get(st.selection, st.n_samples)
    batch = st.micro_batch_size * st.gradient_accumulation_steps * world
    steps = math.ceil(st.epochs * math.ceil(prompts * per_prompt / batch))
    lines = [
        f"  generation per round: {prompts} prompts x {st.n_samples} samples = {prompts * st.n_samples} candidates; "
        f"{per_rank} prompts per rank in {math.ceil(per_rank / st.generation_batch_size)} generate call(s) of up to "
        f"{st.generation_batch_size} x {st.n_samples} sequences; {st.rounds} round(s)",
        f"  fine-tuning per round: at most {prompts * per_prompt} selected samples ({st.selection}: at most "
        f"{per_prompt} per prompt) x {st.epochs:g} epoch(s) / global batch {batch} = "
        + (f"{st.max_steps} optimizer steps (stage.max_steps)" if st.max_steps else f"at most {steps} optimizer steps"),
    ]
    if st.keep_previous:
        lines.append("  stage.keep_previous: round k also trains on the selected samples of rounds 1..k-1")
    return lines


def critic_free_lines(cfg: Any, policy: Any) -> list[str]:
    """The iteration plan `rlhf grpo` / `rloo` / `reinforce_pp` prints, from its own functions."""
    from rlhf_cli.data import build_prompt_datasets
    from rlhf_cli.models.tokenizer import load_tokenizer
    from rlhf_cli.stages.plan import critic_free_plan, critic_free_updates, describe_critic_free

    st, world = cfg.stage, world_size(cfg)
    data = build_prompt_datasets(cfg.data, load_tokenizer(policy), seed=cfg.seed)
    plan = critic_free_plan(len(data.train), st, world)
    lines = [
        f"  {describe_critic_free(plan, st, world)}",
        f"  = {critic_free_updates(plan, st, world)} optimizer steps of the policy",
    ]
    if st.advantage == "grpo":
        lines.append(
            f"  GRPO: advantages / {st.scale_rewards} std, loss {st.loss_aggregation}, clip "
            f"[{1 - st.clip_eps_low:g}, {1 + st.clip_eps_high:g}], k3 KL loss x {st.kl_coef:g}"
        )
    return lines


def distill_lines(cfg: Any, policy: Any) -> list[str]:
    """The iteration plan `rlhf distill` follows (stages/distill.py: the critic-free stages' plan, without dynamic
    sampling), the answers the student samples and the teacher reads, and the loss."""
    from rlhf_cli.config.batches import mini_batch
    from rlhf_cli.config.distill import distill_rows, has_reward
    from rlhf_cli.data import build_prompt_datasets
    from rlhf_cli.models.tokenizer import load_tokenizer
    from rlhf_cli.stages.plan import critic_free_plan, critic_free_updates

    st, world = cfg.stage, world_size(cfg)
    data = build_prompt_datasets(cfg.data, load_tokenizer(policy), seed=cfg.seed)
    plan = critic_free_plan(len(data.train), st, world)
    rows, mb, per_iteration = distill_rows(st, world), mini_batch(st), st.rollout_batch_size * st.n_samples
    over = f"the student's top-{st.top_k} and a tail bucket" if st.top_k else "the vocabulary"
    loss = {
        "sampled": "l_s - l_t of each sampled token as a negative per-token advantage",
        "full": f"the reverse KL over {over}, the teacher's logits computed again in the update",
        "jsd": f"GKD's generalised JSD (beta {st.jsd_beta:g}), the teacher's logits computed again in the update",
    }[st.estimator]
    mixed = "the reward's advantage (stage.reward) minus" if has_reward(st) else "no reward (pure distillation):"
    return [
        f"  {plan.n_examples} prompts, {st.rollout_batch_size} per iteration x {st.n_samples} samples = "
        f"{per_iteration} rows ({rows} per rank on {world} rank(s)); {plan.total_steps} iterations of "
        f"{st.ppo_epochs} epoch(s) x {rows // mb} mini-batch(es) of {mb} rows per rank",
        f"  = {plan.total_steps * per_iteration} answers sampled by the student and read by the teacher, "
        f"{critic_free_updates(plan, st, world)} optimizer steps of the student",
        f"  estimator {st.estimator}: {loss}; {mixed} the divergence x {st.kl_to_teacher_coef:g}",
    ]


# Stage -> lines after the batch algebra: the plan of an online stage.
_MORE_LINES = {
    "ppo": ppo_plan_lines,
    "distill": distill_lines,
    "rejection_sampling": rejection_sampling_lines,
    "grpo": critic_free_lines,
    "rloo": critic_free_lines,
    "reinforce_pp": critic_free_lines,
}


def max_tokens(cfg: Any) -> int:
    """Longest sequence of a stage: data.max_length, or (ppo) the longest prompt plus the new tokens."""
    if "max_prompt_length" in cfg.data:
        return cfg.data.max_prompt_length + cfg.stage.generation.max_new_tokens
    return cfg.data.max_length


def policy_model(cfg: Any, overrides: list[str]) -> Any:
    """The model the stage trains, with its LoRA settings (the other models never carry adapters)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(resolve_model(cfg, cfg.model.name_or_path, overrides), {"lora": cfg.model.lora})


def report(cfg: Any, stage: str, overrides: list[str] = ()) -> str:
    from rlhf_cli.config.rollout_engine import engine_lines

    overrides = list(overrides)
    policy = policy_model(cfg, overrides)
    rows = memory_rows(cfg, stage, policy, overrides)
    engine = engine_lines(cfg.rollout) if "rollout" in cfg else []
    return "\n".join([*batch_lines(cfg, stage, policy), "", *memory_lines(rows, cfg.deepspeed), *engine])


def main(args: list[str]) -> int:
    from rlhf_cli.cli import out_console
    from rlhf_cli.config.compose import compose
    from rlhf_cli.registry import STAGES

    if not args or args[0] not in STAGES:
        raise UserError(f"usage: rlhf explain <stage> [key=value ...]; stages: {', '.join(STAGES)}")
    cfg = compose(args[0], args[1:])
    out_console.print(report(cfg, args[0], args[1:]), markup=False)
    return 0
