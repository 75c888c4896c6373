"""The monitoring metrics of a completed PPO rollout (each key has a line in docs/metrics.md)."""

from __future__ import annotations

from tether.algo import explained_variance, kl_penalty, masked_mean
from tether.types import Rollout


def rollout_stats(rollout: Rollout, kl_coef: float) -> dict[str, float]:
    """The monitoring metrics of a completed rollout (see docs/metrics.md)."""
    mask = rollout.response_mask.float()
    k1 = (rollout.logprobs - rollout.ref_logprobs) * mask
    lengths = mask.sum(-1)
    non_score = -kl_coef * rollout.kl.sum(-1)
    steps = {} if rollout.step_scores is None else {"reward/steps": (rollout.step_scores * mask).sum(-1).mean().item()}
    return steps | {
        "reward/score": rollout.raw_scores.mean().item(),
        "reward/score_std": rollout.raw_scores.std(unbiased=False).item(),
        "reward/scaled": rollout.scores.mean().item(),
        "reward/non_score": non_score.mean().item(),
        "reward/total": (rollout.scores + non_score).mean().item() + steps.get("reward/steps", 0.0),
        "kl/ref": k1.sum(-1).mean().item(),
        "kl/ref_k3": (kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k3") * mask).sum(-1).mean().item(),
        "kl/coef": kl_coef,
        "policy/entropy": masked_mean(rollout.entropy, mask).item(),
        "policy/logprob_sum": (rollout.logprobs * mask).sum(-1).mean().item(),
        "response/length": lengths.mean().item(),
        "response/ended": rollout.ended.float().mean().item(),
        "ppo/advantage_mean": masked_mean(rollout.returns - rollout.values, mask).item(),
        "ppo/returns_mean": masked_mean(rollout.returns, mask).item(),
        "ppo/value_mean": masked_mean(rollout.values, mask).item(),
        "ppo/explained_variance": explained_variance(rollout.values, rollout.returns, mask).item(),
    }
