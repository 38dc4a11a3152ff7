"""The update, the teacher statistics, the evaluation and the tokenizer check of `rlhf distill` (stages/distill.py;
docs/algorithms.md section 13).

Loss normalisation as the critic-free stages (docs/algorithms.md 1.7, 8.6): each micro-batch's weighted sum goes to
`engine.backward` with the mini-batch's global count (valid tokens for token_mean, rows for the per-sequence modes),
so neither the split into micro-batches nor the number of ranks changes the step.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.config.distill import FULL_VOCABULARY
from rlhf_cli.data import collate_prompts
from rlhf_cli.data.sharding import eval_batches
from rlhf_cli.errors import UserError
from rlhf_cli.losses.critic_free import aggregation_count, aggregation_weights, clipped_surrogate, group_advantages
from rlhf_cli.losses.distill import (
    answer_agreement,
    distill_advantages,
    full_reverse_kl,
    generalized_jsd,
    greedy_agreement,
    sampled_reverse_kl,
)
from rlhf_cli.losses.ppo import entropy_from_logits, masked_sum
from rlhf_cli.metrics import Sums
from rlhf_cli.rollout.critic_free import gather_rows
from rlhf_cli.rollout.engines import HF
from rlhf_cli.rollout.evaluation import PolicyEval, evaluate_policy, gold_values
from rlhf_cli.rollout.experience import Rollout
from rlhf_cli.rollout.generation import decode_responses, response_logits, response_logprobs, sampling_config
from rlhf_cli.rollout.update import ACTOR_SUMS, Objective, actor_step

# This rank's sums of a full-vocabulary step: the divergence, the reward's surrogate, the entropy, the tokens where
# the two models' argmax agree, all forwarded tokens, valid response tokens.
DIVERGENCE_SUMS = ("divergence", "policy_loss", "entropy", "token_agreement", "tokens", "valid")


def update(
    actor: Any, teacher: Any, ro: Rollout, seq_adv: torch.Tensor | None, st: Any, iteration: int, seed: int
) -> dict[str, float]:
    """`st.ppo_epochs` passes over this rank's rows in shuffled mini-batches of micro_batch_size x
    gradient_accumulation_steps rows, one optimizer step each. `ro.ref_logprobs` holds the teacher's log-probs of the
    sampled tokens; `seq_adv` (B,) the score advantages when a reward is mixed in, else None. The ratio of the
    policy-gradient terms is against the rollout's log-probs after the first optimizer step, else 1. Returns token
    means over all ranks, the optimizer steps and the last gradient norm."""
    n, mask = len(ro.prompts), ro.mask
    mini = st.micro_batch_size * st.gradient_accumulation_steps
    n_mini = n // mini
    weights = aggregation_weights(mask, st.loss_aggregation, st.generation.max_new_tokens)
    objective = Objective(st.clip_eps_low, st.clip_eps_high, weights, 0.0, st.ppo_epochs > 1 or n_mini > 1)
    full = st.estimator in FULL_VOCABULARY
    if full:  # the divergence is the loss; the reward (when any) enters by its advantage alone
        advantages = mask * (seq_adv.to(mask)[:, None] if seq_adv is not None else 0.0)
    else:
        k = sampled_reverse_kl(ro.logprobs, ro.ref_logprobs, mask)
        advantages = distill_advantages(k, mask, st.kl_to_teacher_coef, seq_adv)
    names = DIVERGENCE_SUMS if full else ACTOR_SUMS
    sums = dict.fromkeys(names, 0.0)
    gen = torch.Generator().manual_seed(seed * 7919 + iteration)  # same shuffles after a resume
    norm = None
    for step in range(st.ppo_epochs * n_mini):
        m = step % n_mini
        if m == 0:
            perm = torch.randperm(n, generator=gen)  # a new shuffle every epoch
        idx = perm[m * mini : (m + 1) * mini]
        normaliser = max(float(eng.all_reduce_sum(aggregation_count(mask[idx], st.loss_aggregation))), 1.0)
        if full:
            local, norm = divergence_step(actor, teacher, ro, advantages, idx, st, normaliser, objective)
        else:
            local, norm = actor_step(actor, ro, advantages, idx, st, normaliser, objective=objective)
        for key, value in local.all_reduced().items():
            sums[key] += value
    valid = max(sums["valid"], 1.0)
    out = {"policy_loss": sums["policy_loss"] / valid, "entropy": sums["entropy"] / valid}
    if full:
        out["divergence"] = sums["divergence"] / valid
        out["token_agreement"] = sums["token_agreement"] / valid
        out["loss"] = st.kl_to_teacher_coef * out["divergence"] + out["policy_loss"]
    else:
        out.update({k: sums[k] / valid for k in ("clipfrac_low", "clipfrac_high", "approx_kl")})
        out["loss"] = out["policy_loss"]
    return {**out, "tokens": sums["tokens"], "optimizer_steps": st.ppo_epochs * n_mini, "grad_norm": norm}


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, st: Any) -> torch.Tensor:
    """The per-token divergence of `st.estimator` (full: reverse KL, with `st.top_k`; jsd: JSD(`st.jsd_beta`)) at
    the sampling temperature: logits (C, W, V) -> (C, W). Logits wider than the other model's (a vocabulary padded
    to another multiple) are cut to the shared width: ids past the tokenizer are never sampled."""
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s, t, tau = student_logits[..., :width], teacher_logits[..., :width], st.generation.temperature
    if st.estimator == "jsd":
        return generalized_jsd(s, t, mask, st.jsd_beta, tau)
    return full_reverse_kl(s, t, mask, tau, st.top_k)


def divergence_step(
    actor: Any,
    teacher: Any,
    ro: Rollout,
    advantages: torch.Tensor,
    idx: torch.Tensor,
    st: Any,
    n_tokens: float,
    objective: Objective,
) -> tuple[Sums, float | None]:
    """One optimizer step of the full-vocabulary estimators on the rollout rows `idx` (M,), in micro-batches of
    `st.micro_batch_size`: per token, kl_to_teacher_coef x the divergence (the teacher's logits from a forward
    without gradients), plus the clipped surrogate of `advantages` (B, R) (the reward's; 0 without one), scaled by
    the sampler's importance weights when the sampler is not the trainer, minus the entropy bonus; weighted by the
    aggregation's weights and divided by `n_tokens`. Returns (this rank's sums, named DIVERGENCE_SUMS, the norm)."""
    tau = st.generation.temperature
    sums = Sums(*DIVERGENCE_SUMS)
    norm = None
    for chunk in idx.split(st.micro_batch_size):
        sub = ro.seq.rows(chunk)
        mask, width = sub.response_mask, sub.response_mask.shape[1]
        teacher_logits = teacher.logits(sub)
        logits = response_logits(actor, sub)
        div = divergence(logits, teacher_logits, mask, st)
        logprobs = response_logprobs(logits, sub, tau)
        old = ro.logprobs[chunk, :width] if objective.old_from_rollout else logprobs.detach()
        pg, _, _ = clipped_surrogate(logprobs, old, advantages[chunk, :width], objective.clip_low, objective.clip_high)
        if ro.is_weights is not None:  # the sampler's importance weights scale the policy-gradient term only
            pg = pg * ro.is_weights[chunk, :width]
        entropy = entropy_from_logits(logits / tau if st.entropy_coef else logits.detach() / tau)
        per_token = st.kl_to_teacher_coef * div + pg - st.entropy_coef * entropy
        eng.backward(actor, (per_token * objective.weights[chunk, :width]).sum(), n_tokens)
        norm = eng.step(actor)  # DeepSpeed applies it at the last micro-batch (the accumulation boundary)
        sums.add(
            divergence=masked_sum(div.detach(), mask),
            policy_loss=masked_sum(pg.detach(), mask),
            entropy=masked_sum(entropy.detach(), mask),
            token_agreement=masked_sum(greedy_agreement(logits, teacher_logits, mask), mask),
            tokens=sub.attention_mask.sum(),
            valid=mask.sum(),
        )
    return sums, norm


@torch.no_grad()
def teacher_sums(ro: Rollout) -> dict[str, float]:
    """The sampled-token estimate of the reverse KL to the teacher per token (a token mean over all ranks), the
    teacher's own log-prob per token, as `kl_teacher_token` and `teacher_logprob`."""
    k = sampled_reverse_kl(ro.logprobs, ro.ref_logprobs, ro.mask)
    local = torch.stack([k.sum(), masked_sum(ro.ref_logprobs, ro.mask), ro.mask.sum()]).double().cpu()
    kl, lt, tokens = eng.all_reduce_sum(local).tolist()
    return {"kl_teacher_token": kl / max(tokens, 1.0), "teacher_logprob": lt / max(tokens, 1.0)}


