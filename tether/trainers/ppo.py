"""PPO for RLHF: the loop of the tutorial's flow chart, one numbered step per call (docs/algorithm.md).

1. rollout     sample responses from pi_theta; old log-probs, reference log-probs, values   (tether.rollout)
2. reward      score each response; per-token KL penalty to the reference; shaped rewards (tether.algo)
3. advantages  GAE on the value baseline, then whitening                                    (tether.algo)
4. update      ppo_epochs x minibatches of clipped policy loss + value loss, grad clipping (tether.algo)
5. control     adapt the KL coefficient; log metrics; checkpoint
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from tether.algo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    shape_rewards,
)
from tether.checkpoint import save_checkpoint, step_dir
from tether.config import RunConfig
from tether.data import prompt_batch
from tether.errors import TetherError
from tether.models import (
    ActorCritic,
    freeze,
    gather_ids,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    new_scalar_model,
    reference_copy,
    resolve_device,
)
from tether.rewards import FunctionScorer, RewardModelScorer, RunningMoments, load_reward_function, transform_scores
from tether.rollout import Sampling, collect_rollout
from tether.trainers.common import batches, lr_factor, progress, set_lr
from tether.tracking import MetricLogger
from tether.types import Rollout


class PPOTrainer:
    """Holds the models, optimizer and KL controller, and runs PPO iterations.

    Args:
        config: the run configuration (``config.ppo`` and ``config.sampling`` are read here).
        actor_critic: the policy and its value model (trained).
        reference: the frozen reference policy.
        tokenizer: the policy's tokenizer (pad distinct from EOS).
        scorer: ``scorer(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer=...) -> (B,) scores``.
    """

    def __init__(self, config: RunConfig, actor_critic: ActorCritic, reference, tokenizer, scorer):
        self.config, self.cfg = config, config.ppo
        self.device = resolve_device(config.model.device)
        self.actor_critic = actor_critic.to(self.device).train()
        self.reference = reference.to(self.device).eval()
        self.tokenizer, self.scorer = tokenizer, scorer
        params = [p for p in actor_critic.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=self.cfg.lr, eps=self.cfg.adam_eps)
        if self.cfg.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(self.cfg.kl_coef, self.cfg.kl_target, self.cfg.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(self.cfg.kl_coef)
        self.moments = RunningMoments()
        self.sampling = Sampling(
            config.sampling.max_new_tokens, config.sampling.temperature, config.sampling.top_p, config.sampling.top_k
        )
        self.micro_batch_size = self.cfg.micro_batch_size or self.cfg.mini_batch_size
        self.updates_per_step = self.cfg.ppo_epochs * (self.cfg.rollout_batch_size // self.cfg.mini_batch_size)
        self.iteration = 0
        self.update_index = 0
        self.generator = torch.Generator().manual_seed(config.seed)

    # ---- step 1 -----------------------------------------------------------------------------------------------
    def rollout(self, prompts: list[str]) -> Rollout:
        """Sample one response per prompt with the current policy (no gradients)."""
        prompt_ids, prompt_mask = prompt_batch(self.tokenizer, prompts, self.config.sampling.max_prompt_length)
        return collect_rollout(
            self.actor_critic,
            self.reference,
            self.scorer,
            self.tokenizer,
            prompt_ids.to(self.device),
            prompt_mask.to(self.device),
            self.sampling,
            chunk=self.micro_batch_size,
        )

    # ---- step 2 -----------------------------------------------------------------------------------------------
    def compute_rewards(self, rollout: Rollout) -> Rollout:
        """Scores after penalties/scaling, per-token KL to the reference, and the shaped per-token rewards."""
        mask = rollout.response_mask.float()
        scores = transform_scores(
            rollout.raw_scores,
            rollout.ended,
            mask.sum(-1),
            missing_eos_penalty=self.cfg.missing_eos_penalty,
            length_penalty=self.cfg.length_penalty,
            score_norm=self.cfg.score_norm,
            score_clip=self.cfg.score_clip,
            moments=self.moments,
        )
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, self.cfg.kl_estimator) * mask
        rewards, _ = shape_rewards(scores, kl, mask, self.kl_ctl.value)
        if self.cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        return replace(rollout, scores=scores, kl=kl, rewards=rewards)

    # ---- step 3 -----------------------------------------------------------------------------------------------
    def compute_advantages(self, rollout: Rollout) -> Rollout:
        """GAE advantages and returns from the rollout-time values; advantages whitened over response tokens."""
        mask = rollout.response_mask.float()
        advantages, returns = compute_gae(rollout.rewards, rollout.values, mask, self.cfg.gamma, self.cfg.gae_lambda)
        if self.cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return replace(rollout, advantages=advantages, returns=returns)

    # ---- step 4 -----------------------------------------------------------------------------------------------
    def optimize(self, rollout: Rollout) -> dict[str, float]:
        """ppo_epochs passes over the rollout in random minibatches; one optimizer step per minibatch."""
        sums, weights = defaultdict(float), defaultdict(float)
        prompt_length = rollout.prompt_ids.shape[1]
        for _epoch in range(self.cfg.ppo_epochs):
            for mb_index in batches(len(rollout), self.cfg.mini_batch_size, self.generator):
                mb = rollout.select(mb_index.to(self.device))
                num_tokens = mb.response_mask.sum().clamp(min=1).float()
                self.optimizer.zero_grad(set_to_none=True)
                for start in range(0, len(mb), self.micro_batch_size):
                    micro = mb.select(
                        torch.arange(start, min(start + self.micro_batch_size, len(mb)), device=self.device)
                    )
                    stats = self.micro_step(micro, prompt_length, num_tokens)
                    n = micro.response_mask.sum().item()
                    for k, v in stats.items():
                        sums[k] += v * n
                        weights[k] += n
                grad_norm = self.clip_gradients()
                sums["ppo/grad_norm"] += grad_norm
                weights["ppo/grad_norm"] += 1
                lr = self.cfg.lr * lr_factor(self.cfg.lr_schedule, self.update_index, self.total_updates)
                set_lr(self.optimizer, lr)
                self.optimizer.step()
                self.update_index += 1
        return {k: sums[k] / max(weights[k], 1e-12) for k in sums} | {"ppo/lr": lr}

    def micro_step(self, micro: Rollout, prompt_length: int, num_tokens: torch.Tensor) -> dict[str, float]:
        """Forward + backward of one micro-batch; the losses are normalised by the minibatch's token count."""
        logits, new_values = self.actor_critic(
            micro.sequence_ids,
            micro.attention_mask,
            prompt_length,
            self.sampling.temperature,
            self.tokenizer.eos_token_id,
        )
        mask = micro.response_mask.float()
        new_logprobs = logprobs_from_logits(logits, gather_ids(micro.response_ids, mask, self.tokenizer.eos_token_id))
        pg_loss, pg_stats = ppo_policy_loss(
            new_logprobs, micro.logprobs, micro.advantages, mask, self.cfg.clip_range, loss_denominator=num_tokens
        )
        vf_loss, vf_stats = ppo_value_loss(
            new_values, micro.values, micro.returns, mask, self.cfg.value_clip_range, loss_denominator=num_tokens
        )
        loss = pg_loss + self.cfg.vf_coef * vf_loss
        loss.backward()
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask)
        scale = num_tokens.item() / max(mask.sum().item(), 1.0)  # per-token means of this micro-batch
        return {
            "loss/policy": pg_loss.item() * scale,
            "loss/value": vf_loss.item() * scale,
            "loss/total": loss.item() * scale,
            "ppo/entropy": entropy.item(),
            **{f"ppo/{k}": v.item() for k, v in pg_stats.items()},
            **{f"ppo/{k}": v.item() for k, v in vf_stats.items() if k != "value_mean"},
            "ppo/vpred_mean": vf_stats["value_mean"].item(),
        }

    def clip_gradients(self) -> float:
        params = [p for p in self.actor_critic.parameters() if p.grad is not None]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()

    @property
    def total_updates(self) -> int:
        return self.cfg.steps * self.updates_per_step

    # ---- steps 2-5 on a given rollout ---------------------------------------------------------------------------
    def step(self, rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
        """One PPO iteration on a collected rollout: steps 2 to 5. Returns the completed rollout and its stats."""
        timings = {}
        t = time.perf_counter()
        # 2. reward: score, per-token KL penalty to the reference, shaped rewards
        rollout = self.compute_rewards(rollout)
        timings["time/reward"] = time.perf_counter() - t
        # 3. advantages: GAE with the value baseline
        t = time.perf_counter()
        rollout = self.compute_advantages(rollout)
        timings["time/advantage"] = time.perf_counter() - t
        # 4. update: ppo_epochs x minibatches of the clipped objective and the value loss
        t = time.perf_counter()
        update_stats = self.optimize(rollout)
        timings["time/update"] = time.perf_counter() - t
        # 5. control: adapt the KL coefficient to the rollout's KL (after the update, as in Ziegler et al.)
        stats = {**rollout_stats(rollout, self.kl_ctl.value), **update_stats, **timings}
        self.kl_ctl.update(stats["kl/ref"], len(rollout))
        self.iteration += 1
        return rollout, stats

    def train(self, prompts: list[str], run_dir: Path, echo=print, on_step=None) -> dict[str, float]:
        """Run ``config.ppo.steps`` iterations over ``prompts``; metrics to ``run_dir``; returns the last stats."""
        logger = MetricLogger.from_config(run_dir, self.config, echo)
        bar = progress(self.cfg.steps, "ppo")
        order = []
        stats = {}
        while self.iteration < self.cfg.steps:
            t0 = time.perf_counter()
            while len(order) < self.cfg.rollout_batch_size:  # epochs over the prompts, each freshly shuffled
                order += torch.randperm(len(prompts), generator=self.generator).tolist()
            batch, order = (
                [prompts[i] for i in order[: self.cfg.rollout_batch_size]],
                order[self.cfg.rollout_batch_size :],
            )
            # 1. rollout: sample responses; old log-probs, reference log-probs, values, raw scores
            rollout = self.rollout(batch)
            t_rollout = time.perf_counter() - t0
            # 2-5. reward, advantages, update, KL control
            rollout, stats = self.step(rollout)
            stats["time/rollout"] = t_rollout
            stats["time/step"] = time.perf_counter() - t0
            stats["perf/tokens_per_sec"] = rollout.response_mask.sum().item() / stats["time/step"]
            if on_step is not None:
                stats.update(on_step(self, rollout) or {})
            logger.log(stats, self.iteration)
            bar.update(1)
            if self.cfg.save_every and self.iteration % self.cfg.save_every == 0:
                self.save(run_dir / "checkpoints")
        bar.close()
        logger.close()
        return stats

    @classmethod
    def from_config(cls, config: RunConfig) -> PPOTrainer:
        """Load policy, reference, value model and reward (model or function) as ``config.model`` names them."""
        m = config.model
        policy = load_causal_lm(m.policy, m.dtype, m.trust_remote_code)
        tokenizer = load_tokenizer(m.tokenizer or m.policy, m.trust_remote_code)
        if m.lora_r > 0:  # LoRA: the reference is the same weights with the adapter switched off (no second copy)
            from tether.models import AdapterDisabledReference, add_lora

            policy = add_lora(policy, m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
            reference = AdapterDisabledReference(policy)
        else:
            reference = reference_copy(policy)
        if not m.reward_model:
            raise TetherError("model.reward_model: give a reward model folder or a 'module:function' reward function")
        if Path(m.reward_model).is_dir():
            reward_model = freeze(load_reward_model(m.reward_model, m.dtype, m.trust_remote_code))
            rm_tokenizer = None  # a folder without tokenizer files shares the policy's tokenizer
            if any((Path(m.reward_model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                rm_tokenizer = load_tokenizer(m.reward_model, m.trust_remote_code)
                rm_tokenizer = None if rm_tokenizer.get_vocab() == tokenizer.get_vocab() else rm_tokenizer
            scorer = RewardModelScorer(reward_model, tokenizer.eos_token_id, rm_tokenizer)
        elif ":" in m.reward_model:
            scorer = FunctionScorer(load_reward_function(m.reward_model), m.reward_model)
        else:
            raise TetherError(f"model.reward_model '{m.reward_model}': no such folder (or 'module:function')")
        critic = None
        if m.value_model == "separate":
            init = m.value_init or (m.reward_model if isinstance(scorer, RewardModelScorer) else m.policy)
            if init == m.reward_model:  # critic starts as the reward model, head included (N+ detail 22)
                critic = load_reward_model(init, m.dtype, m.trust_remote_code)
            else:
                critic = new_scalar_model(init, m.dtype, m.trust_remote_code)
        return cls(config, ActorCritic(policy, critic), reference, tokenizer, scorer)

    def save(self, root: Path) -> Path:
        """A full checkpoint of this iteration (policy, value model, optimizer, controller, RNG)."""
        state = {
            "iteration": self.iteration,
            "update_index": self.update_index,
            "kl_ctl": self.kl_ctl.state_dict(),
            "moments": self.moments.state_dict(),
        }
        return save_checkpoint(
            step_dir(root, self.iteration), self.actor_critic, self.tokenizer, self.optimizer, state
        )


def rollout_stats(rollout: Rollout, kl_coef: float) -> dict[str, float]:
    """The monitoring metrics of a completed rollout (see docs/metrics.md)."""
    mask = rollout.response_mask.float()
    k1 = (rollout.logprobs - rollout.ref_logprobs) * mask
    lengths = mask.sum(-1)
    non_score = -kl_coef * rollout.kl.sum(-1)
    return {
        "reward/score": rollout.raw_scores.mean().item(),
        "reward/score_std": rollout.raw_scores.std(unbiased=False).item(),
        "reward/scaled": rollout.scores.mean().item(),
        "reward/non_score": non_score.mean().item(),
        "reward/total": (rollout.scores + non_score).mean().item(),
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
