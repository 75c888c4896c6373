"""The core PPO trainer with TRL 0.11's update rules, for the legacy ``PPOTrainer.step``.

What differs from :class:`tether.trainers.ppo.PPOTrainer`, each as TRL's ``step`` did it:
- the learning rate belongs to the optimizer (the user's, and their ``lr_scheduler``), not to a tether schedule;
- ``early_stopping``: the PPO epochs stop once an epoch's last minibatch has policy KL > 1.5 * ``target_kl``;
- ``ratio_threshold``: a minibatch whose mean ratio exceeds it contributes a zero loss (with a warning);
- ``kl_penalty="full"``: the per-token KL is over the whole vocabulary (:func:`full_kl`);
- the KL controller follows the configured KL estimate (TRL's ``objective/kl``), not tether's k1;
- TRL's extra update statistics (policy KL, ratios, value means and variances) are recorded.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
import torch.nn.functional as F

from tether.algo import (
    masked_mean,
    masked_var,
    masked_whiten,
    shape_rewards,
)
from tether.errors import TetherError
from tether.passes import response_logits
from tether.trainers.ppo import PPOTrainer as CorePPOTrainer
from tether.types import Rollout


def _user_scores_only(*args, **kwargs):
    raise TetherError("legacy PPOTrainer: scores come from step(queries, responses, scores), not from a scorer")


class EstimatorKLController:
    """Wraps a KL controller so that it is updated with the configured estimator's KL per response (TRL's
    ``objective/kl``: k1, abs, mse or full) rather than the k1 value the core passes."""

    def __init__(self, inner):
        self.inner = inner
        self.current: float | None = None  # set by LegacyEngine.compute_rewards for the coming update

    @property
    def value(self) -> float:
        """The current coefficient."""
        return self.inner.value

    @value.setter
    def value(self, value: float) -> None:
        self.inner.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update the wrapped controller with the configured estimator's KL (when known)."""
        self.inner.update(current_kl if self.current is None else self.current, n_steps)

    def state_dict(self) -> dict:
        """The wrapped controller's state."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the wrapped controller's state."""
        self.inner.load_state_dict(state)


