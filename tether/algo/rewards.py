"""Per-token reward shaping with a KL penalty (Ziegler et al. 2019, arXiv:1909.08593, section 2.2).

The reward-model score is an outcome reward placed on exactly one token, the last valid response token (the EOS
token when there is one), while the KL to the reference is a dense shaping term on every response token:

    r_t = -beta * kl_t                 for every valid t
    r_last += score
    r_t += step_t                      (optional step scores: a score on the token where a step ends)

Notation: B = batch, T = response length. ``response_mask`` is (B, T), 1/True on response tokens (EOS included),
0 on padding after them.
"""

from __future__ import annotations

import torch

__all__ = ["last_token_index", "shape_rewards"]


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where ``response_mask`` is 1, per row.

    Args:
        response_mask: (B, T) bool or float mask.

    Returns:
        (B,) long tensor. Rows with no valid position get 0 (check ``response_mask.any(-1)`` to tell them apart).
    """
    valid = response_mask != 0
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    return torch.where(valid, positions, -1).amax(dim=-1).clamp(min=0)


def shape_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    step_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build per-token rewards: ``-kl_coef * kl`` on every valid token plus the score on the last valid token, plus
    any step scores on the tokens that hold them (process rewards, or an environment's reward for each turn).

    A row whose mask is all zero (empty response) gets no score and no KL term: its rewards are all 0.
    Values of ``kl`` at padding positions are ignored (even NaN). Gradients are not blocked; pass detached
    inputs (the KL penalty is part of the reward and should carry no gradient in PPO).

    Args:
        scores: (B,) reward-model scores, one per sequence ((B, 1) is accepted too).
        kl: (B, T) per-token KL estimates (see ``kl_penalty``).
        response_mask: (B, T) bool or float mask.
        kl_coef: The KL coefficient beta (e.g. ``controller.value``).
        step_scores: optional (B, T) scores added where they stand (0 elsewhere); ignored at padding.

    Returns:
        ``(rewards, non_score_rewards)``, both (B, T) with the dtype of ``kl`` and 0 at padding:
        ``non_score_rewards = -kl_coef * kl * mask`` and ``rewards = non_score_rewards + score on the last token +
        step_scores``.
    """
    m = response_mask.to(kl.dtype)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    kl_valid = torch.where(m != 0, kl, zero)
    non_score_rewards = -kl_coef * kl_valid * m
    last = last_token_index(response_mask)
    has_token = (m != 0).any(dim=-1).to(kl.dtype)
    one_hot = torch.nn.functional.one_hot(last, num_classes=kl.shape[-1]).to(kl.dtype)
    rewards = non_score_rewards + one_hot * (scores.reshape(-1).to(kl.dtype) * has_token).unsqueeze(-1)
    if step_scores is not None:
        rewards = rewards + torch.where(m != 0, step_scores.to(kl.dtype), zero) * m
    return rewards, non_score_rewards