@torch.no_grad()
def score_advantages(ro: Rollout, st: Any, offset: int) -> tuple[torch.Tensor, float]:
    """The mixed-in reward's advantage of each of this rank's rows (global rows [offset, offset + B)): its shaped
    score minus the mean of its prompt's valid scores, over the whole gathered group (Dr. GRPO's, no scaling: the
    scale stays the reward's, against kl_to_teacher_coef); 0 for a response that could not be scored. -> ((B,), the
    mean over every row)."""
    scores = gather_rows(ro.scores.shaped)
    adv, _ = group_advantages(scores, st.n_samples, "none")
    adv = torch.nan_to_num(adv, nan=0.0)
    return adv[offset : offset + len(ro.prompts)].to(ro.mask), float(adv.mean())


class Evaluation:
    """The stage's held-out evaluation (a Loop's `evaluate`): the student's answers scored by the reward (when one is
    mixed in) and the gold metric, and its agreement with the teacher's greedy answers: `eval_teacher_agreement`,
    the share of prompts whose greedy answer is the teacher's, token for token, and `eval_teacher_token_agreement`,
    the share of the teacher's answer tokens that are the student's argmax. The teacher's answers are made once (the
    teacher is frozen), with its own gold metric in `teacher_metrics`."""

    def __init__(self, ctx: Any, parts: Any):
        self.ctx, self.p = ctx, parts
        self.answers: list[tuple[Any, torch.Tensor]] | None = None
        self.teacher_metrics: dict[str, float] = {}

    def __call__(self) -> dict[str, float]:
        ctx, p = self.ctx, self.p
        if not p.data.eval:
            return {}
        how = PolicyEval.of_stage(ctx, gold=p.gold, allow_invalid=True)
        out = evaluate_policy(p.actor, p.reward, p.data.eval, how)
        if not p.scored:
            out.pop("eval_score", None)
            out.pop("eval_invalid_fraction", None)
        first = self.answers is None
        if first:
            self.answers, self.teacher_metrics = teacher_answers(ctx, p, how)
        out.update(agreement(p.actor, self.answers))
        return {**out, **(self.teacher_metrics if first else {})}


