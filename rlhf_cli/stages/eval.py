"""`rlhf eval`: did alignment work? Every policy of the run against the reference (SFT) policy on held-out prompts.

Each policy samples `stage.n_samples` responses per held-out prompt (temperature `stage.generation.temperature`,
1 by default, so the samples come from the policy itself). Per response: the reward (the run's reward model, or
functions), a win against the reference's response to the same prompt and sample index under that reward (ties
count half), the sequence KL log pi(y|x) - log pi_ref(y|x) (its mean over the policy's own samples is a Monte-Carlo
estimate of KL(pi || pi_ref), reported with its standard error), the length, EOS, and the gold metric when one is
given; with `stage.judge` (a teacher), the judge's log-likelihood of the response, per token and in all. The
reference is evaluated the same way with draws of its own, so its win rate is 0.5 up to sampling error and its KL
exactly 0: the check that the comparison is fair. Writes `<run>/eval/eval.json` and the headline numbers into the
manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf

from rlhf_cli import engine as eng
from rlhf_cli.config.compose import config_hash, to_yaml
from rlhf_cli.data import build_prompt_datasets, collate_prompts
from rlhf_cli.data.sharding import eval_batches
from rlhf_cli.errors import UserError
from rlhf_cli.files import atomic_write_text
from rlhf_cli.losses.critic_free import sequence_k1
from rlhf_cli.metrics import console
from rlhf_cli.models import load_tokenizer
from rlhf_cli.models.kind import CAUSAL_LM, check_policy, check_reward_sources, inspect_checkpoint
from rlhf_cli.registry import STAGES
from rlhf_cli.rollout.comparison import COLUMNS, moment_sums, summarise, table, win_values
from rlhf_cli.rollout.evaluation import JUDGE_QUANTITIES, gold_values, judge_summary, judge_sums, judge_values
from rlhf_cli.rollout.experience import expand
from rlhf_cli.rollout.generation import decode_responses, response_logits, response_logprobs, sampling_config
from rlhf_cli.rollout.rewards import build_gold, build_reward, same_tokenizer
from rlhf_cli.rollout.scoring import score_responses
from rlhf_cli.run_dir import Run
from rlhf_cli.stages.common import frozen_policy
from rlhf_cli.stages.context import StageContext, stage_context
from rlhf_cli.summary import complete_stage

REFERENCE = "reference"


def run(cfg: Any, run: Run) -> Path:
    """Evaluate the policies and write `<run>/eval/eval.json`; returns its path."""
    st = cfg.stage
    # 1. Distributed group, seed, the reference (checked before anything loads) and its tokenizer, the policies, the
    #    held-out prompts.
    ctx = stage_context(cfg, run, model_config=reference_config, check=lambda ref: check_models(cfg, run, ref))
    policies = policy_paths(run, st.policies)
    judge_path = judge_source(cfg, run, ctx.tokenizer)  # its tokenizer checked before any weights load
    prompts = held_out_prompts(cfg, ctx.tokenizer)

    # 2. The judges: the reward (absent when the run has no reward model and none was named), the gold metric and
    #    the teacher whose log-likelihood of each answer is reported (stage.judge).
    reward, notes = judge(cfg, run, ctx.tokenizer, ctx.dist)
    gold = build_gold(st.gold, st, run, cfg.deepspeed, ctx.tokenizer, ctx.dist, key="stage.gold")
    teacher = frozen_policy(ctx, OmegaConf.merge(ctx.model_cfg, {"name_or_path": judge_path})) if judge_path else None
    judging = Judging(ctx, prompts, reward, gold, teacher)
    inputs = {"reference": ctx.source, **policies, **({"judge": judge_path} if judge_path else {})}
    run.begin(to_yaml(cfg), config_hash(cfg), inputs, None)
    for line in (ctx.rollout.describe(), *notes):
        _say(ctx.dist, line)

    # 3. The reference: its own samples and scores, which every policy's responses are compared with.
    reference = frozen_policy(ctx, ctx.model_cfg)
    ref_scores, ref_row = evaluate(reference, reference, judging, None, draw=0)
    rows = {REFERENCE: ref_row}

    # 4. Each policy: its samples, their reward, win against the reference's, KL to the reference, gold.
    for k, (name, path) in enumerate(policies.items(), start=1):
        policy = frozen_policy(ctx, OmegaConf.merge(ctx.model_cfg, {"name_or_path": path}))
        rows[name] = evaluate(policy, reference, judging, ref_scores, draw=k)[1]
        del policy

    # 5. eval.json, the headline numbers in the manifest, the table.
    return write_results(judging, policies, rows)


@dataclass(frozen=True)
class Judging:
    """What every evaluated policy is judged with: the stage's context, the held-out prompts, the reward (None: no
    reward and no win rate), the gold metric (None: none) and the teacher judging by its log-likelihood (None:
    none)."""

    ctx: StageContext
    prompts: list
    reward: Any | None
    gold: Any | None
    teacher: Any | None = None


def reference_config(cfg: Any, run: Run) -> Any:
    """cfg.model reading from the reference (model.name_or_path, resolved), without LoRA: every model here is whole."""
    return OmegaConf.merge(
        cfg.model, {"name_or_path": run.resolve_source(cfg.model.name_or_path), "lora": {"enabled": False}}
    )


def write_results(j: Judging, policies: dict[str, str], rows: dict[str, dict[str, float]]) -> Path:
    """eval.json (rank 0), the headline numbers in the manifest, the table on the console; the stage completed."""
    run, st = j.ctx.run, j.ctx.st
    out = {
        "reference": j.ctx.source,
        "policies": {**policies},
        "prompts": len(j.prompts),
        "n_samples": st.n_samples,
        "temperature": st.generation.temperature,
        "kl_samples": st.kl_samples,
        "reward": j.reward.describe() if j.reward else None,
        "gold": st.gold,
        "judge": st.judge,
        "results": rows,
    }
    path = run.stage_dir / STAGES["eval"].output  # eval.json: the registry's name, which a refusal of a rerun names
    if j.ctx.dist.is_main:
        atomic_write_text(path, json.dumps(out, indent=2) + "\n")
        run.update_stage(outputs={"eval": str(path.relative_to(run.root))}, metrics=headline(rows))
        console.print("\n".join(table(rows)), markup=False, highlight=False)
    complete_stage(run, keep_checkpoints=True)
    return path


def policy_paths(run: Run, names: list[str]) -> dict[str, str]:
    """stage name -> final/ of each policy to evaluate: `names`, or every completed stage of the run whose final/ is
    a causal LM, in the order the stages ran."""
    if names:
        paths = {name: run.resolve_source(f"stage:{name}") for name in names}
        for name, path in paths.items():  # a reward model would load with a random LM head and babble
            check_policy(path, f"stage.policies: stage `{name}`")
        return paths
    stages = run.read_manifest()["stages"]  # sorted by name: order by the time each ended
    found = {}
    for name, record in sorted(stages.items(), key=lambda item: item[1].get("ended_at") or ""):
        final = run.root / name / "final"
        kind = inspect_checkpoint(str(final))[1] if final.is_dir() and record.get("status") == "completed" else None
        if kind is not None and kind.kind == CAUSAL_LM:
            found[name] = str(final)
    if not found:
        raise UserError(
            f"run `{run.root.name}` has no completed policy stage to evaluate; run `rlhf sft "
            f"run.name={run.root.name}` first, or name them with stage.policies=[...]"
        )
    return found


def held_out_prompts(cfg: Any, tokenizer: Any) -> list:
    """The held-out prompts of `data` (the same split the online stages evaluate on with the same seed)."""
    prompts = build_prompt_datasets(cfg.data, tokenizer, seed=cfg.seed).eval
    if not prompts:
        raise UserError(
            f"data `{cfg.data.source}` leaves no held-out prompt; set data.eval_fraction above 0 or data.eval_split"
        )
    return prompts[: cfg.stage.max_prompts] if cfg.stage.max_prompts else prompts


def check_models(cfg: Any, run: Run, ref_path: str) -> None:
    """Before any model loads: the reference is a policy (a causal LM), the reward and gold models are classifiers
    with a trained head (the policies are checked by `policy_paths`)."""
    check_policy(ref_path, f"model.name_or_path={cfg.model.name_or_path}", "the reference policy")
    check_reward_sources(cfg.stage, run, gold_key="stage.gold", reward=not no_reward_model(cfg, run))


def judge_source(cfg: Any, run: Run, tokenizer: Any) -> str | None:
    """The teacher of `stage.judge`, resolved (None without one), refused before any weights load when it is a
    sequence classifier or its tokenizer is not the policies' `tokenizer` (it reads their token ids as they are)."""
    name = cfg.stage.judge
    if not name:
        return None
    path = run.resolve_source(name)
    check_policy(path, f"stage.judge={name}", "the judge")
    judge_cfg = OmegaConf.merge(cfg.model, {"name_or_path": path, "tokenizer": None, "lora": {"enabled": False}})
    if not same_tokenizer(load_tokenizer(judge_cfg), tokenizer):
        policies = cfg.model.tokenizer or run.resolve_source(cfg.model.name_or_path)
        raise UserError(
            f"stage.judge={name}: its tokenizer ({path}) is not the policies' ({policies}): vocabulary, EOS or "
            "chat template differ, and the judge reads the policies' token ids as they are; name a judge with the "
            "policies' tokenizer"
        )
    return path


