"""Summary statistics of paired samples (pure torch), e.g. how strongly a reward model's score follows length."""

from __future__ import annotations

import torch

__all__ = ["pearson_correlation"]


def pearson_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of paired samples: ``cov(x, y) / (std(x) * std(y))``, computed in float64.

    Args:
        x: (N,) values, e.g. reward-model scores.
        y: (N,) values paired with ``x``, e.g. response lengths in tokens.

    Returns:
        0-d float64 tensor in [-1, 1]; NaN when ``x`` or ``y`` is constant (or N < 2), where it is undefined.

    Raises:
        ValueError: If ``x`` and ``y`` do not have the same number of elements.
    """
    x, y = x.detach().double().flatten(), y.detach().double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"pearson_correlation: {x.numel()} x values but {y.numel()} y values")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((dx * dx).sum() * (dy * dy).sum())
    if x.numel() < 2 or float(denominator) == 0.0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return ((dx * dy).sum() / denominator).clamp(-1.0, 1.0)
