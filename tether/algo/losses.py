"""PPO clipped policy loss, clipped value loss and the Bradley-Terry reward-model loss.

- Policy: the clipped surrogate of Schulman et al. 2017, "Proximal Policy Optimization Algorithms"
  (arXiv:1707.06347, eq. 7), applied per token, written as a loss to minimise:
  ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`` with ``ratio = exp(logp_new - logp_old)``.
- Value: ppo2-style value clipping as in OpenAI's lm-human-preferences (Ziegler et al. 2019):
  ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with ``V_clip = V_old + clip(V - V_old, -eps_v, eps_v)``.
- Reward model: Bradley-Terry pairwise loss ``-log sigmoid(r_chosen - r_rejected)`` (Ziegler et al. 2019).

Token losses are aggregated as ``sum(loss_t * mask) / denominator``. By default the denominator is this call's
number of valid tokens (a masked mean). A trainer that splits a minibatch into micro-batches passes the
minibatch's total valid-token count as ``loss_denominator``; summing the micro-batch losses (and accumulating their
gradients) then gives exactly the full-minibatch loss and gradient. Stats are always masked means over this
call's own tokens and are detached 0-d tensors.

Notation: B = batch, T = response length. ``response_mask`` is (B, T), 1/True on response tokens (EOS included),
0 on padding after them. Inputs at padding positions never influence losses, gradients or stats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tether.algo.masked import masked_mean

__all__ = ["ppo_policy_loss", "ppo_value_loss", "pairwise_reward_loss"]

Stats = dict[str, torch.Tensor]


def _valid_only(x: torch.Tensor, valid: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    return torch.where(valid, x, torch.full((), fill, dtype=x.dtype, device=x.device))


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_denominator: float | torch.Tensor | None):
    """``sum(per_token * mask) / denominator``; default denominator = valid tokens (at least 1, so empty -> 0)."""
    m = mask.to(per_token.dtype)
    if loss_denominator is None:
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if not isinstance(loss_denominator, torch.Tensor) and not loss_denominator > 0:
        raise ValueError(f"loss_denominator must be > 0, got {loss_denominator}")
    return (per_token * m).sum() / loss_denominator


def ppo_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float,
    loss_denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), per token, masked.

    ``old_logprobs`` and ``advantages`` are treated as constants (detached); gradients flow to ``new_logprobs``.

    Args:
        new_logprobs: (B, T) log-probs of the taken tokens under the current policy (with grad).
        old_logprobs: (B, T) log-probs of the same tokens at rollout time.
        advantages: (B, T) advantages (typically GAE, whitened).
        response_mask: (B, T) bool or float mask.
        clip_range: epsilon of the ratio clip, e.g. 0.2.
        loss_denominator: Divide the masked sum by this instead of this call's valid-token count.

    Returns:
        ``(loss, stats)``: 0-d loss; stats (detached 0-d tensors, masked over this call's tokens):
        ``clipfrac`` (fraction of tokens where the clip binds), ``approx_kl`` (k3 estimate of KL(old || new):
        ``(ratio - 1) - log ratio``), ``ratio_mean``, ``ratio_max``, ``ratio_min`` (NaN if no valid token).
    """
    valid = response_mask != 0
    log_ratio = _valid_only(new_logprobs - old_logprobs.detach(), valid)
    adv = _valid_only(advantages.detach().to(log_ratio.dtype), valid)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = _aggregate(torch.maximum(unclipped, clipped), response_mask, loss_denominator)
    with torch.no_grad():
        nan = torch.full((), float("nan"), dtype=ratio.dtype, device=ratio.device)
        any_valid = valid.any()
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), response_mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
            "ratio_max": torch.where(any_valid, _valid_only(ratio, valid, float("-inf")).amax(), nan),
            "ratio_min": torch.where(any_valid, _valid_only(ratio, valid, float("inf")).amin(), nan),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def ppo_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    value_clip_range: float | None,
    loss_denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)``, per token, masked.

    ``V_clip = V_old + clamp(V - V_old, -eps_v, eps_v)``. ``old_values`` and ``returns`` are detached.

    Args:
        new_values: (B, T) current value predictions (with grad).
        old_values: (B, T) value predictions at rollout time.
        returns: (B, T) value targets (e.g. GAE returns).
        response_mask: (B, T) bool or float mask.
        value_clip_range: eps_v in reward units, e.g. 0.2; ``None`` disables clipping (plain ``0.5 * (V - R)^2``).
        loss_denominator: Divide the masked sum by this instead of this call's valid-token count.

    Returns:
        ``(loss, stats)``: 0-d loss; stats (detached 0-d tensors, masked over this call's tokens):
        ``value_clipfrac`` (fraction where the clipped error is larger, 0 without clipping), ``value_error``
        (mean of ``(V - R)^2``), ``value_mean`` (mean of ``V``).
    """
    valid = response_mask != 0
    new = _valid_only(new_values, valid)
    target = _valid_only(returns.detach().to(new.dtype), valid)
    error = (new - target) ** 2
    if value_clip_range is None:
        per_token, clip_hit = error, torch.zeros_like(error)
    else:
        old = _valid_only(old_values.detach().to(new.dtype), valid)
        v_clip = old + torch.clamp(new - old, -value_clip_range, value_clip_range)
        error_clipped = (v_clip - target) ** 2
        per_token = torch.maximum(error, error_clipped)
        # unclamped, old + (new - old) is new up to rounding: only a clamped value counts as clipped
        clip_hit = ((error_clipped > error) & ((new - old).abs() > value_clip_range)).to(new.dtype)
    loss = 0.5 * _aggregate(per_token, response_mask, loss_denominator)
    with torch.no_grad():
        stats = {
            "value_clipfrac": masked_mean(clip_hit, response_mask),
            "value_error": masked_mean(error, response_mask),
            "value_mean": masked_mean(new, response_mask),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def pairwise_reward_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, Stats]:
    """Bradley-Terry pairwise loss ``-mean(log sigmoid(chosen - rejected [- margin]))``.

    Equals ln 2 when the scores are equal; minimising it increases ``chosen - rejected``.

    Args:
        chosen_scores: (B,) reward-model scores of the preferred responses.
        rejected_scores: (B,) scores of the rejected responses.
        margin: Optional float or (B,) tensor subtracted from the score difference inside the sigmoid.

    Returns:
        ``(loss, stats)``: 0-d loss; stats (detached 0-d tensors): ``accuracy`` (fraction with chosen > rejected),
        ``margin`` (mean of chosen - rejected, without the ``margin`` argument), ``chosen_mean``, ``rejected_mean``.
    """
    diff = chosen_scores - rejected_scores
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        stats = {
            "accuracy": (diff > 0).to(diff.dtype).mean(),
            "margin": diff.mean(),
            "chosen_mean": chosen_scores.mean(),
            "rejected_mean": rejected_scores.mean(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}