def no_reward_model(cfg: Any, run: Run) -> bool:
    """True for the default reward `stage:rm` when the run has no completed reward model (a DPO-only run)."""
    r = cfg.stage.reward
    default = not (r.functions or r.function) and r.model == "stage:rm"
    return default and run.stage_record("rm").get("status") != "completed"


def judge(cfg: Any, run: Run, tokenizer: Any, dist: Any) -> tuple[Any | None, list[str]]:
    """The reward source of `stage.reward`, or None (with a note) for the default `stage:rm` when the run has no
    completed reward model (a DPO-only run): then no reward and no win rate."""
    if no_reward_model(cfg, run):
        return None, [
            "no reward model in this run (stage rm): reward and win rate are left out; name one with "
            "stage.reward.model=<folder> or stage.reward.function=module:function"
        ]
    return build_reward(cfg.stage, run, cfg.deepspeed, tokenizer, dist), []


@torch.no_grad()
def evaluate(
    policy: Any, reference: Any, j: Judging, ref_scores: torch.Tensor | None, draw: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """(this rank's reward scores of the judged responses (rows of its batches in order), the summary over all ranks)
    of `policy`. `draw` seeds the sampling (the reference's own draws are 0: a policy that is the reference samples
    afresh). `ref_scores`: the reference's scores of the same rows, for the win rate. Collective."""
    st, dist, prompts = j.ctx.st, j.ctx.dist, j.prompts
    sums, scores, done = torch.zeros(6, 3, dtype=torch.float64), [], 0
    teacher_sums = torch.zeros(len(JUDGE_QUANTITIES), 3, dtype=torch.float64)
    with torch.random.fork_rng(devices=[dist.device] if dist.device.type == "cuda" else []):
        torch.manual_seed(1_000_003 * draw + dist.rank)
        for part in eval_batches(len(prompts), st.eval_batch_size, dist.rank, dist.world_size):
            examples = [prompts[i] for i in part.idx]
            values = judged_values(policy, examples, j)
            if ref_scores is not None and "reward" in values:  # the reference's answers to the same rows
                values["win"] = win_values(values["reward"], ref_scores[done : done + len(values["reward"])])
            if "reward" in values:
                scores.append(values["reward"])
            done += len(values["length"])
            weight = part.weight.repeat_interleave(st.n_samples)
            sums += moment_sums(values, weight)
            if j.teacher is not None:
                teacher_sums += judge_sums(values, weight)
            if st.kl_samples:
                kl = {"kl": sampled_kl(policy, reference, examples, j.ctx)}
                sums += moment_sums(kl, part.weight.repeat_interleave(st.kl_samples))
    total = eng.all_reduce_sum(torch.cat([sums, teacher_sums]))  # one collective for both
    summary = summarise(total[: len(sums)])
    if j.teacher is not None:
        summary.update(judge_summary(total[len(sums) :]))
    return (torch.cat(scores) if scores else torch.zeros(0)), summary


def _generate(model: Any, rows: list, config: Any, ctx: StageContext) -> Any:
    """`model`'s answers to the prompt `rows` with the stage's rollout engine (the same layout whichever runs)."""
    batch = {k: v.to(ctx.dist.device) for k, v in collate_prompts(rows, ctx.tokenizer.pad_token_id).items()}
    return ctx.rollout.generate(model, batch, config)


def judged_values(policy: Any, examples: list, j: Judging) -> dict[str, torch.Tensor]:
    """Per judged response ((B * n_samples,) each): length, EOS, reward and gold (when there is one), the teacher's
    log-likelihood (`judge_logp_token`, `judge_logp_seq`, when there is one)."""
    tokenizer, reward, gold, st = j.ctx.tokenizer, j.reward, j.gold, j.ctx.st
    rows, _ = expand(examples, st.n_samples)
    seq = _generate(policy, rows, sampling_config(st.generation, tokenizer.eos_token_id, tokenizer.pad_token_id), j.ctx)
    texts = decode_responses(tokenizer, seq)
    values = {"length": seq.response_mask.sum(1), "eos": seq.has_eos.double()}
    if reward is not None:
        values["reward"] = score_responses(reward, rows, seq, texts, None, allow_invalid=True).raw.cpu()
    if gold is not None:
        values["gold"] = gold_values(gold, rows, seq, texts)
    if j.teacher is not None:
        values.update(judge_values(j.teacher, seq))
    return values


def sampled_kl(policy: Any, reference: Any, examples: list, ctx: StageContext) -> torch.Tensor:
    """log pi(y|x) - log pi_ref(y|x) of `st.kl_samples` samples y ~ pi(.|x) per prompt at temperature 1, without
    top-k / top-p (so y comes from the policy itself): (B * kl_samples,); its mean estimates KL(pi || pi_ref)."""
    tokenizer, st = ctx.tokenizer, ctx.st
    plain = SimpleNamespace(max_new_tokens=st.generation.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0)
    rows, _ = expand(examples, st.kl_samples)
    seq = _generate(policy, rows, sampling_config(plain, tokenizer.eos_token_id, tokenizer.pad_token_id), ctx)
    logp = response_logprobs(response_logits(policy, seq), seq, 1.0)
    ref_logp = logp if policy is reference else response_logprobs(response_logits(reference, seq), seq, 1.0)
    return sequence_k1(logp, ref_logp, seq.response_mask)


def headline(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """Manifest metrics: `<policy>/<quantity>` for the table's columns (the judge's among them)."""
    keys = [key for key, _ in COLUMNS]
    return {f"{name}/{key}": row[key] for name, row in rows.items() for key in keys if key in row}


def _say(dist: Any, line: str) -> None:
    if dist.is_main:
        console.print(line, markup=False, highlight=False)
