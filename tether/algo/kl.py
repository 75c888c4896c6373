"""Per-token KL estimators and KL-coefficient controllers.

Estimators follow J. Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx.html). With samples
from the policy pi and ``r = pi_ref / pi`` (so ``log r = ref_logprobs - logprobs``):

- ``k1 = -log r = logp - ref_logp``: unbiased for KL(pi || pi_ref), high variance, negative on ~half the tokens.
- ``k2 = 0.5 * (log r)^2``: biased, low variance, >= 0.
- ``k3 = (r - 1) - log r``: unbiased, >= 0, low variance (control variate).

TRL's names are accepted as aliases: ``"kl"`` (= k1), ``"abs"`` (``|logp - ref_logp|``) and ``"mse"`` (= k2).

The adaptive controller is the proportional controller of Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences" (arXiv:1909.08593, section 2.2): ``e = clip(KL / target - 1, -0.2, 0.2)`` and
``beta <- beta * (1 + e * n_steps / horizon)``. It is NOT the halving/doubling adaptive penalty of the PPO paper.
"""

from __future__ import annotations

import torch

__all__ = ["KL_ESTIMATORS", "kl_penalty", "FixedKLController", "AdaptiveKLController"]

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "kl", "abs", "mse")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the policy (the sampling distribution).
        ref_logprobs: (B, T) log-probs of the same tokens under the frozen reference model.
        estimator: One of ``KL_ESTIMATORS``: ``"k1"``/``"kl"``, ``"k2"``/``"mse"``, ``"k3"`` or ``"abs"``.

    Returns:
        (B, T) per-token estimates (no masking is applied; multiply by the response mask as needed).

    Raises:
        ValueError: If ``estimator`` is not one of ``KL_ESTIMATORS``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {estimator!r}; valid names are {', '.join(KL_ESTIMATORS)}.")
    diff = logprobs - ref_logprobs  # = -log r
    if estimator in ("k1", "kl"):
        return diff
    if estimator in ("k2", "mse"):
        return 0.5 * diff * diff
    if estimator == "abs":
        return diff.abs()
    log_r = -diff  # k3 = (r - 1) - log r, with expm1 for accuracy near r = 1
    return torch.expm1(log_r) - log_r


class FixedKLController:
    """A constant KL coefficient (beta). ``update`` is a no-op.

    Args:
        kl_coef: The KL penalty coefficient beta.

    Attributes:
        value: The current coefficient (float).
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Do nothing (the coefficient is fixed).

        Args:
            current_kl: Ignored.
            n_steps: Ignored.
        """

    def state_dict(self) -> dict[str, float]:
        """Return the controller state as a plain dict of floats, for checkpoints.

        Returns:
            ``{"value": beta}``.
        """
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the state produced by :meth:`state_dict`.

        Args:
            state: Dict with key ``"value"``.
        """
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 proportional controller driving the sequence-level KL towards ``target``.

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``value *= 1 + e * n_steps / horizon``.
    Example: KL = 12, target = 6, n_steps = 512, horizon = 10000 gives ``value *= 1.01024``.

    Args:
        init_kl_coef: Initial coefficient beta.
        target: Target KL in nats (sequence-level: mean over sequences of the summed per-token KL).
        horizon: Number of episodes over which the error is corrected (10000 in Ziegler et al.).

    Attributes:
        value: The current coefficient (float).
        target: The target KL (float).
        horizon: The horizon (float).

    Raises:
        ValueError: If ``target`` or ``horizon`` is not positive.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self._check(float(target), float(horizon))
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    @staticmethod
    def _check(target: float, horizon: float) -> None:
        if not target > 0:
            raise ValueError(f"AdaptiveKLController: target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"AdaptiveKLController: horizon must be > 0, got {horizon}")

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Update beta once per PPO iteration from the rollout's mean sequence KL.

        Args:
            current_kl: Measured KL(pi || pi_ref) in nats (a float or 0-d tensor), on the same scale as ``target``.
            n_steps: Number of episodes in this iteration (the rollout batch size).
        """
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Return the controller state as a plain dict of floats, for checkpoints.

        Returns:
            ``{"value": beta, "target": target, "horizon": horizon}``.
        """
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the state produced by :meth:`state_dict`.

        Args:
            state: Dict with key ``"value"`` and optionally ``"target"`` and ``"horizon"`` (kept if absent).

        Raises:
            ValueError: If the restored ``target`` or ``horizon`` is not positive.
        """
        target = float(state.get("target", self.target))
        horizon = float(state.get("horizon", self.horizon))
        self._check(target, horizon)
        self.value, self.target, self.horizon = float(state["value"]), target, horizon


class ThresholdKLController:
    """The tutorial's step rule (動態調整 β): a multiplicative nudge when KL leaves a band around ``target``.

    ``value *= up`` when ``current_kl > high * target``; ``value *= down`` when ``current_kl < low * target``;
    unchanged in between. Defaults are the tutorial's (x1.5 above 1.5 x target, x0.75 below 0.5 x target).
    Example: target 6, KL 10 > 9 gives ``value *= 1.5``; KL 2 < 3 gives ``value *= 0.75``.

    Args:
        init_kl_coef: Initial coefficient beta.
        target: Target KL in nats (sequence-level, as for :class:`AdaptiveKLController`).
        high, low: Band edges as multiples of ``target``.
        up, down: Factors applied above the band and below it.

    Raises:
        ValueError: If ``target`` is not positive.
    """

    def __init__(
        self,
        init_kl_coef: float,
        target: float,
        high: float = 1.5,
        low: float = 0.5,
        up: float = 1.5,
        down: float = 0.75,
    ) -> None:
        if not target > 0:
            raise ValueError(f"ThresholdKLController: target must be > 0, got {target}")
        self.value, self.target = float(init_kl_coef), float(target)
        self.high, self.low, self.up, self.down = high, low, up, down

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Apply the rule once per PPO iteration (``n_steps`` is ignored: the rule is per iteration)."""
        kl = float(current_kl)
        if kl > self.high * self.target:
            self.value *= self.up
        elif kl < self.low * self.target:
            self.value *= self.down

    def state_dict(self) -> dict[str, float]:
        """``{"value": beta, "target": target}``."""
        return {"value": self.value, "target": self.target}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the state produced by :meth:`state_dict`."""
        self.value, self.target = float(state["value"]), float(state.get("target", self.target))


def kl_controller(kind: str, coef: float, target: float, horizon: float):
    """The KL coefficient's controller: 'fixed', 'adaptive' (Ziegler et al.) or 'threshold' (the tutorial's rule)."""
    if kind == "adaptive":
        return AdaptiveKLController(coef, target, horizon)
    if kind == "threshold":
        return ThresholdKLController(coef, target)
    return FixedKLController(coef)
