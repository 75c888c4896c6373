"""Staged schedules (the tutorial's warmup / main / fine-tune): which PPO settings hold at a given iteration.

A config's ``stages:`` list runs in order; each stage overrides some ``ppo.*`` fields for its iterations. The loop asks
:func:`stage_at` for the iteration's stage and settings; it never branches on stage names.
"""

from __future__ import annotations

from dataclasses import replace

from tether.sections import PPOParams, Stage


def stage_at(ppo: PPOParams, stages: list[Stage], iteration: int) -> tuple[int, PPOParams]:
    """(stage index, settings) for the iteration that follows ``iteration`` completed ones (index -1: no stages)."""
    if not stages:
        return -1, ppo
    end = 0
    for index, stage in enumerate(stages):
        end += stage.steps
        if iteration < end:
            return index, replace(ppo, **stage.overrides)
    return len(stages) - 1, replace(ppo, **stages[-1].overrides)


def total_updates(ppo: PPOParams, stages: list[Stage]) -> int:
    """Optimizer steps of the whole run (ppo_epochs may differ between stages); the LR schedule spans them."""
    minibatches = ppo.rollout_batch_size // ppo.mini_batch_size
    if not stages:
        return ppo.steps * ppo.ppo_epochs * minibatches
    return sum(s.steps * s.overrides.get("ppo_epochs", ppo.ppo_epochs) * minibatches for s in stages)
