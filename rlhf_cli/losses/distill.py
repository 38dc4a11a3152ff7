"""On-policy distillation (docs/algorithms.md section 13): divergences between the student `s` (the trained policy)
and a frozen teacher `t` at the positions of the student's own samples. Pure torch functions; the callers pass
logits already restricted to the response positions (rollout/generation.py `response_logits`).

Every function takes the sampling temperature `tau` and divides both models' logits by it before any softmax: the
student sampled from softmax(logits / tau), so that is the distribution whose divergence to the teacher is measured
(docs/algorithms.md 1.3). All sums run in fp32. Positions with mask 0 give exactly 0 and no gradient, whatever the
logits there.

- `sampled_reverse_kl`: the one-sample estimate `l_s(y_t) - l_t(y_t)` of KL(s || t) at the sampled token; used
  detached, as a negative per-token advantage (`distill_advantages`), as Thinking Machines' "On-Policy Distillation"
  and TRL's distillation trainers do.
- `full_reverse_kl`: sum_v s(v) (log s(v) - log t(v)) at each position, differentiable through the student; with
  `top_k`, over the student's k most likely tokens plus one bucket for the rest (TRL DistillationTrainer's
  `add_tail`).
- `generalized_jsd`: GKD's JSD(beta) (Agarwal et al. 2023), TRL's convention: beta = 0 is the forward KL(t || s),
  beta = 1 the reverse KL(s || t), in between beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s.
"""

from __future__ import annotations

import math

import torch


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values where mask is set, else 0 (`where`, not a product: no NaN from an inf at a padded position)."""
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def _log_softmax(logits: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / tau, dim=-1)


def sampled_reverse_kl(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """k_t = l_s(y_t) - l_t(y_t) for the sampled tokens: (B, R) log-probs at the sampling temperature and mask ->
    (B, R), 0 off the mask. Its expectation under the student is KL(s || t) at that position; its sum over a
    response is the one-sample estimate of the sequence's reverse KL."""
    return _masked(student_logprobs.float() - teacher_logprobs.float(), mask)


def distill_advantages(
    k: torch.Tensor, mask: torch.Tensor, coef: float, sequence_advantages: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token advantages of the sampled-token estimator, detached: A_t = -coef * k_t (+ the response's score
    advantage, (B,), on each of its tokens, when a reward is mixed in). k, mask (B, R) -> (B, R), 0 off the mask.

    With the surrogate at ratio 1 the policy gradient is -A_t grad l_s(y_t) = coef k_t grad l_s(y_t), whose
    expectation is coef grad KL(s || t) at that position (the score-function term E[grad l_s] is 0). Each token
    reads its own k_t only (discount 0, as Thinking Machines): a token's effect on the KL of later positions is left
    out, which keeps the variance low and biases the sequence-level gradient."""
    adv = -coef * k.detach().float()
    if sequence_advantages is not None:
        adv = adv + sequence_advantages.detach().float().to(adv.device)[:, None]
    return _masked(adv, mask)


def full_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    tau: float = 1.0,
    top_k: int = 0,
) -> torch.Tensor:
    """KL(s || t) = sum_v s(v) (log s(v) - log t(v)) at each position: logits (B, R, V), mask (B, R) -> (B, R) fp32,
    0 off the mask; gradients flow into the student's logits only (the teacher's are detached).

    `top_k` > 0 (and < V): the sum runs over the student's k most likely tokens at that position (chosen without
    gradient) and one tail bucket holding the rest of each distribution's mass, S(rest) log(S(rest) / T(rest)).
    That is the KL of the two distributions coarsened to k + 1 outcomes: >= 0, at most the full KL, and 0 only
    when the student matches the teacher on its top-k and in total elsewhere. Renormalising over the top-k alone
    would leave the student's total mass outside them without a gradient; the bare partial sum is not a
    divergence (it can be negative and is smallest at s(v) = t(v) / e)."""
    ls = _log_softmax(student_logits, tau)
    lt = _log_softmax(teacher_logits.detach(), tau)
    if top_k <= 0 or top_k >= ls.shape[-1]:
        return _masked((ls.exp() * (ls - lt)).sum(-1), mask)
    idx = ls.detach().topk(top_k, dim=-1).indices
    ls_k, lt_k = ls.gather(-1, idx), lt.gather(-1, idx)
    head = (ls_k.exp() * (ls_k - lt_k)).sum(-1)
    # The tail's log-mass from the logits outside the top-k (logsumexp, stable for a tail of any size).
    outside = torch.ones_like(ls, dtype=torch.bool).scatter(-1, idx, False)
    neg_inf = torch.tensor(float("-inf"), device=ls.device)
    tail_s = torch.logsumexp(torch.where(outside, ls, neg_inf), dim=-1)
    tail_t = torch.logsumexp(torch.where(outside, lt, neg_inf), dim=-1)
    return _masked(head + tail_s.exp() * (tail_s - tail_t), mask)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    tau: float = 1.0,
) -> torch.Tensor:
    """GKD's generalized JSD at each position: logits (B, R, V), mask (B, R) -> (B, R) fp32, 0 off the mask;
    gradients into the student only. beta = 0: KL(t || s) (forward); beta = 1: KL(s || t) (reverse); else
    beta KL(t || m) + (1 - beta) KL(s || m) with m = beta t + (1 - beta) s, the convention of TRL's
    `generalized_jsd_loss` (the end points are the unscaled KLs, not the limits of the mixture, which vanish).
    Its gradient with respect to s(v) is (1 - beta) log(s(v) / m(v))."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    ls = _log_softmax(student_logits, tau)
    lt = _log_softmax(teacher_logits.detach(), tau)
    if beta == 0.0:
        per_position = (lt.exp() * (lt - ls)).sum(-1)
    elif beta == 1.0:
        per_position = (ls.exp() * (ls - lt)).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([ls + math.log(1.0 - beta), lt + math.log(beta)]), dim=0)
        kl_t = (lt.exp() * (lt - lm)).sum(-1)
        kl_s = (ls.exp() * (ls - lm)).sum(-1)
        per_position = beta * kl_t + (1.0 - beta) * kl_s
    return _masked(per_position, mask)


def greedy_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 where the two models' most likely next tokens agree: logits (B, R, V), mask (B, R) -> (B, R) float, 0 off
    the mask. Temperature does not move an argmax."""
    same = student_logits.detach().argmax(-1) == teacher_logits.detach().argmax(-1)
    return _masked(same.float(), mask)


def answer_agreement(student_logits: torch.Tensor, answer_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whether greedy decoding of the student reproduces a given answer: logits (B, R, V) of the student reading the
    answer (position t predicts answer token t), answer_ids and mask (B, R) -> (B,) float, 1 where the student's
    argmax equals the answer's token at every valid position. Greedy decoding picks the argmax at each step, so
    this holds exactly when the student's own greedy answer is that answer (ties aside); a row with no valid
    token agrees."""
    hit = (student_logits.detach().argmax(-1) == answer_ids) | ~mask.bool()
    return hit.all(dim=-1).float()
