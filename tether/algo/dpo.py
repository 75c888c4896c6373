"""Direct Preference Optimization: the offline alternative to a reward model plus PPO.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
(arXiv:2305.18290, eq. 7). The policy's log-ratio to the frozen reference acts as an implicit reward,
``r(x, y) = beta * (log pi_theta(y|x) - log pi_ref(y|x))``, and the Bradley-Terry loss of the reward model is applied
to it directly:

    loss = -log sigmoid( r(x, y_chosen) - r(x, y_rejected) )

``label_smoothing`` eps is conservative DPO (Mitchell 2023; TRL's ``label_smoothing``): each label is taken to be
flipped with probability eps, ``loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``.

Notation: B = pairs. Every input is (B,): the sum over a response's tokens (EOS included, ``response_mask`` = 1) of
its log-probs, so a sequence-level quantity. ``ref_*`` are constants (detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dpo_loss"]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss (Rafailov et al. 2023, eq. 7), mean over pairs.

    Equals ln 2 when the policy is the reference; minimising it raises the chosen response's log-ratio to the
    reference above the rejected one's. Gradients flow to the ``policy_*`` log-probs only.

    Args:
        policy_chosen_logps: (B,) log pi_theta(y_chosen | x), summed over response tokens (with grad).
        policy_rejected_logps: (B,) log pi_theta(y_rejected | x).
        ref_chosen_logps: (B,) log pi_ref(y_chosen | x).
        ref_rejected_logps: (B,) log pi_ref(y_rejected | x).
        beta: the inverse temperature of the implicit reward (the KL strength; larger stays closer to pi_ref).
        label_smoothing: eps, the assumed probability that a pair's label is flipped (0 = plain DPO).

    Returns:
        ``(loss, stats)``: 0-d loss; stats (detached 0-d tensors, means over pairs): ``chosen_reward`` and
        ``rejected_reward`` (``beta * (logp - ref_logp)``), ``margin`` (chosen minus rejected reward) and
        ``accuracy`` (fraction of pairs whose chosen reward is the higher).
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps.detach())
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps.detach())
    margins = chosen_rewards - rejected_rewards  # (B,) the sigmoid's argument z
    losses = -(1.0 - label_smoothing) * F.logsigmoid(margins) - label_smoothing * F.logsigmoid(-margins)
    with torch.no_grad():
        stats = {
            "chosen_reward": chosen_rewards.mean(),
            "rejected_reward": rejected_rewards.mean(),
            "margin": margins.mean(),
            "accuracy": (margins > 0).to(margins.dtype).mean(),
        }
    return losses.mean(), {k: v.detach() for k, v in stats.items()}
