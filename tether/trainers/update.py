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
from tether.passes import compiled_trunks, gather_ids, response_logits
from tether.trainers.common import batches, lr_factor, set_lr, side_by_side
from tether.types import Rollout, length_groups


PARALLEL_BELOW = 50_000_000  # a critic of more parameters keeps the passes in turn: for SmolLM2 (135M) side by side
# was 3% faster and held 0.9 GiB more (both models' gradients at once); for a 3.4M GPT-2, 13-16% faster


class PPOUpdate:
    """The update's methods (the trainer holds ``cfg``, ``model``, ``actor_critic``, ``optimizer``, ``guards``)."""

    def optimize(self, rollout: Rollout) -> dict[str, float]:
        """ppo_epochs passes over the rollout in random minibatches; one optimizer step per minibatch.

        A minibatch whose loss or gradient is not finite is skipped (nothing applied) and counted in
        ``guard/skipped_steps``; ``ppo.max_bad_steps`` of them in a row trigger the guards' restore.
        """
        sums, weights = defaultdict(float), defaultdict(float)
        skipped, lr = 0, None
        with self.compiled():
            for _epoch in range(self.cfg.ppo_epochs):
                for mb_index in batches(len(rollout), self.cfg.mini_batch_size, self.generator):
                    done, lr = self.minibatch_step(rollout.select(mb_index.to(self.device)))
                    if done is None:
                        skipped += 1
                        continue
                    for k, (total, weight) in done.items():
                        sums[k] += total
                        weights[k] += weight
                if self.stop_epochs():
                    break
        stats = {k: sums[k] / max(weights[k], 1e-12) for k in sums}
        lr = self.optimizer.param_groups[0]["lr"] if lr is None else lr
        return stats | {"ppo/lr": lr, "guard/skipped_steps": skipped}

    def compiled(self):
        """``model.compile``: the policy's and a separate critic's trunks through ``torch.compile`` for the update."""
        if not self.config.model.compile:
            return contextlib.nullcontext()
        cache = self.__dict__.setdefault("compiled_forwards", {})
        return compiled_trunks([self.actor_critic.policy, self.actor_critic.critic], cache)

    def minibatch_step(self, mb: Rollout) -> tuple[dict | None, float | None]:
        """The micro-batches' forwards and backwards, gradient clipping and one optimizer step: ``({metric: (sum,
        weight)}, lr)``, or ``(None, lr)`` when a loss or gradient is not finite.

        With a separate critic on one process (:attr:`split_update`) the policy's and the critic's passes run on
        their own: one after the other, each followed by its step, so that one model's gradients are alive at a
        time; or, with :attr:`parallel_critic`, side by side on two CPU threads, then one step. The models share no
        weight and Adam works per weight, so the weights are those of one step either way (tested). A pass whose
        loss or gradient is not finite applies nothing. On several processes each takes its block of the
        minibatch; the losses are normalised by the whole minibatch's token count and the statistics summed over
        the processes."""
        num_tokens = mb.response_mask.sum().clamp(min=1).float()
        lr = self.scheduled_lr()
        self.update_index += 1
        if lr is not None:
            set_lr(self.optimizer, lr)
        sums, weights, finite = defaultdict(float), defaultdict(float), True
        micro_batches = list(self.micro_batches(mb))  # once for both passes: the masks are read back once
        self.optimizer.zero_grad(set_to_none=True)
        for parts in self.update_passes():
            done = self.accumulate_parts(micro_batches, num_tokens, parts)
            norms = self.clip_gradients()
            for part, (part_sums, part_weights) in zip(parts, done):
                if not self.part_is_finite(part, part_sums, norms):
                    self.drop_gradients(part)  # nothing of this pass is applied
                    finite = False
                sums |= part_sums
                weights |= part_weights
            self.optimizer.step()  # the weights with a gradient: this pass's model(s)
            self.optimizer.zero_grad(set_to_none=True)  # freed for the next pass, and the rollout after the update
            sums |= norms
            weights |= dict.fromkeys(norms, 1)
        if not finite:
            self.guards.bad_steps += 1
            return None, lr
        self.guards.bad_steps = 0
        if "loss/total" not in sums:
            sums["loss/total"] = sums["loss/policy"] + self.cfg.vf_coef * sums["loss/value"]
            weights["loss/total"] = weights["loss/policy"]
        return {k: (sums[k], weights[k]) for k in sums}, lr

    def update_passes(self) -> tuple[tuple[str | None, ...], ...]:
        """The minibatch's backward passes, each a tuple of the parts it runs at once (:meth:`micro_step`'s
        ``part``): one joint pass, the policy's then the critic's, or both side by side."""
        if not self.split_update:
            return ((None,),)
        return (("policy", "critic"),) if self.parallel_critic else (("policy",), ("critic",))

    def accumulate_parts(self, micro_batches: list, num_tokens, parts: tuple) -> list[tuple[dict, dict]]:
        """:meth:`accumulate` for each of ``parts``; two of them side by side, one per CPU thread."""
        if len(parts) == 1:
            return [self.accumulate(micro_batches, num_tokens, parts[0])]
        policy, critic = parts
        return list(
            side_by_side(
                lambda: self.accumulate(micro_batches, num_tokens, policy),
                lambda: self.accumulate(micro_batches, num_tokens, critic),
            )
        )

    @staticmethod
    def part_is_finite(part: str | None, sums: dict, norms: dict) -> bool:
        """Whether a pass's losses and its model's gradient norm are finite."""
        norm_keys = {"policy": ["ppo/grad_norm"], "critic": ["ppo/critic_grad_norm"]}.get(part, list(norms))
        values = [v for k, v in sums.items() if k.startswith("loss/")] + [norms[k] for k in norm_keys if k in norms]
        return all(math.isfinite(v) for v in values)

    def drop_gradients(self, part: str | None) -> None:
        """Free the gradients of ``part``'s model (every gradient for the joint pass): the step leaves it as is."""
        if part is None:
            self.optimizer.zero_grad(set_to_none=True)
            return
        critic = {id(p) for p in self.actor_critic.critic.parameters()}
        for p in self.actor_critic.parameters():
            if (id(p) in critic) == (part == "critic"):
                p.grad = None

    def accumulate(self, micro_batches: list, num_tokens, part: str | None) -> tuple[dict, dict]:
        """This process's ``(micro-batch, is_last)`` pairs (:meth:`micro_batches`) forward and backward for ``part``
        (:meth:`micro_step`), the gradients accumulated: their statistics' (sums, weights) over every process."""
        sums, weights = defaultdict(float), defaultdict(float)
        for micro, last in micro_batches:
            n = micro.response_mask.sum()
            with distributed.gradient_sync(self.model, last):  # DDP syncs gradients on the last micro-batch only
                micro_stats = self.micro_step(micro, num_tokens, part)
            for k, v in micro_stats.items():
                sums[k] += v * n
                weights[k] += n
        # read back once, after every backward is queued: a read before a backward would stall a GPU's queue
        return self.global_sums({k: float(v) for k, v in sums.items()}, {k: float(v) for k, v in weights.items()})

    def micro_batches(self, mb: Rollout):
        """``(micro-batch, is_last)`` pairs over this process's rows of ``mb``: ``micro_batch_size`` of them at a time
        in order of length, each without the columns that are padding in all its rows (:func:`types.length_groups`,
        :meth:`Rollout.trimmed`). A minibatch's gradient is the sum over its micro-batches, whatever the grouping."""
        rows = range(len(mb))[distributed.shard(len(mb))]
        mine = slice(rows.start, rows.stop)
        groups = list(length_groups(mb.prompt_mask[mine], mb.response_mask[mine], self.micro_batch_size))
        for n, (index, span) in enumerate(groups, 1):
            yield mb.select((index + rows.start).to(self.device)).trimmed(span), n == len(groups)

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

    def micro_step(self, micro: Rollout, num_tokens: torch.Tensor, part=None) -> dict:
        """Forward + backward of one micro-batch; the losses are normalised by the minibatch's token count. Its
        statistics stay 0-d tensors on the device (no wait for the device between micro-batches).

        ``part``: None for both losses in one backward; "policy" or "critic" for that model's loss alone (a separate
        critic's pass, :meth:`minibatch_step`). The legacy trainer's hooks (:meth:`loss_weight`,
        :meth:`micro_extras`) see the policy's pass and the joint one; its value model is always a head."""
        args = (micro.sequence_ids, micro.attention_mask, micro.prompt_ids.shape[1])
        mask = micro.response_mask.float()
        scale = num_tokens / mask.sum().clamp(min=1.0)  # per-token means of this micro-batch
        stats, loss, weight = {}, 0.0, 1.0
        if part != "critic":
            with self.placement.autocast():  # the forward (and so its backward) in bf16; values in float32
                if part == "policy":
                    logits = response_logits(self.actor_critic.policy, *args, self.sampling.temperature, self.fill_id)
                else:
                    logits, new_values = self.model(*args, self.sampling.temperature, self.fill_id)
            new_logprobs, entropy = logprobs_and_entropy(logits, gather_ids(micro.response_ids, mask, self.fill_id))
            del logits  # (B, T, V): the graph keeps it only until the backward
            pg_loss, pg_stats = ppo_policy_loss(
                new_logprobs, micro.logprobs, micro.advantages, mask, self.cfg.clip_range, loss_denominator=num_tokens
            )
            weight = self.loss_weight(new_logprobs, micro)
            loss = pg_loss * weight
            with torch.no_grad():
                entropy = masked_mean(entropy, mask)
            stats |= {"loss/policy": loss.detach() * scale, "ppo/entropy": entropy}
            stats |= {f"ppo/{k}": v for k, v in pg_stats.items()}
        if part == "critic":
            with self.placement.autocast():
                new_values = self.actor_critic.values(*args, self.fill_id, None)
        if part != "policy":
            vf_loss, vf_stats = ppo_value_loss(
                new_values, micro.values, micro.returns, mask, self.cfg.value_clip_range, loss_denominator=num_tokens
            )
            vf_loss = vf_loss * weight
            loss = loss + self.cfg.vf_coef * vf_loss
            stats |= {"loss/value": vf_loss.detach() * scale, "ppo/vpred_mean": vf_stats["value_mean"]}
            stats |= {f"ppo/{k}": v for k, v in vf_stats.items() if k != "value_mean"}
        (loss * distributed.world_size()).backward()  # DDP averages over the processes
        if part is None:
            stats["loss/total"] = loss.detach() * scale
            with torch.no_grad():
                stats |= self.micro_extras(new_logprobs, new_values, micro)
        return stats

    @property
    def split_update(self) -> bool:
        """Whether the policy and a separate critic are updated one after the other (:meth:`minibatch_step`): on
        one process only (DDP and FSDP expect one backward per forward of the module they wrap)."""
        return self.actor_critic.critic is not None and distributed.world_size() == 1

    @property
    def parallel_critic(self) -> bool:
        """Whether a split update runs the policy's and the critic's passes side by side (``model.parallel_critic``;
        auto: on a CPU with two or more threads, for models under PARALLEL_BELOW parameters, where one core each does
        more than two cores on each in turn: small multiplies, and time between them that one core cannot fill)."""
        choice = self.config.model.parallel_critic if self.split_update else False
        if choice is not None:
            return choice
        small = sum(p.numel() for p in self.actor_critic.critic.parameters()) < PARALLEL_BELOW
        return self.device.type == "cpu" and torch.get_num_threads() >= 2 and small

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

    def clip_gradients(self) -> dict[str, float]:
        """Clip each trained model's gradient norm to ``ppo.max_grad_norm`` (none: no clipping): the policy's (with
        its value head) and a separate critic's on their own, as separate optimizer engines do (DeepSpeed-Chat,
        OpenRLHF). Returns the norms before clipping of the models that have gradients."""
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        ac, norms = self.actor_critic, {}
        critic = {id(p) for p in ac.critic.parameters()} if ac.critic is not None else set()
        trained = [p for p in ac.parameters() if p.grad is not None]
        for key, params in (
            ("ppo/grad_norm", [p for p in trained if id(p) not in critic]),
            ("ppo/critic_grad_norm", [p for p in trained if id(p) in critic]),
        ):
            if params:
                norms[key] = distributed.clip_grad_norm(params, max_norm)
        return norms