class LegacyEngine(CorePPOTrainer):
    """:class:`tether.trainers.ppo.PPOTrainer` with TRL 0.11's update rules (see the module docstring).

    Args:
        legacy: the user's ``PPOConfig``, read at each step (``early_stopping``, ``target_kl``,
            ``ratio_threshold``).
        run_config, actor_critic, reference, tokenizer: as for the core trainer.
        optimizer: the user's optimizer; None keeps the core's Adam (TRL's default, at ``learning_rate``).
    """

    def __init__(self, legacy, run_config, actor_critic, reference, tokenizer, optimizer=None):
        super().__init__(run_config, actor_critic, reference, tokenizer, _user_scores_only, optimizer=optimizer)
        self.legacy = legacy
        self.kl_ctl = EstimatorKLController(self.kl_ctl)
        self.full_kl: torch.Tensor | None = None  # (B, T), set before step() when kl_penalty="full"
        self.ratios: list[torch.Tensor] = []  # every response token's ratio in the last step's updates
        self.epochs_run = 0
        self.last_policykl = 0.0  # the policy KL (k1, old -> new) of the last micro-batch, for early_stopping
        self._lr_scale_applied = 1.0

    def compute_rewards(self, rollout: Rollout) -> Rollout:
        """The core's scores and shaped rewards; with ``kl_penalty="full"`` the KL is :attr:`full_kl` instead."""
        rollout = super().compute_rewards(rollout)
        if self.full_kl is not None:
            mask = rollout.response_mask.float()
            kl = self.full_kl * mask
            rewards, _ = shape_rewards(rollout.scores, kl, mask, self.kl_ctl.value)
            if self.cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            rollout = replace(rollout, kl=kl, rewards=rewards)
        self.kl_ctl.current = rollout.kl.sum(-1).mean().item()
        return rollout

    def optimize(self, rollout: Rollout) -> dict[str, float]:
        """TRL's PPO epochs: random minibatches of ``backward_batch_size`` rows, one optimizer step each, at the
        optimizer's own learning rate; with ``early_stopping`` the epochs stop once an epoch's last micro-batch
        has policy KL > 1.5 * ``target_kl``. Non-finite minibatches are skipped as in the core."""
        self._apply_lr_scale()
        self.ratios, self.epochs_run = [], 0
        return super().optimize(rollout) | {"ppo/epochs": self.epochs_run}

    def scheduled_lr(self) -> None:
        """The optimizer's own learning rate (the user's, and their ``lr_scheduler``'s): tether sets none."""
        return None

    def stop_epochs(self) -> bool:
        """TRL's ``early_stopping``: the epoch's last micro-batch had policy KL > 1.5 * ``target_kl``."""
        self.epochs_run += 1
        if self.legacy.early_stopping and self.last_policykl > 1.5 * self.legacy.target_kl:
            self.optimizer.zero_grad(set_to_none=True)
            return True
        return False

    def _apply_lr_scale(self) -> None:
        """A ``kl_stop_action="rollback"`` lowers the learning rate: scale the optimizer's groups by the change."""
        if self.lr_scale != self._lr_scale_applied:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.lr_scale / self._lr_scale_applied
            self._lr_scale_applied = self.lr_scale

    def loss_weight(self, new_logprobs, micro: Rollout) -> float:
        """A minibatch (TRL's name for the micro-batch) whose mean ratio exceeds ``ratio_threshold`` contributes a
        zero loss, as TRL did."""
        mask = micro.response_mask.float()
        with torch.no_grad():
            mean_ratio = masked_mean(torch.exp((new_logprobs - micro.logprobs) * mask), mask).item()
        if mean_ratio > self.legacy.ratio_threshold:
            warnings.warn(
                f"PPOTrainer.step: the mean ratio of a minibatch ({mean_ratio:.2f}) exceeds ratio_threshold "
                f"{self.legacy.ratio_threshold:.2f}; skipping it (zero loss), as TRL did",
                stacklevel=3,
            )
            return 0.0
        return 1.0

    def micro_extras(self, new_logprobs, new_values, micro: Rollout) -> dict[str, float]:
        """TRL's update statistics of a micro-batch; keeps its ratios and policy KL for ``step`` and early stopping."""
        mask = micro.response_mask.float()
        log_ratio = (new_logprobs - micro.logprobs) * mask
        self.ratios.append(torch.exp(log_ratio)[mask.bool()].cpu())
        self.last_policykl = masked_mean(-log_ratio, mask).item()
        return {
            "trl/policykl": self.last_policykl,
            "trl/approxkl": 0.5 * masked_mean(log_ratio**2, mask).item(),
            "trl/vpred": masked_mean(new_values.float(), mask).item(),
            "trl/val_mean": masked_mean(micro.values, mask).item(),
            "trl/val_var": masked_var(micro.values, mask, unbiased=bool(mask.sum() > 1)).item(),
        }


@torch.no_grad()
def full_kl(actor_critic, reference, rollout: Rollout, chunk: int, autocast, fill_id: int) -> torch.Tensor:
    """KL(pi || pi_ref) over the whole vocabulary at each response position, (B, T), zero on padding: TRL's
    ``kl_penalty="full"``, ``sum_v pi(v) (log pi(v) - log pi_ref(v))``, at temperature 1."""
    prompt_length, out = rollout.prompt_ids.shape[1], []
    was_training = actor_critic.training
    actor_critic.eval()
    for start in range(0, len(rollout), chunk):
        ids = rollout.sequence_ids[start : start + chunk]
        mask = rollout.attention_mask[start : start + chunk]
        with autocast():
            logits = response_logits(actor_critic.policy, ids, mask, prompt_length, 1.0, fill_id)
            ref_logits = response_logits(reference, ids, mask, prompt_length, 1.0, fill_id)
        logp, ref_logp = F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1)
        out.append((logp.exp() * (logp - ref_logp)).sum(-1))
    actor_critic.train(was_training)
    return torch.cat(out) * rollout.response_mask.float()