@torch.no_grad()
def teacher_answers(ctx: Any, p: Any, how: PolicyEval) -> tuple[list[tuple[Any, torch.Tensor]], dict[str, float]]:
    """The teacher's greedy answers to this rank's share of the held-out prompts ((Sequences, weight (B,)) per eval
    batch; filler rows weigh 0, `data.sharding.eval_batches`), and its own `teacher_eval_gold` (with a gold metric)
    and `teacher_eval_response_length` over all ranks. Collective."""
    tok, dist, examples = ctx.tokenizer, ctx.dist, p.data.eval
    config = sampling_config(ctx.st.generation, tok.eos_token_id, tok.pad_token_id, greedy=True)
    answers, sums = [], Sums("prompts", "gold", "length")
    for part in eval_batches(len(examples), how.batch_size, dist.rank, dist.world_size):
        prompts = [examples[i] for i in part.idx]
        batch = {k: v.to(dist.device) for k, v in collate_prompts(prompts, tok.pad_token_id).items()}
        with eng.on_device(p.teacher.model, p.teacher.device, p.teacher.offload) as model:
            seq = HF.generate(model, batch, config)  # the teacher's own weights, whatever samples the student
        texts = decode_responses(tok, seq)
        gold = gold_values(p.gold, prompts, seq, texts) if p.gold is not None else torch.zeros(len(prompts))
        sums.add_columns({"prompts": part.weight, "gold": gold, "length": seq.response_mask.sum(-1)}, keep=part.real)
        answers.append((seq, part.weight))
    total = sums.all_reduced()
    out = {"teacher_eval_response_length": total["length"] / max(total["prompts"], 1.0)}
    if p.gold is not None:
        out["teacher_eval_gold"] = total["gold"] / max(total["prompts"], 1.0)
    return answers, out


