"""TRL 0.11's ``step()`` statistics from a completed rollout and the legacy engine's stats."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from tether.algo import masked_mean, masked_var
from tether.types import Rollout

# TRL step() keys that are one of the core's stats (tether key -> TRL key); docs/migration.md has the full table.
TRL_NAMES = {
    "kl/coef": "objective/kl_coef",
    "loss/policy": "ppo/loss/policy",
    "loss/value": "ppo/loss/value",
    "loss/total": "ppo/loss/total",
    "ppo/entropy": "ppo/policy/entropy",
    "ppo/clipfrac": "ppo/policy/clipfrac",
    "ppo/returns_mean": "ppo/returns/mean",
    "ppo/value_error": "ppo/val/error",
    "ppo/value_clipfrac": "ppo/val/clipfrac",
    "ppo/lr": "ppo/learning_rate",
    "time/reward": "time/ppo/compute_rewards",
    "time/advantage": "time/ppo/compute_advantages",
    "time/update": "time/ppo/optimize_step",
    "trl/approxkl": "ppo/policy/approxkl",
    "trl/policykl": "ppo/policy/policykl",
    "trl/vpred": "ppo/val/vpred",
    "trl/val_mean": "ppo/val/mean",
    "trl/val_var": "ppo/val/var",
}


def _std(x: torch.Tensor) -> float:
    """The sample standard deviation (``torch.std``, as TRL took it); 0 for a single value."""
    return x.std().item() if len(x) > 1 else 0.0


def legacy_stats(rollout: Rollout, core: dict, ratios: list[torch.Tensor]) -> dict:
    """TRL's ``step()`` keys (floats, numpy arrays for distributions), then tether's own keys.

    ``objective/kl`` is the configured estimator's KL per response (TRL's), so with ``kl_penalty="abs"``, ``"mse"``
    or ``"full"`` it differs from tether's ``kl/ref`` (always k1). ``ratios`` are the response tokens' ratios of
    every update (``ppo/policy/ratio``).
    """
    mask = rollout.response_mask.float()
    kl_dist = (rollout.kl * mask).sum(-1)
    coef = core["kl/coef"]
    q_len, r_len = rollout.prompt_mask.sum(-1).float(), mask.sum(-1)
    returns_var = masked_var(rollout.returns, mask, unbiased=bool(mask.sum() > 1)).item()
    if kl_dist.mean().item() < -1.0:
        warnings.warn(
            f"PPOTrainer.step: the KL to the reference is negative ({kl_dist.mean().item():.2f}); check the "
            "generation kwargs (sample from the policy at temperature 1 without top_k/top_p/min_length)",
            stacklevel=3,
        )
    stats = {TRL_NAMES[k]: float(core[k]) for k in TRL_NAMES if k in core} | {
        "objective/kl": kl_dist.mean().item(),
        "objective/kl_dist": kl_dist.cpu().numpy(),
        "objective/logprobs": rollout.logprobs.cpu().numpy(),
        "objective/ref_logprobs": rollout.ref_logprobs.cpu().numpy(),
        "objective/entropy": (-rollout.logprobs * mask).sum(-1).mean().item(),
        "ppo/mean_non_score_reward": masked_mean(-coef * rollout.kl, mask).item(),
        "ppo/mean_scores": rollout.scores.mean().item(),
        "ppo/std_scores": _std(rollout.scores),
        "tokens/queries_len_mean": q_len.mean().item(),
        "tokens/queries_len_std": _std(q_len),
        "tokens/queries_dist": q_len.cpu().numpy(),
        "tokens/responses_len_mean": r_len.mean().item(),
        "tokens/responses_len_std": _std(r_len),
        "tokens/responses_dist": r_len.cpu().numpy(),
        "ppo/policy/advantages": rollout.advantages[mask.bool()].cpu().numpy(),
        "ppo/policy/advantages_mean": masked_mean(rollout.advantages, mask).item(),
        "ppo/policy/ratio": torch.cat(ratios).numpy() if ratios else np.zeros(0, dtype=np.float32),
        "ppo/returns/var": returns_var,
        "ppo/val/var_explained": 1.0 - core.get("ppo/value_error", np.nan) / returns_var if returns_var > 0 else 0.0,
    }
    own = {k: float(v) for k, v in core.items() if not k.startswith("trl/")}
    return {**stats, **{k: v for k, v in own.items() if k not in stats}}
