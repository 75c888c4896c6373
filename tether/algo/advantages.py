"""Generalized Advantage Estimation over response tokens.

Implements GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", arXiv:1506.02438, eq. 16) as used for RLHF by Ziegler et al. 2019:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lambda * A_{t+1}
    R_t     = A_t + V_t                       (TD(lambda) value targets)

with ``V`` and ``A`` equal to 0 after the last valid token (the episode ends there: terminal value 0).

Notation: B = batch, T = response length. ``response_mask`` is (B, T), 1/True on response tokens (EOS included),
0 on padding after them.
"""

from __future__ import annotations

import torch

__all__ = ["compute_gae"]


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute GAE advantages and TD(lambda) returns, vectorised over the batch.

    Rewards and values at padding are replaced by 0 first (so padding never leaks). If a row's mask has interior
    zeros, those positions are skipped: the next valid token is treated as the next step.

    Args:
        rewards: (B, T) per-token rewards (e.g. from ``shape_rewards``).
        values: (B, T) value estimates V(s_t) from rollout time (the old values).
        response_mask: (B, T) bool or float mask.
        gamma: Discount factor.
        gae_lambda: GAE lambda (0 gives one-step TD errors, 1 gives Monte-Carlo returns minus V).

    Returns:
        ``(advantages, returns)``, both (B, T) with the dtype of ``values``, no gradient, 0 at padding;
        ``returns = advantages + values`` at valid positions.
    """
    valid = response_mask != 0
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(valid, rewards.to(values.dtype), zero)
    v = torch.where(valid, values, zero)
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * gae_lambda * next_adv
        keep = valid[:, t]
        advantages[:, t] = torch.where(keep, adv_t, zero)
        next_value = torch.where(keep, v[:, t], next_value)
        next_adv = torch.where(keep, adv_t, next_adv)
    returns = torch.where(valid, advantages + v, zero)
    return advantages, returns
