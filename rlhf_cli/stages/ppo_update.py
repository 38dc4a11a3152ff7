"""The PPO update of one rollout batch, and the iteration's rollout metrics (used by stages/ppo.py).

Loss normalisation: every mini-batch is one optimizer step of the actor and one of the critic; both losses are
token means over the mini-batch's valid response tokens on all ranks (summed per micro-batch, divided by the
global token count through `engine.backward`), so the split into micro-batches and ranks does not change them.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_cli import engine as eng
from rlhf_cli.data import build_sft_datasets, collate_sft
from rlhf_cli.errors import UserError
from rlhf_cli.losses import count_targets, sft_loss_sum
from rlhf_cli.losses.ppo import entropy_from_logits, masked_sum, policy_loss, value_loss
from rlhf_cli.rollout.experience import Rollout, critic_values
from rlhf_cli.rollout.generation import response_logits, response_logprobs
from rlhf_cli.stages.common import StepPlan, model_inputs

# Per-token sums accumulated over the update (then divided by the token count).
UPDATE_KEYS = ("policy_loss", "value_loss", "clipfrac_policy", "clipfrac_value", "approx_kl", "entropy")
# Further slots of the sums vector: all tokens forwarded, valid response tokens, sum of |log ratio|, ptx NLL sum and
# ptx target tokens.
TOKENS, VALID, ABS_LOG_RATIO, PTX_SUM, PTX_TOKENS = range(len(UPDATE_KEYS), len(UPDATE_KEYS) + 5)
N_SUMS = len(UPDATE_KEYS) + 5


class PtxData:
    """InstructGPT's pretraining-data term: SFT-style batches, one set of micro-batches per optimizer step."""

    def __init__(self, st: Any, tokenizer: Any, seed: int, dist: Any):
        self.examples = build_sft_datasets(st.ptx.data, tokenizer, seed).train
        self.pad_id, self.seed, self.rank = tokenizer.pad_token_id, seed, dist.rank
        micro, accum = st.ptx.micro_batch_size, st.gradient_accumulation_steps
        per_epoch = len(self.examples) // (micro * accum * dist.world_size)
        if per_epoch == 0:
            raise UserError(f"stage.ptx.data holds {len(self.examples)} examples, fewer than one ptx batch of "
                            f"{micro * accum * dist.world_size}; lower stage.ptx.micro_batch_size")  # fmt: skip
        self.plan = StepPlan(len(self.examples), micro, accum, dist.world_size, per_epoch, 10**12)

    def micro_batches(self, update_index: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        idx = self.plan.rank_indices(update_index, self.rank, self.seed)
        micro = self.plan.micro_batch
        return [{k: v.to(device) for k, v in collate_sft([self.examples[i] for i in idx[j : j + micro]],
                                                         self.pad_id).items()}
                for j in range(0, len(idx), micro)]  # fmt: skip


def ppo_update(actor: Any, critic: Any, ro: Rollout, st: Any, iteration: int, seed: int,
               ptx: PtxData | None) -> dict[str, float]:  # fmt: skip
    """`st.ppo_epochs` passes over the rollout in shuffled mini-batches; returns token-mean losses and statistics.
    With `st.target_kl`, the remaining mini-batches are skipped once a mini-batch's approximate KL (all ranks)
    exceeds it."""
    n = len(ro.prompts)
    mini = st.micro_batch_size * st.gradient_accumulation_steps
    n_mini = n // mini
    gen = torch.Generator().manual_seed(seed * 7919 + iteration)  # same shuffles after a resume
    sums = torch.zeros(N_SUMS, dtype=torch.float64)
    first: dict[str, float] = {}
    steps, norm = 0, None
    # One flat loop over (epoch, mini-batch), so an early stop leaves it with a single break; the update index
    # (iteration x epochs x mini-batches + position) also picks the ptx batch.
    for update in range(st.ppo_epochs * n_mini):
        m = update % n_mini
        if m == 0:
            perm = torch.randperm(n, generator=gen)  # a new shuffle every PPO epoch
        ptx_batches = ptx.micro_batches(iteration * st.ppo_epochs * n_mini + update, ro.mask.device) if ptx else None
        mb, norm = minibatch_step(actor, critic, ro, st, perm[m * mini : (m + 1) * mini], ptx_batches)
        sums += mb
        steps += 1
        approx_kl = float(mb[UPDATE_KEYS.index("approx_kl")] / mb[VALID])
        if not first:  # before any optimizer step: the ratio must be 1 and the approximate KL 0
            first = {"log_ratio_first": float(mb[ABS_LOG_RATIO] / mb[VALID]), "approx_kl_first": approx_kl}
        if st.target_kl is not None and approx_kl > st.target_kl:
            break
    out = {k: float(sums[i] / sums[VALID]) for i, k in enumerate(UPDATE_KEYS)}
    out["loss"] = out["policy_loss"] + st.vf_coef * out["value_loss"]
    if ptx:
        out["ptx_loss"] = float(sums[PTX_SUM] / sums[PTX_TOKENS].clamp(min=1))
    return {**out, **first, "tokens": float(sums[TOKENS]), "optimizer_steps": steps, "grad_norm": norm,
            "early_stopped": float(steps < st.ppo_epochs * n_mini)}  # fmt: skip


def minibatch_step(actor: Any, critic: Any, ro: Rollout, st: Any, idx: torch.Tensor,
                   ptx_batches: list | None) -> tuple[torch.Tensor, float | None]:  # fmt: skip
    """One actor and one critic optimizer step on the rollout rows `idx`. Returns the global sums
    (N_SUMS,) and the actor's gradient norm."""
    n_tokens = float(eng.all_reduce_sum(ro.mask[idx].sum()))
    local_ptx = sum(count_targets(b["labels"]) for b in ptx_batches) if ptx_batches else 0
    ptx_tokens = float(eng.all_reduce_sum(local_ptx))
    tau = st.generation.temperature if st.generation.temperature > 0 else 1.0
    local = torch.zeros(N_SUMS, dtype=torch.float64)
    local[PTX_TOKENS] = local_ptx
    norm = None
    for c, chunk in enumerate(idx.split(st.micro_batch_size)):
        sub = ro.seq.rows(chunk)
        mask, width = sub.response_mask, sub.response_mask.shape[1]
        logits = response_logits(actor, sub)
        logprobs = response_logprobs(logits, sub, tau)
        old = ro.logprobs[chunk, :width]
        pg, clipped, approx_kl = policy_loss(logprobs, old, ro.advantages[chunk, :width], st.clip_eps)
        entropy = entropy_from_logits(logits / tau if st.entropy_coef else logits.detach() / tau)
        actor_loss = masked_sum(pg, mask) - st.entropy_coef * masked_sum(entropy, mask)
        if ptx_batches:
            b = ptx_batches[c]
            ptx_sum, _ = sft_loss_sum(actor(**model_inputs(b)).logits, b["labels"])
            # coef x (mean NLL over the step's ptx tokens), expressed in units of the PPO normaliser.
            actor_loss = actor_loss + st.ptx.coef * ptx_sum * (n_tokens / max(ptx_tokens, 1.0))
            local[PTX_SUM] += float(ptx_sum.detach())
        eng.backward(actor, actor_loss, n_tokens)
        values = critic_values(critic, sub)
        vf, v_clipped = value_loss(values, ro.values[chunk, :width], ro.returns[chunk, :width], st.value_clip_eps)
        eng.backward(critic, st.vf_coef * masked_sum(vf, mask), n_tokens)
        norm = eng.step(actor)
        eng.step(critic)
        parts = (pg, vf, clipped, v_clipped, approx_kl, entropy)
        local[: len(UPDATE_KEYS)] += torch.stack([masked_sum(p.detach(), mask).double().cpu() for p in parts])
        local[TOKENS] += float(sub.attention_mask.sum())
        local[VALID] += float(mask.sum())
        local[ABS_LOG_RATIO] += float(masked_sum((logprobs.detach() - old).abs(), mask))
    return eng.all_reduce_sum(local), norm


@torch.no_grad()
def rollout_metrics(ro: Rollout) -> dict[str, float]:
    """Sequence-level means over all ranks: score (after the missing-EOS rule) mean / std, KL to the reference
    (sum over the response of k1, whatever estimator the reward uses), non-score and total reward, response length,
    EOS fraction; explained variance of the values over all valid tokens."""
    mask = ro.mask
    k1 = ((ro.logprobs - ro.ref_logprobs) * mask).sum(1)
    lengths = mask.sum(1)
    returns, resid = ro.returns, ro.returns - ro.values
    local = torch.stack([
        torch.tensor(float(len(ro.prompts))), ro.scores.sum(), (ro.scores**2).sum(), k1.sum(),
        ro.non_score.sum(), ro.rewards.sum(), lengths.sum(), ro.seq.has_eos.float().sum(), mask.sum(),
        masked_sum(returns, mask), masked_sum(returns**2, mask), masked_sum(resid, mask), masked_sum(resid**2, mask),
    ]).double().cpu()  # fmt: skip
    n, s, s2, kl, non_score, total, length, eos, tok, r, r2, d, d2 = eng.all_reduce_sum(local).tolist()
    var_r = r2 / tok - (r / tok) ** 2
    var_d = d2 / tok - (d / tok) ** 2
    return {
        "rollout_sequences": n, "score_mean": s / n, "score_std": max(s2 / n - (s / n) ** 2, 0.0) ** 0.5,
        "kl": kl / n, "non_score_reward": non_score / n, "total_reward": total / n, "response_length": length / n,
        "eos_fraction": eos / n, "generated_tokens": length,
        "explained_variance": 1.0 - var_d / var_r if var_r > 1e-12 else float("nan"),
    }  # fmt: skip
