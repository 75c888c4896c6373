"""Step 4 of PPO, the update: ``ppo_epochs`` passes over the rollout in minibatches, each one optimizer step over
its micro-batches' forwards and backwards (docs/algorithm.md, "4. Update").

A mixin of :class:`tether.trainers.ppo.PPOTrainer`: the methods read the trainer's models, optimizer, config and
guards; the maths is :mod:`tether.algo`'s. The legacy trainer overrides :meth:`PPOUpdate.loss_weight`,
:meth:`PPOUpdate.micro_extras` and :meth:`PPOUpdate.stop_epochs`.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch

from tether import distributed
from tether.algo import logprobs_and_entropy, masked_mean, ppo_policy_loss, ppo_value_loss
from tether.models import compiled_trunks, gather_ids, response_logits
from tether.trainers.common import batches, lr_factor, set_lr
from tether.types import Rollout


class PPOUpdate:
    """The update's methods (the trainer holds ``cfg``, ``model``, ``actor_critic``, ``optimizer``, ``guards``)."""

    def optimize(self, rollout: Rollout) -> dict[str, float]:
        """ppo_epochs passes over the rollout in random minibatches; one optimizer step per minibatch.

        A minibatch whose loss or gradient is not finite is skipped (nothing applied) and counted in
        ``guard/skipped_steps``; ``ppo.max_bad_steps`` of them in a row trigger the guards' restore.
        """
        sums, weights = defaultdict(float), defaultdict(float)
        prompt_length, skipped, lr = rollout.prompt_ids.shape[1], 0, None
        with self.compiled():
            for _epoch in range(self.cfg.ppo_epochs):
                for mb_index in batches(len(rollout), self.cfg.mini_batch_size, self.generator):
                    done, lr = self.minibatch_step(rollout.select(mb_index.to(self.device)), prompt_length)
                    if done is None:
                        skipped += 1
                        continue
                    for k, (total, weight) in done.items():
                        sums[k] += total
                        weights[k] += weight
                if self.stop_epochs():
                    break
        self.optimizer.zero_grad(set_to_none=True)  # the last step's gradients: their memory is the rollout's
        stats = {k: sums[k] / max(weights[k], 1e-12) for k in sums}
        lr = self.optimizer.param_groups[0]["lr"] if lr is None else lr
        return stats | {"ppo/lr": lr, "guard/skipped_steps": skipped}

    def compiled(self):
        """``model.compile``: the policy's and a separate critic's trunks through ``torch.compile`` for the update."""
        if not self.config.model.compile:
            return contextlib.nullcontext()
        cache = self.__dict__.setdefault("compiled_forwards", {})
        return compiled_trunks([self.actor_critic.policy, self.actor_critic.critic], cache)

    def minibatch_step(self, mb: Rollout, prompt_length: int) -> tuple[dict | None, float | None]:
        """The micro-batches' forwards and backwards, gradient clipping and one optimizer step: ``({metric: (sum,
        weight)}, lr)``, or ``(None, lr)`` when the loss or gradient is not finite and nothing was applied.

        On several processes each takes its block of the minibatch; the losses are normalised by the whole
        minibatch's token count and the statistics summed over the processes."""
        num_tokens = mb.response_mask.sum().clamp(min=1).float()
        rows = range(len(mb))[distributed.shard(len(mb))]
        self.optimizer.zero_grad(set_to_none=True)
        sums, weights = defaultdict(float), defaultdict(float)
        for start in range(rows.start, rows.stop, self.micro_batch_size):
            micro = mb.select(torch.arange(start, min(start + self.micro_batch_size, rows.stop), device=self.device))
            n = micro.response_mask.sum().item()
            last = start + self.micro_batch_size >= rows.stop
            with distributed.gradient_sync(self.model, last):  # DDP syncs gradients on the last micro-batch only
                micro_stats = self.micro_step(micro, prompt_length, num_tokens)
            for k, v in micro_stats.items():
                sums[k] += v * n
                weights[k] += n
        sums, weights = self.global_sums(sums, weights)
        grad_norm = self.clip_gradients()
        lr = self.scheduled_lr()
        self.update_index += 1
        if not (math.isfinite(sums["loss/total"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)  # skip: nothing of this minibatch is applied
            self.guards.bad_steps += 1
            return None, lr
        self.guards.bad_steps = 0
        sums["ppo/grad_norm"], weights["ppo/grad_norm"] = grad_norm, 1
        if lr is not None:
            set_lr(self.optimizer, lr)
        self.optimizer.step()
        return {k: (sums[k], weights[k]) for k in sums}, lr

    @staticmethod
    def global_sums(sums: dict, weights: dict) -> tuple[dict, dict]:
        """The micro-batch statistics' (sums, weights) over every process (one all-reduce)."""
        if distributed.world_size() == 1:
            return sums, weights
        both = distributed.sum_floats({**{f"s{k}": v for k, v in sums.items()}, **{f"w{k}": weights[k] for k in sums}})
        return {k: both[f"s{k}"] for k in sums}, {k: both[f"w{k}"] for k in sums}

    def scheduled_lr(self) -> float | None:
        """The learning rate of the coming optimizer step (``ppo.lr_schedule``); None leaves the optimizer's own."""
        return self.cfg.lr * self.lr_scale * lr_factor(self.cfg.lr_schedule, self.update_index, self.total_updates)

    def stop_epochs(self) -> bool:
        """Whether to end the PPO epochs early, after each epoch (never here; the legacy trainer's early_stopping)."""
        return False

    def micro_step(self, micro: Rollout, prompt_length: int, num_tokens: torch.Tensor) -> dict[str, float]:
        """Forward + backward of one micro-batch; the losses are normalised by the minibatch's token count.

        A separate critic on one process is run after the policy's backward (:meth:`split_backward`): the two losses
        touch disjoint weights, so the gradients are those of their sum, and the policy's activations are freed
        before the critic's are made: one model's graph alive instead of two (SmolLM2, 8 x 64 tokens: 1.2 of 2.4 GiB;
        on the CPU glibc's reuse of freed memory hides most of it in the process's peak RSS, 6.61 against 6.64)."""
        split, world = self.split_backward, distributed.world_size()
        args = (micro.sequence_ids, micro.attention_mask, prompt_length)
        with self.placement.autocast():  # the forward (and so its backward) in bf16; logits and values in float32
            if split:
                logits = response_logits(self.actor_critic.policy, *args, self.sampling.temperature, self.fill_id)
            else:
                logits, new_values = self.model(*args, self.sampling.temperature, self.fill_id)
        mask = micro.response_mask.float()
        new_logprobs, entropy = logprobs_and_entropy(logits, gather_ids(micro.response_ids, mask, self.fill_id))
        del logits  # (B, T, V): the graph keeps it only until the policy's backward
        pg_loss, pg_stats = ppo_policy_loss(
            new_logprobs, micro.logprobs, micro.advantages, mask, self.cfg.clip_range, loss_denominator=num_tokens
        )
        weight = self.loss_weight(new_logprobs, micro)
        pg_loss = pg_loss * weight
        if split:
            (pg_loss * world).backward()  # frees the policy's graph before the critic's forward
            with self.placement.autocast():
                new_values = self.actor_critic.values(*args, self.fill_id, None)
        vf_loss, vf_stats = ppo_value_loss(
            new_values, micro.values, micro.returns, mask, self.cfg.value_clip_range, loss_denominator=num_tokens
        )
        vf_loss = vf_loss * weight
        loss = pg_loss + self.cfg.vf_coef * vf_loss
        ((self.cfg.vf_coef * vf_loss if split else loss) * world).backward()  # DDP averages over the processes
        with torch.no_grad():
            entropy = masked_mean(entropy, mask)
            extra = self.micro_extras(new_logprobs, new_values, micro)
        scale = num_tokens.item() / max(mask.sum().item(), 1.0)  # per-token means of this micro-batch
        return {
            "loss/policy": pg_loss.item() * scale,
            "loss/value": vf_loss.item() * scale,
            "loss/total": loss.item() * scale,
            "ppo/entropy": entropy.item(),
            **{f"ppo/{k}": v.item() for k, v in pg_stats.items()},
            **{f"ppo/{k}": v.item() for k, v in vf_stats.items() if k != "value_mean"},
            "ppo/vpred_mean": vf_stats["value_mean"].item(),
            **extra,
        }

    @property
    def split_backward(self) -> bool:
        """Whether the policy's and a separate critic's backward passes run one after the other: on one process only
        (DDP and FSDP expect one backward per forward of the module they wrap)."""
        return self.actor_critic.critic is not None and distributed.world_size() == 1

    @property
    def fill_id(self) -> int:
        """The token id that stands in for padding in model inputs."""
        return self.tokenizer.eos_token_id

    def loss_weight(self, new_logprobs, micro: Rollout) -> float:
        """The weight of the micro-batch's losses (1 here; the legacy trainer zeroes a minibatch as TRL did)."""
        return 1.0

    def micro_extras(self, new_logprobs, new_values, micro: Rollout) -> dict[str, float]:
        """More statistics of a micro-batch (none here; the legacy trainer adds TRL's)."""
        return {}

    def clip_gradients(self) -> float:
        params = [p for p in self.actor_critic.parameters() if p.grad is not None]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        return distributed.clip_grad_norm(params, max_norm)
