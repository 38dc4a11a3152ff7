"""The online stages' stateful controllers, checkpointed with the stage (state_dict / load_state_dict): the KL
coefficient (fixed, or Ziegler's adaptive controller; docs/algorithms.md section 4.10) and the running moments that
normalise scores. Kept out of losses/, which holds pure functions."""

from __future__ import annotations

import math

import torch

KL_CONTROLLERS = ("fixed", "adaptive")


class KLController:
    """Base of the KL coefficient controllers: the current coefficient `value`, checkpointed by state_dict."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class FixedKLController(KLController):
    """A constant KL coefficient; `update` is a no-op, so the stage can call it either way."""

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController(KLController):
    """Ziegler et al.: e = clip(KL / target - 1, -0.2, 0.2); value *= 1 + e * n_steps / horizon.

    current_kl is the batch mean over sequences of sum_t k1 (section 4) and n_steps the batch size. target and
    horizon come from the config on resume; only the value is checkpointed.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        # A nan KL would turn the coefficient into nan for the rest of the run; fail loudly instead.
        if not math.isfinite(current_kl):
            raise ValueError(f"non-finite KL {current_kl} passed to the adaptive KL controller")
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


def kl_controller(kind: str, init: float, target: float, horizon: int) -> KLController:
    """The KL coefficient controller of `kind` ("fixed" ignores target and horizon)."""
    if kind == "fixed":
        return FixedKLController(init)
    if kind == "adaptive":
        return AdaptiveKLController(init, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; one of {KL_CONTROLLERS}")


# ---------------------------------------------------------------- score normalisation


# ---------------------------------------------------------------- score normalisation


class RunningMoments:
    """Running mean and population std of every value seen (for reward normalisation with running statistics).

    Batches merge with Chan et al.'s parallel algorithm on (count, mean, M2) in float64, so the result equals the
    moments of the concatenation. Gather values across ranks before `update`, or ranks will drift apart. `std` is
    1.0 until 2 values have been seen (a single value has no spread; 1 makes normalisation a pure shift).
    """

    def __init__(self):
        self.count, self._mean, self._m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        x = values.detach().double().reshape(-1)
        n = x.numel()
        if n == 0:
            return
        batch_mean = x.mean().item()
        batch_m2 = ((x - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self._mean
        self._mean += delta * n / total
        self._m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / self.count) if self.count >= 2 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self._mean, "m2": self._m2}

    def load_state_dict(self, d: dict) -> None:
        self.count, self._mean, self._m2 = int(d["count"]), float(d["mean"]), float(d["m2"])
