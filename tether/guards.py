"""The tutorial's guards (常見踩雷點): KL limit, non-finite steps, and policy-collapse signals.

Detectors are small functions over a rollout or the run's own bookkeeping; they return metrics or a decision with its
evidence, and the PPO loop acts on the decision (restore the last stable checkpoint, then stop or continue).
Definitions of every ``collapse/*`` and ``guard/*`` metric are in docs/metrics.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from tether.algo import masked_mean


@dataclass
class Decision:
    """What a guard asks the loop to do: ``kind`` names the guard, ``evidence`` says why (logged and summarised)."""

    kind: str
    evidence: str


@dataclass
class GuardState:
    """What the guards remember between iterations (saved in every checkpoint, so resume sees the same history)."""

    bad_steps: int = 0
    """Non-finite optimizer steps in a row."""
    first_entropy: float | None = None
    """Policy entropy of the first iteration (the collapse baseline)."""
    best_score: float | None = None
    """Highest mean raw score seen so far."""
    last_stable: int | None = None
    """Newest checkpoint step whose weights sampled a rollout within the KL limit and updated finitely."""
    rollbacks: int = 0
    """Restores done so far."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def repeat_fraction(response_ids: torch.Tensor, response_mask: torch.Tensor, n: int = 3) -> float:
    """Mean over responses of the fraction of their n-grams that already occurred earlier in the same response.

    0 for text without repeats; near 1 for "the the the the ...". Responses shorter than ``n + 1`` tokens count 0.
    """
    fractions = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        row = [t for t, m in zip(ids, mask) if m]  # sampled tokens only (not a multi-turn episode's replies)
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        fractions.append(1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0)
    return sum(fractions) / max(len(fractions), 1)


def collapse_stats(state: GuardState, rollout, score: float, entropy: float) -> dict[str, float]:
    """Collapse signals of one rollout: entropy against the first iteration's, score against the best so far,
    n-gram repetition, and how implausible the reference finds the text (a gibberish signal)."""
    if state.first_entropy is None:
        state.first_entropy = entropy
    if math.isfinite(score):
        state.best_score = score if state.best_score is None else max(state.best_score, score)
    mask = rollout.response_mask.float()
    return {
        "collapse/entropy_ratio": entropy / state.first_entropy if state.first_entropy > 0 else 1.0,
        "collapse/score_drop": (state.best_score - score) if state.best_score is not None else 0.0,
        "collapse/repeat_fraction": repeat_fraction(rollout.response_ids, rollout.response_mask),
        "collapse/ref_nll": -masked_mean(rollout.ref_logprobs, mask).item(),
    }


def sanitize_scores(scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Non-finite scores replaced by the mean of the finite ones (0 if none): (scores, how many were replaced).

    A reward function that returns NaN for one sample then costs that sample its signal, not the run.
    """
    finite = torch.isfinite(scores)
    bad = int((~finite).sum())
    if not bad:
        return scores, 0
    fill = scores[finite].mean() if finite.any() else scores.new_zeros(())
    return torch.where(finite, scores, fill), bad


def check_kl(kl: float, limit: float | None) -> Decision | None:
    """The tutorial's early stop: KL to the reference above ``limit`` (or not finite) asks for a restore."""
    if limit is not None and not kl <= limit:
        return Decision("kl_stop", f"KL to the reference {kl:.3f} nats > ppo.kl_stop={limit:g}")
    return None


def check_bad_steps(state: GuardState, limit: int) -> Decision | None:
    """``limit`` non-finite optimizer steps in a row (counted in ``state.bad_steps``) ask for a restore."""
    if limit and state.bad_steps >= limit:
        return Decision(
            "non_finite", f"{state.bad_steps} non-finite optimizer steps in a row (ppo.max_bad_steps={limit})"
        )
    return None
