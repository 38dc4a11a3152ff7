"""The DPO family over per-sequence log-probabilities (docs/algorithms.md section 6).

Inputs are per pair, shape (B,): summed completion log-probs of the policy (`pc`, `pr` for chosen and
rejected) and of the frozen reference (`rc`, `rr`), and completion lengths in tokens (`lc`, `lr`; the EOS
counts). Every function returns the per-pair loss (B,); the stage sums it and divides by the number of
pairs in the whole optimizer step, so the mean is exact across micro-batches and ranks.

Normalisation, per method, and why:
- sigmoid / cdpo / robust / hinge: summed log-probs, as in the DPO paper and TRL.
- ipo: length-normalised log-probs (TRL's reading, confirmed with the IPO authors); OpenRLHF sums instead,
  which changes the scale of beta by about |y|.
- rpo: DPO plus alpha times the chosen reply's NLL divided by its length (Pang et al. 2404.19733).
- simpo, orpo: reference-free and length-averaged by definition; ORPO's NLL term covers the chosen reply
  only (the paper's L_SFT; TRL also counts the prompt tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf_cli.config.schema import DPO_REFERENCE_FREE

LOSSES = ("sigmoid", "cdpo", "robust", "hinge", "ipo", "rpo", "simpo", "orpo")
REFERENCE_FREE = DPO_REFERENCE_FREE


def dpo_margin(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), (B,)."""
    return (pc - rc) - (pr - rr)


def sigmoid_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: -log sigmoid(beta h)."""
    return -F.logsigmoid(beta * h)


def cdpo_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Conservative DPO (label smoothing eps): -(1-eps) log s(beta h) - eps log s(-beta h)."""
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def robust_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al.): [-(1-eps) log s(beta h) + eps log s(-beta h)] / (1 - 2 eps)."""
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge: relu(1 - beta h)."""
    return torch.relu(1 - beta * h)


def ipo_loss(h_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: (h - 1/(2 beta))^2 with h built from length-normalised log-probs (beta is tau)."""
    return (h_per_token - 1 / (2 * beta)) ** 2


def simpo_loss(pc: torch.Tensor, pr: torch.Tensor, lc: torch.Tensor, lr: torch.Tensor, beta: float, gamma: float):
    """SimPO: -log sigmoid(beta (pc/lc - pr/lr) - gamma), no reference model."""
    return -F.logsigmoid(beta * (pc / lc - pr / lr) - gamma)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler's note)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(pc, pr, lc, lr, lam: float) -> torch.Tensor:
    """ORPO: NLL(y_w)/|y_w| - lam * log sigmoid(log odds(y_w) - log odds(y_l)), with
    odds(y) = P/(1-P), P = exp(mean token log-prob); log odds(a) = a - log(1 - exp(a))."""
    aw, al = pc / lc, pr / lr
    log_odds = (aw - log1mexp(aw)) - (al - log1mexp(al))
    return -aw - lam * F.logsigmoid(log_odds)


def preference_loss(
    kind: str,
    pc,
    pr,
    rc,
    rr,
    lc,
    lr,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 0.1,
) -> torch.Tensor:
    """Dispatch to the `kind` of loss; all tensors (B,) fp32 (rc, rr may be None for the reference-free
    kinds). Returns the per-pair loss (B,). The loss's settings are keyword-only (stage.beta and the others)."""
    if kind == "simpo":
        return simpo_loss(pc, pr, lc, lr, beta, simpo_gamma)
    if kind == "orpo":
        return orpo_loss(pc, pr, lc, lr, orpo_lambda)
    if kind == "ipo":
        return ipo_loss((pc - rc) / lc - (pr - rr) / lr, beta)
    h = dpo_margin(pc, pr, rc, rr)
    if kind == "sigmoid":
        return sigmoid_loss(h, beta)
    if kind == "cdpo":
        return cdpo_loss(h, beta, label_smoothing)
    if kind == "robust":
        return robust_loss(h, beta, label_smoothing)
    if kind == "hinge":
        return hinge_loss(h, beta)
    if kind == "rpo":
        return sigmoid_loss(h, beta) + rpo_alpha * (-pc / lc)
    raise ValueError(f"unknown DPO loss {kind!r}; one of {LOSSES}")


def implicit_rewards(pc, pr, rc, rr, beta: float) -> dict[str, torch.Tensor]:
    """The implicit rewards beta * (log pi - log ref) logged as rewards/chosen, rejected, margin, accuracy
    (per pair, (B,), detached)."""
    chosen, rejected = (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()
    return {
        "reward_chosen": chosen,
        "reward_rejected": rejected,
        "reward_margin": chosen - rejected,
        "reward_accuracy": (chosen > rejected).float(),
    }