@torch.no_grad()
def agreement(actor: Any, answers: list[tuple[Any, torch.Tensor]]) -> dict[str, float]:
    """How often the student's greedy decoding would give the teacher's answers (losses/distill.py
    `answer_agreement`): one forward of the student over each stored answer, no generation. Collective."""
    was_training = actor.training
    actor.eval()
    sums = Sums("prompts", "agree", "tokens", "token_agree")
    for seq, weight in answers:
        logits = response_logits(actor, seq)
        mask, ids = seq.response_mask, seq.response_ids
        hits = ((logits.argmax(-1) == ids).float() * mask).sum(-1)
        columns = {"prompts": weight, "agree": answer_agreement(logits, ids, mask), "tokens": mask.sum(-1)}
        sums.add_columns({**columns, "token_agree": hits}, keep=weight > 0)
    actor.train(was_training)
    total = sums.all_reduced()
    return {
        "eval_teacher_agreement": total["agree"] / max(total["prompts"], 1.0),
        "eval_teacher_token_agreement": total["token_agree"] / max(total["tokens"], 1.0),
    }


def check_tokenizers(cfg: Any, run: Any, student_source: str) -> None:
    """Refuse, before any weights load, a teacher that is not a causal LM or whose tokenizer is not the student's
    (the same token for every id, the same special tokens): the two models' log-probs of one token id must be of
    one token. Both tokenizers are read from their files, each with the pad token the stage would give it."""
    from rlhf_cli.models.kind import check_policy

    st = cfg.stage
    teacher = run.resolve_source(st.teacher)
    if cfg.model.tokenizer:
        key, student = f"model.tokenizer={cfg.model.tokenizer}", run.resolve_source(cfg.model.tokenizer)
    else:
        key, student = f"model.name_or_path={cfg.model.name_or_path}", student_source
    diffs = tokenizer_differences(_tokenizer(student, cfg.model), _tokenizer(teacher, cfg.model))
    if diffs:
        raise UserError(
            f"the teacher's tokenizer (stage.teacher={st.teacher}: {teacher}) is not the student's ({key}: "
            f"{student}): {'; '.join(diffs)}. On-policy distillation compares the two models' log-probs of the same "
            "token ids; distil from a teacher that shares the student's tokenizer"
        )
    check_policy(teacher, f"stage.teacher={st.teacher}", "the teacher")


def _tokenizer(name: str, model_cfg: Any) -> Any:
    """The tokenizer files at `name` (no weights), with the distinct pad token `load_tokenizer` gives it."""
    from rlhf_cli.models.source import TOKENIZER_MARKERS, is_builtin, load_pretrained
    from rlhf_cli.models.tokenizer import ensure_distinct_pad, tiny_tokenizer, tokenizer_class

    tok = (
        tiny_tokenizer()
        if is_builtin(name)
        else load_pretrained(tokenizer_class(name), name, model_cfg, TOKENIZER_MARKERS)
    )
    ensure_distinct_pad(tok)
    return tok


def tokenizer_differences(student: Any, teacher: Any) -> list[str]:
    """What differs between two tokenizers, in words: their sizes, the ids of the student's tokens, the special
    tokens. [] when they agree."""
    out = []
    if len(student) != len(teacher):
        out.append(f"{len(student)} tokens against {len(teacher)}")
    vs, vt = student.get_vocab(), teacher.get_vocab()
    moved = [t for t, i in vs.items() if vt.get(t) != i]
    if moved:
        t = sorted(moved, key=vs.get)[0]
        out.append(
            f"{len(moved)} of the student's tokens have another id or none (e.g. {t!r}: {vs[t]} against {vt.get(t)})"
        )
    for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
        a, b = getattr(student, name, None), getattr(teacher, name, None)
        if str(a) != str(b):
            out.append(f"{name} {a!r} against {b!r}")
    return out
