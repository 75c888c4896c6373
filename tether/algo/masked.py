"""Masked reductions, whitening and small numeric helpers for per-token RLHF tensors.

Implements the masked statistics used throughout PPO-RLHF: masked sum / mean / variance, masked whitening
(``(x - mean) * rsqrt(var + eps)``, optionally adding the mean back, as in OpenAI's ``lm-human-preferences``
``utils.whiten`` used by Ziegler et al. 2019), and explained variance of a value function. Variance is the
*population* variance by default, matching TensorFlow's ``tf.nn.moments`` used by Ziegler et al. 2019.

Notation: B = batch, T = response length. ``mask`` / ``response_mask`` is a (B, T) bool or float tensor that is
1/True at positions that count (response tokens, EOS included) and 0 on padding. Values at masked-out positions
never influence any result: they are replaced by zero before any arithmetic, so even NaN/inf padding is safe.
"""

from __future__ import annotations

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten", "explained_variance", "exact_div"]


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return ``x`` with masked-out positions set to 0 (robust to NaN/inf in the padding)."""
    return torch.where(mask.to(x.dtype) != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is 1.

    Args:
        x: Tensor of any shape, e.g. (B, T).
        mask: Tensor broadcastable to ``x`` (bool or float), 1 where an element counts.
        dim: Dimension to reduce. ``None`` reduces over all elements.

    Returns:
        0-d tensor if ``dim`` is None, otherwise ``x`` reduced along ``dim`` (e.g. (B,) for dim=1 on (B, T)).
    """
    m = mask.to(x.dtype)
    weighted = _zero_padding(x, m) * m
    return weighted.sum() if dim is None else weighted.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1: ``sum(x * mask) / sum(mask)``.

    An all-zero mask (or an all-zero slice along ``dim``) gives NaN (0 / 0).

    Args:
        x: Tensor of any shape, e.g. (B, T).
        mask: Tensor broadcastable to ``x`` (bool or float), 1 where an element counts.
        dim: Dimension to reduce. ``None`` reduces over all elements.

    Returns:
        0-d tensor if ``dim`` is None, otherwise ``x`` reduced along ``dim`` (e.g. (B,) for dim=1 on (B, T)).
    """
    m = mask.to(x.dtype).expand_as(x)
    return masked_sum(x, m, dim) / (m.sum() if dim is None else m.sum(dim))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of ``x`` over all positions where ``mask`` is 1.

    Population variance by default (divide by n), as TensorFlow's ``tf.nn.moments`` does; ``unbiased=True``
    applies Bessel's correction ``n / (n - 1)``.

    Args:
        x: Tensor of any shape, e.g. (B, T).
        mask: Tensor broadcastable to ``x`` (bool or float), 1 where an element counts.
        unbiased: If True, return the unbiased (sample) variance.

    Returns:
        0-d tensor.

    Raises:
        ValueError: If the mask selects no element, or fewer than 2 elements with ``unbiased=True``.
    """
    m = mask.to(x.dtype).expand_as(x)
    n = float(m.sum())
    if n <= 0:
        raise ValueError("masked_var: the mask selects no element (all padding?); the variance is undefined.")
    if unbiased and n < 2:
        raise ValueError(f"masked_var: unbiased variance needs at least 2 valid elements, the mask selects {n:g}.")
    centered = x - masked_mean(x, m)
    var = masked_mean(centered * centered, m)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` with masked (population) statistics: ``(x - mean) * rsqrt(var + eps)``.

    With ``shift_mean=False`` the mean is added back, so the result is rescaled to unit std but keeps its mean
    (the reward-whitening convention of Ziegler et al. 2019: shifting rewards would act as a length bonus).

    Args:
        x: Tensor of any shape, e.g. (B, T).
        mask: Tensor broadcastable to ``x`` (bool or float), 1 where an element counts.
        shift_mean: If True the output has mean 0 over valid positions; if False it keeps the input mean.
        eps: Added to the variance before the reciprocal square root.

    Returns:
        Tensor with the shape of ``x``; positions where ``mask`` is 0 are 0.

    Raises:
        ValueError: If the mask selects no element.
    """
    m = mask.to(x.dtype).expand_as(x)
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_padding(whitened, m)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explained variance of the value predictions: ``1 - Var(returns - values) / Var(returns)``.

    Both variances are masked population variances over valid tokens. 1 is a perfect value function, 0 is no
    better than a constant, negative is worse than a constant. Computed without gradient.

    Args:
        values: (B, T) value predictions.
        returns: (B, T) value targets.
        mask: (B, T) response mask (bool or float).

    Returns:
        0-d tensor; NaN if ``Var(returns)`` is 0.

    Raises:
        ValueError: If the mask selects no element.
    """
    values, returns = values.detach(), returns.detach()
    var_returns = masked_var(returns, mask)
    if float(var_returns) == 0.0:
        return torch.tensor(float("nan"), dtype=returns.dtype, device=returns.device)
    return 1.0 - masked_var(returns - values, mask) / var_returns


def exact_div(a: int, b: int, what: str = "") -> int:
    """Integer division that insists on divisibility (e.g. batch size into minibatches).

    Args:
        a: Dividend.
        b: Divisor.
        what: Description used in the error message, e.g. ``"batch_size / num_minibatches"``.

    Returns:
        ``a // b``.

    Raises:
        ValueError: If ``b`` is 0 or does not divide ``a``; the message names ``what``.
    """
    label = f"{what}: " if what else ""
    if b == 0 or a % b != 0:
        raise ValueError(f"{label}{a} is not exactly divisible by {b}")
    return a // b
