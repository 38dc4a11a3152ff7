"""`rlhf ppo`: PPO with a critic on plain DeepSpeed (ALGORITHMS.md sections 4 and 5).

One step of the stage is one iteration: sample a response per prompt (left-padded prompts, stop at EOS), read back
the rollout policy's and the reference's log-probs at the sampling temperature, the critic's values and the scores;
put the KL to the reference into the per-token reward; GAE; then `ppo_epochs` passes over the batch in shuffled
mini-batches (one actor and one critic optimizer step each, gradient accumulation over micro-batches). The losses
are token means over the mini-batch on all ranks. Dropout is off in all four models; the reference and the reward
model run in eval mode without gradients.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rlhf_cli import checkpoints as ckpt
from rlhf_cli import engine as eng
from rlhf_cli.config.compose import config_hash, to_yaml
from rlhf_cli.data import build_prompt_datasets, collate_prompts
from rlhf_cli.errors import UserError
from rlhf_cli.losses.ppo import RunningMoments, kl_controller
from rlhf_cli.metrics import Metrics
from rlhf_cli.models import disable_dropout, enable_gradient_checkpointing, is_builtin, load_causal_lm, load_tokenizer
from rlhf_cli.models.reward import REWARD_STATS_FILE, load_reward_model, pools_last_token
from rlhf_cli.rollout.experience import Reference, advantages, collect, shape_scores
from rlhf_cli.rollout.generation import decode_responses, sample, sampling_config
from rlhf_cli.rollout.rewards import build_reward, same_tokenizer
from rlhf_cli.run_dir import Run
from rlhf_cli.stages.common import eval_batches, finish, interrupted, policy_engine, train_loop
from rlhf_cli.stages.plan import describe_plan, iteration_plan, ppo_updates
from rlhf_cli.stages.ppo_update import PtxData, ppo_update, rollout_metrics

SHOW = ("score_mean", "kl", "policy_loss", "value_loss", "lr", "tok/s", "eval_score")


def run(cfg: Any, run: Run) -> Path | None:
    """Train the policy and export `<run>/ppo/final/` (and the critic in `<run>/ppo/critic/`)."""
    st = cfg.stage
    # 1. Distributed group, seeds, the policy's starting checkpoint.
    dist = eng.init_distributed()
    torch.manual_seed(cfg.seed)
    source = run.resolve_source(cfg.model.name_or_path)
    model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": source})

    # 2. Tokenizer, prompts, the iteration plan, optional ptx data; the recorded reward statistics (rm_stats).
    rm_stats = reward_stats(st, run)
    tokenizer = load_tokenizer(model_cfg)
    data = build_prompt_datasets(cfg.data, tokenizer, seed=cfg.seed)
    plan = iteration_plan(len(data.train), st, dist.world_size)
    updates = ppo_updates(plan, st)
    ptx = PtxData(st, tokenizer, cfg.seed, dist) if st.ptx.coef > 0 else None

    # 3. Actor and critic in DeepSpeed engines; frozen reference and reward source.
    actor = policy_engine(cfg, model_cfg, tokenizer, updates, dist.world_size)
    critic, critic_source = build_critic(cfg, run, source, tokenizer, updates, dist)
    ref, ref_source = build_reference(cfg, run, source, tokenizer, dist)
    reward = build_reward(st, run, cfg.deepspeed, tokenizer, dist)
    kl_ctl = kl_controller(st.kl_control, st.kl_coef, st.kl_target, st.kl_horizon)
    moments = RunningMoments()

    # 4. Resume (actor, critic, optimizers, schedulers, KL controller, running stats); record the stage.
    resume, client, notes = ckpt.resume_latest({"actor": actor, "critic": critic}, run.checkpoints_dir)
    start_step = 0
    if client:
        start_step = client["step"]
        kl_ctl.load_state_dict(client["kl_controller"])
        moments.load_state_dict(client["running_moments"])
    inputs = {"policy": source, "reference": ref.describe(ref_source), "critic": critic_source,
              "reward": reward.describe(), "data": cfg.data.source}  # fmt: skip
    started = run.begin(to_yaml(cfg), config_hash(cfg), inputs, resume)
    metrics = Metrics(run.metrics_path, plan.total_steps, cfg.logging, dist.is_main, start_step)
    sources = (f"{k}: {v}" for k, v in inputs.items())
    for line in (started, *notes, data.report.summary(), describe_plan(plan, st), *sources):
        metrics.message(line)

    # 5. Train: an evaluation of the starting policy, then the iterations.
    gen_config = sampling_config(st.generation, tokenizer.eos_token_id, tokenizer.pad_token_id)

    def one_iteration(step: int) -> dict[str, float]:
        idx = plan.rank_indices(step, dist.rank, cfg.seed)
        prompts = [data.train[i] for i in idx]
        batch = {k: v.to(dist.device) for k, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
        # Sampling is seeded by (seed, iteration, rank): a resumed run draws what an uninterrupted one would.
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.rank)
        ro = collect(actor, critic, ref, reward, prompts, batch, tokenizer, st, gen_config)
        stats = score_stats(st, ro.scores, moments, rm_stats)
        ro = advantages(ro, st, kl_ctl.value, shape_scores(ro.scores, ro.seq.has_eos, st.reward, stats))
        out = {**rollout_metrics(ro), "kl_coef": kl_ctl.value}
        t0 = time.perf_counter()
        out.update(ppo_update(actor, critic, ro, st, step, cfg.seed, ptx))
        out.update(timing(ro, time.perf_counter() - t0, out))
        kl_ctl.update(out["kl"], int(out["rollout_sequences"]))
        if st.sample_every and (step + 1) % st.sample_every == 0 and dist.is_main:
            write_samples(run.stage_dir / "samples.jsonl", step + 1, ro, st.sample_rows)
        return out

    def run_eval() -> dict[str, float]:
        return evaluate(actor, reward, data.eval, tokenizer, st, dist, cfg.seed)

    def save(step: int) -> None:
        client = {"step": step, "kl_controller": kl_ctl.state_dict(), "running_moments": moments.state_dict()}
        ckpt.save_checkpoint({"actor": actor, "critic": critic}, run.checkpoints_dir, step, client, st.keep_last)

    if start_step == 0 and data.eval:
        metrics.log(0, run_eval(), SHOW)
    last = train_loop(st, actor, plan, dist, run, metrics, start_step, one_iteration, run_eval, SHOW, save=save)
    if interrupted(last, plan, metrics, run):
        return None

    # 6. Final evaluation, export of the policy (final/) and the critic (critic/), headline metrics.
    def export() -> None:
        eng.export_hf(actor, tokenizer, run.final_dir, merge_lora=cfg.model.lora.enabled and cfg.model.lora.merge)
        eng.export_hf(critic, tokenizer, run.stage_dir / "critic", merge_lora=False)

    finish(run, metrics, last, run_eval(), SHOW, export, st, outputs={"critic": f"{run.stage}/critic"},
           extra={"iterations": plan.total_steps, "kl_coef": kl_ctl.value, "data": data.report.to_dict()})  # fmt: skip
    return run.final_dir


def build_critic(cfg: Any, run: Run, policy_source: str, tokenizer: Any, updates: int, dist: Any) -> tuple[Any, str]:
    """The value model: the reward model's weights (InstructGPT) or the policy's with a fresh scalar head, read at
    every token; its own AdamW (lr stage.critic.lr) in its own engine. With a reward function there is no reward
    model to start from, so `init=reward` falls back to the policy."""
    st = cfg.stage
    from_rm = st.critic.init == "reward" and st.reward.model and not st.reward.function
    source = run.resolve_source(st.critic.source or (st.reward.model if from_rm else policy_source))
    critic_cfg = OmegaConf.merge(cfg.model, {"name_or_path": source, "lora": {"enabled": False}})
    check_critic_tokenizer(critic_cfg, tokenizer)
    critic = load_reward_model(critic_cfg, source, tokenizer, seed=cfg.seed)
    if not pools_last_token(critic):
        raise UserError(f"critic {source}: a critic needs a decoder (a value at every token); encoders such as BERT "
                        "cannot be one. Set stage.critic.init=policy or stage.critic.source")  # fmt: skip
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(critic)
    optim = OmegaConf.merge(cfg.optim, {"lr": st.critic.lr})
    ds_cfg = eng.ds_config(cfg.deepspeed, optim, st.micro_batch_size, st.gradient_accumulation_steps,
                           dist.world_size)  # fmt: skip
    return eng.initialize(critic, ds_cfg, optim, updates), source


def check_critic_tokenizer(critic_cfg: Any, tokenizer: Any) -> None:
    """The critic reads the policy's token ids, so it must share the policy's tokenizer."""
    if is_builtin(critic_cfg.name_or_path):
        return
    if not same_tokenizer(load_tokenizer(critic_cfg), tokenizer):
        raise UserError(f"critic {critic_cfg.name_or_path} has another tokenizer than the policy; a critic reads the "
                        "policy's token ids. Set stage.critic.init=policy, or stage.critic.source to a model with "
                        "the policy's tokenizer")  # fmt: skip


def build_reference(cfg: Any, run: Run, source: str, tokenizer: Any, dist: Any) -> tuple[Reference, str]:
    st = cfg.stage
    if cfg.model.lora.enabled and not st.reference:
        return Reference(None, False, dist.device), source  # the actor's own base weights: no second copy
    ref_source = run.resolve_source(st.reference) if st.reference else source
    model = load_causal_lm(OmegaConf.merge(cfg.model, {"name_or_path": ref_source}), tokenizer, seed=cfg.seed)
    disable_dropout(model)
    home = torch.device("cpu") if st.offload_frozen else dist.device
    return Reference(eng.frozen(model, cfg.deepspeed, st.micro_batch_size, home), st.offload_frozen,
                     dist.device), ref_source  # fmt: skip


def reward_stats(st: Any, run: Run) -> tuple[float, float] | None:
    """(mean, std) of the reward model actually used, for stage.reward.normalize=rm_stats: the `reward_stats.json`
    that `rlhf rm` writes next to its weights (for this run's `stage:rm`, also its manifest record, as older runs
    have no file). Refused, before any model is loaded, where no statistics describe the scores that get normalised:
    a reward function, `reduce=prob`, another label, or a model without the file."""
    r = st.reward
    if r.normalize != "rm_stats":
        return None
    fix, file = "; use stage.reward.normalize=running (or none)", REWARD_STATS_FILE
    if r.function or not r.model:
        raise UserError(f"stage.reward.normalize=rm_stats needs a reward model trained by `rlhf rm`, whose recorded "
                        f"eval mean / std it uses; the reward here is the function {r.function}{fix}")  # fmt: skip
    if r.reduce != "logit" or r.label not in (None, "0", 0):
        raise UserError(f"stage.reward.normalize=rm_stats: the recorded mean / std are of the reward model's logit "
                        f"(label 0), not of reduce={r.reduce} label={r.label} (stage.reward){fix}")  # fmt: skip
    folder = Path(run.resolve_source(r.model))
    stats_file = folder / REWARD_STATS_FILE
    if stats_file.is_file():
        recorded = json.loads(stats_file.read_text())
    elif r.model == "stage:rm":
        recorded = run.stage_record("rm").get("metrics", {})
    else:
        recorded = {}
    if "reward_mean" not in recorded or "reward_std" not in recorded:
        raise UserError(f"stage.reward.normalize=rm_stats needs the reward mean / std that `rlhf rm` records from its "
                        f"eval split ({file} next to the weights), and {r.model} has none{fix}")  # fmt: skip
    return float(recorded["reward_mean"]), float(recorded["reward_std"])


def score_stats(st: Any, scores: torch.Tensor, moments: RunningMoments, rm_stats: tuple | None) -> tuple | None:
    """The (mean, std) to normalise this batch's scores (B,) with; `running` first adds every rank's scores."""
    if st.reward.normalize == "rm_stats":
        return rm_stats
    if st.reward.normalize != "running":
        return None
    moments.update(eng.all_gather_cat(scores.detach().double().cpu()))
    return moments.mean, moments.std


def timing(ro: Any, train_seconds: float, out: dict) -> dict[str, float]:
    """Seconds in generation, scoring (old/ref log-probs, values, reward) and training, and their throughputs."""
    gen, scoring = ro.seconds["generation"], ro.seconds["scoring"]
    total = gen + scoring + train_seconds
    return {"generation_seconds": gen, "scoring_seconds": scoring, "update_seconds": train_seconds,
            "generation_share": gen / total, "scoring_share": scoring / total, "update_share": train_seconds / total,
            "gen_tok/s": out["generated_tokens"] / max(gen, 1e-9),
            "train_tok/s": out["tokens"] / max(train_seconds, 1e-9)}  # fmt: skip


def write_samples(path: Path, iteration: int, ro: Any, n: int) -> None:
    with open(path, "a") as fh:
        for i in range(min(n, len(ro.prompts))):
            row = {"iteration": iteration, "prompt": ro.prompts[i].text, "response": ro.responses[i],
                   "score": float(ro.scores[i]), "ended_with_eos": bool(ro.seq.has_eos[i])}  # fmt: skip
            fh.write(json.dumps(row) + "\n")


@torch.no_grad()
def evaluate(actor: Any, reward: Any, examples: list, tokenizer: Any, st: Any, dist: Any, seed: int) -> dict:
    """Greedy (or seeded sampled) responses to all held-out prompts, scored by the reward source: mean score,
    length, EOS fraction. Sharded by `eval_batches`: every rank generates and scores the same batches (ZeRO-3
    collectives in the gathering and the reward model's forwards line up); filler prompts are left out of the sums."""
    if not examples:
        return {}
    config = sampling_config(st.generation, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             greedy=not st.eval_sampling)  # fmt: skip
    rng = torch.get_rng_state()
    torch.manual_seed(seed + dist.rank)  # the same draws at every evaluation: scores differ only by the policy
    sums = torch.zeros(4, dtype=torch.float64)  # prompts, score, response tokens, EOS
    for part in eval_batches(len(examples), st.eval_batch_size, dist.rank, dist.world_size):
        prompts = [examples[i] for i in part.idx]
        batch = {k: v.to(dist.device) for k, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
        with eng.gathered_for_generation(actor) as module:
            seq = sample(module, batch, config, tokenizer.eos_token_id, tokenizer.pad_token_id)
        scores = reward.score(prompts, seq, decode_responses(tokenizer, seq))
        per_prompt = torch.stack(  # (4, B), rows as in `sums`
            [part.weight, scores.double().cpu(), seq.response_mask.sum(-1).double().cpu(), seq.has_eos.double().cpu()]
        )
        sums += per_prompt[:, part.real].sum(dim=1)
    torch.set_rng_state(rng)
    n, score, length, eos = eng.all_reduce_sum(sums).tolist()
    return {"eval_score": score / n, "eval_response_length": length / n, "eval_eos_fraction": eos / n}
