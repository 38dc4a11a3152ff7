"""The update and the dynamic sampling of the critic-free stages (stages/critic_free.py).

Loss normalisation: a mini-batch's loss is the chosen aggregation over its rows on all ranks: each micro-batch's
weighted sum (rollout/critic_free.py gives the per-token weights) goes to `engine.backward` with the mini-batch's
global count (valid tokens for token_mean, rows for the per-sequence modes), so neither the split into micro-batches
nor the number of ranks changes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.config.online import kl_in_loss
from rlhf_cli.losses.critic_free import aggregation_count, dynamic_sampling_mask
from rlhf_cli.rollout.critic_free import Estimate
from rlhf_cli.rollout.experience import Rollout, concat, take_rows
from rlhf_cli.rollout.update import ACTOR_SUMS, Objective, actor_step
from rlhf_cli.stages.plan import StepPlan

# Token means reported from the actor steps' sums.
MEANS = ("policy_loss", "clipfrac_low", "clipfrac_high", "approx_kl", "entropy", "kl_loss")


def update(actor: Any, ro: Rollout, est: Estimate, st: Any, iteration: int, seed: int) -> dict[str, float]:
    """`st.ppo_epochs` passes over this rank's rows in shuffled mini-batches of micro_batch_size x
    gradient_accumulation_steps rows, one optimizer step each. The ratio is against the rollout's log-probs, or
    (when the rollout has none: one pass in one mini-batch) the detached current ones. Returns token means over
    all ranks of the losses and statistics (with `st.policy_loss=gspo` also the shares of sequences clipped), the
    optimizer steps and the last gradient norm; and GRPO's `kl` to the reference when the rollout has no log-probs
    to compute it from (see below)."""
    n = len(ro.prompts)
    mini = st.micro_batch_size * st.gradient_accumulation_steps
    n_mini = n // mini
    kl_coef = st.kl_coef if kl_in_loss(st) else 0.0  # the others have their KL in the reward
    objective = Objective(
        st.clip_eps_low, st.clip_eps_high, est.weights, kl_coef, ro.logprobs is not None, st.policy_loss
    )
    gen = torch.Generator().manual_seed(seed * 7919 + iteration)  # same shuffles after a resume
    sums = dict.fromkeys(ACTOR_SUMS, 0.0)  # over the update's optimizer steps and all ranks
    norm = None
    for step in range(st.ppo_epochs * n_mini):
        m = step % n_mini
        if m == 0:
            perm = torch.randperm(n, generator=gen)  # a new shuffle every epoch
        idx = perm[m * mini : (m + 1) * mini]
        normaliser = float(eng.all_reduce_sum(aggregation_count(est.loss_mask[idx], st.loss_aggregation)))
        local, norm = actor_step(
            actor, ro, est.advantages.advantages, idx, st, max(normaliser, 1.0), objective=objective
        )
        for key, value in local.all_reduced().items():
            sums[key] += value
    valid = max(sums["valid"], 1.0)
    out = {k: sums[k] / valid for k in MEANS}
    if st.policy_loss == "gspo":
        # GSPO clips whole sequences: the share of responses cut at 1 - eps_low / 1 + eps_high, next to the token
        # shares (the tokens of those responses) that every surrogate logs.
        seqs = max(sums["seqs"], 1.0)
        out["clipfrac_seq_low"] = sums["clipped_seqs_low"] / seqs
        out["clipfrac_seq_high"] = sums["clipped_seqs_high"] / seqs
    out["loss"] = out["policy_loss"] + kl_coef * out["kl_loss"]
    if not kl_coef:
        del out["kl_loss"]
    elif ro.logprobs is None:
        # One pass in one mini-batch: the rollout computed no log-probs, so `rollout_metrics` has no `kl`. The update
        # visited every row once, before its only optimizer step (DeepSpeed applies it at the accumulation boundary),
        # so its log-probs are the rollout policy's: the same k1 sum per response, mean over responses.
        out["kl"] = sums["ref_k1"] / max(float(eng.all_reduce_sum(float(n))), 1.0)
    return {**out, "tokens": sums["tokens"], "optimizer_steps": st.ppo_epochs * n_mini, "grad_norm": norm}


def dynamic_rollout(
    draw: Callable[[list[int], int], Rollout],
    prompt_idx: list[int],
    plan: StepPlan,
    step: int,
    seed: int,
    st: Any,
    pad_id: int,
) -> tuple[Rollout, dict[str, float], torch.Tensor]:
    """DAPO's dynamic sampling: groups whose scores are all equal carry no signal and are dropped; more prompts are
    drawn (`draw(prompts, attempt)`, other seeded prompts each attempt) until every rank holds as many groups with
    signal as an iteration has, or `st.max_sampling_batches` generate rounds have run (all ranks run the same number:
    they agree after each). Still short, dropped groups fill the gap, only to keep the batch's shape: the returned
    `filler` (B,) bool marks their rows, which `rollout.critic_free.estimate` keeps out of the loss (no gradient).
    Groups are whole on each rank (the plan checks it), so each rank keeps its own. Returns the rollout (this rank's
    rows, as many as without dynamic sampling), the number of rounds, the groups dropped and the fill, summed over
    ranks, and `filler`."""
    g = st.n_samples
    parts: list[tuple[Rollout, torch.Tensor]] = []
    want = None
    for attempt in range(st.max_sampling_batches):
        idx = prompt_idx if attempt == 0 else plan.rank_indices(step, 0, seed + 7_919 * attempt)
        ro = draw(idx, attempt)
        want = want or len(ro.prompts) // g
        keep, _ = dynamic_sampling_mask(ro.scores.shaped.view(-1, g))
        parts.append((ro, keep))
        have = sum(int(k.sum()) for _, k in parts)
        if not eng.any_rank(have < want):
            break
    chosen = [(i, grp) for i, (_, keep) in enumerate(parts) for grp in keep.nonzero().flatten().tolist()][:want]
    dropped = [(i, grp) for i, (_, keep) in enumerate(parts) for grp in (~keep).nonzero().flatten().tolist()]
    fill = want - len(chosen)
    filled = set(dropped[:fill])
    chosen += dropped[:fill]
    rows, filler = [[] for _ in parts], []
    for i, grp in sorted(chosen):
        rows[i].extend(range(grp * g, (grp + 1) * g))
        filler += [(i, grp) in filled] * g
    ro = concat([take_rows(r, rows[i]) for i, (r, _) in enumerate(parts) if rows[i]], pad_id)
    counts = eng.all_reduce_sum(torch.tensor([len(dropped), max(fill, 0), want], dtype=torch.float64)).tolist()
    return (
        ro,
        {
            "sampling_rounds": float(len(parts)),
            "groups_dropped": counts[0],
            "groups_filled_without_signal": counts[1],
            "groups_dropped_fraction": counts[0] / max(counts[2] * len(parts), 1.0),
        },
        torch.tensor(filler, dtype=torch.bool),
    )
