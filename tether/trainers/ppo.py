"""PPO for RLHF: the loop of the tutorial's flow chart, one numbered step per call (docs/algorithm.md).

1. rollout     sample responses from pi_theta; old log-probs, reference log-probs, values   (tether.rollout)
2. reward      score each response; per-token KL penalty to the reference; shaped rewards (tether.algo)
3. advantages  GAE on the value baseline, then whitening                                    (tether.algo)
4. update      ppo_epochs x minibatches of clipped policy loss + value loss, grad clipping (trainers.update)
5. control     adapt the KL coefficient (fixed, adaptive or threshold)                     (tether.algo)
6. guards      KL limit and non-finite steps restore the last stable checkpoint           (tether.guards)
   alarms      reward-hacking detectors: warn, stop, or roll back to before the alarm     (tether.alarms)
7. checkpoint  every save_every iterations and on SIGINT/SIGTERM; exact resume            (tether.checkpoint)

Steps 6 and 7 act through the trainer's safety rails (tether.trainers.rails).

Under torchrun (docs/scaling.md) each process samples its block of the rollout batch, and the blocks are gathered, so
steps 2, 3, 5 and 6 run on the whole rollout on every process: every statistic is global and every decision the
same. In step 4 every process draws the same minibatches and trains on its block of each, under DDP.
"""

from __future__ import annotations

import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from tether import distributed
from tether.alarms import AlarmState, filler_rate, parse_phrases
from tether.algo import (
    compute_gae,
    kl_controller,
    kl_penalty,
    masked_whiten,
    shape_rewards,
)
from tether.config import RunConfig
from tether.data import prompt_batch
from tether.envs import make_envs
from tether.envs.episodes import collect_episodes, episode_stats
from tether.errors import Interrupted, TetherError
from tether.guards import GuardState, collapse_stats, sanitize_scores
from tether.models import ActorCritic
from tether.offload import Offloaded, evicted, present
from tether.precision import Placement, peak_memory_gib
from tether.metrics import rollout_stats
from tether.rewards import RunningMoments, decode_responses, transform_scores
from tether.rollout import Sampling, collect_rollout, stop_ids
from tether.sampling import Sampler, row_keys, sample
from tether.roles import load_roles, load_sampler
from tether.stages import stage_at, total_updates
from tether.trainers.common import Shown, allocate_adam_state, progress, stop_requests, write_summary
from tether.trainers.rails import SafetyRails
from tether.trainers.update import PPOUpdate
from tether.tracking import MetricLogger, read_metrics
from tether.types import Rollout

SHOWN = (
    Shown("reward/score", "score", "score", trend=True),
    Shown("kl/ref", "kl", "KL to reference"),
    Shown("gold/score", "gold", "gold score", trend=True),  # the demo's gold judge (its on_step), when logged
)
"""What the live bar and the summary line of `tether ppo` show (those logged)."""


def perf_stats(rollout: Rollout, stats: dict, device: torch.device) -> dict[str, float]:
    """Throughput of an iteration: response tokens per second of the whole step and, inside sampling, sampled tokens
    (every row's, up to the longest response) per second of ``time/sample``; and the largest peak memory of any
    process so far."""
    peak_mib = distributed.max_int(round(peak_memory_gib(device) * 1024))
    out = {"perf/tokens_per_sec": rollout.response_mask.sum().item() / stats["time/step"]}
    out["perf/peak_memory_gib"] = peak_mib / 1024
    if stats.get("time/sample"):
        out["perf/sample_tokens_per_sec"] = rollout.response_ids.numel() / stats["time/sample"]
    return out


def gather_rollout(rollout: Rollout, pad_id: int) -> Rollout:
    """The whole rollout batch from every process's block of rows, in row order (responses padded to the longest
    with ``pad_id``, the other per-token fields with 0, as one process pads them); the block itself on one process."""
    if distributed.world_size() == 1:
        return rollout
    tensors = {f.name: getattr(rollout, f.name) for f in fields(rollout)}
    fill = {"response_ids": pad_id}
    return replace(
        rollout,
        **{k: distributed.gather_rows(v, fill.get(k, 0)) for k, v in tensors.items() if isinstance(v, torch.Tensor)},
    )


def check_data_parallel(config: RunConfig) -> None:
    """Under torchrun: the batch sizes split evenly over the processes, no environment (its episodes run on one
    process) and no compiling."""
    distributed.check_divisible("ppo.rollout_batch_size", config.ppo.rollout_batch_size)
    distributed.check_divisible("ppo.mini_batch_size", config.ppo.mini_batch_size)
    if config.ppo.env and distributed.world_size() > 1:
        raise TetherError("ppo.env: multi-turn episodes run on one process; launch tether ppo without torchrun")
    if config.model.compile and distributed.world_size() > 1:
        raise TetherError("model.compile: for one process; under torchrun leave it off")


class PPOTrainer(SafetyRails, PPOUpdate):
    """Holds the models, optimizer and KL controller, and runs PPO iterations.

    Args:
        config: the run configuration (``config.ppo`` and ``config.sampling`` are read here).
        actor_critic: the policy and its value model (trained).
        reference: the frozen reference policy.
        tokenizer: the policy's tokenizer (pad distinct from EOS).
        scorer: ``scorer(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer=..., prompts=...) -> (B,)
            scores`` (``prompts`` as the data gave them).
        placement: where the models live and in which precision; None builds it from ``config.model``. The
            actor-critic is placed as trained and the reference as frozen (both in place).
        gold: a held-out judge, called like ``scorer`` on every rollout and logged as ``gold/score`` (never trained
            on); the proxy-vs-gold alarm watches it.
        optimizer: over the actor-critic's trainable weights; None: Adam at ``ppo.lr`` (on a CPU its state is made
            here, before any activation).
        sampler: what draws the responses (:class:`tether.sampling.Sampler`); None: the one ``sampling.sampler``
            names, or tether's own (:func:`tether.sampling.sample`). Also settable later as ``trainer.sampler``.
    """

    def __init__(
        self,
        config: RunConfig,
        actor_critic: ActorCritic,
        reference,
        tokenizer,
        scorer,
        placement: Placement | None = None,
        gold=None,
        optimizer: torch.optim.Optimizer | None = None,
        sampler: Sampler | None = None,
    ):
        self.config, self.cfg = config, config.ppo
        self.placement = placement or Placement.from_config(config.model)
        self.device = self.placement.device
        self.actor_critic = self.placement.trained(actor_critic, self.cfg.lr).train()
        check_data_parallel(config)
        self.model = distributed.data_parallel(self.actor_critic, config.distributed.strategy)  # runs the update
        self.reference = self.placement.frozen(reference)
        self.tokenizer, self.scorer, self.gold = tokenizer, scorer, gold
        # model.offload_frozen: the frozen roles leave the device for sampling and the update (tether.offload)
        offload = config.model.offload_frozen
        frozen = {"reference": self.reference, "reward": getattr(scorer, "model", None)}
        # each role leaves on its own, so scoring brings back one at a time (the reward model's memory, freed, is
        # the reference's)
        self.scoring_roles = {k: Offloaded([m], keep=self.actor_critic) for k, m in frozen.items()} if offload else {}
        self.gold_role = Offloaded([getattr(gold, "model", None)], keep=self.actor_critic) if offload else None
        self.phrases = parse_phrases(self.cfg.filler_phrases)
        self.stops = stop_ids(tokenizer, actor_critic.policy)  # EOS, and a chat model's end-of-turn tokens
        self.envs = make_envs(self.cfg.env, self.cfg.rollout_batch_size)  # ppo.env: one per rollout row, kept
        self.optimizer = optimizer if optimizer is not None else self.adam(actor_critic)
        self.kl_ctl = kl_controller(self.cfg.kl_control, self.cfg.kl_coef, self.cfg.kl_target, self.cfg.kl_horizon)
        self.moments = RunningMoments()
        self.sampling = Sampling.from_config(config.sampling)
        # what draws the responses: tether's sampler, or an engine's client in its place (sampling.sampler)
        self.sampler: Sampler = sampler or load_sampler(config.sampling.sampler) or sample
        self.micro_batch_size = self.cfg.micro_batch_size or self.cfg.mini_batch_size
        self.iteration = 0
        self.update_index = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.prompt_order: list[int] = []  # the data position: prompt indices still to be drawn this pass
        self.guards = GuardState()
        self.alarms = AlarmState()
        self.stage_index, self.lr_scale = -1, 1.0
        self.saved_at: int | None = None  # iteration of the checkpoint that holds the current weights, if any
        self.events: list[dict] = []  # guard actions and interruptions, for summary.json
        self.stopped = False  # a guard stopped the run

    def adam(self, actor_critic: ActorCritic) -> torch.optim.Adam:
        """Adam over the trainable weights at ``ppo.lr``; fused: one kernel per step, no temporary copies of the whole
        parameter set. On a CPU its state is made now (glibc's heap; a GPU's caching allocator needs no help)."""
        params = [p for p in actor_critic.parameters() if p.requires_grad]
        adam = torch.optim.Adam(params, lr=self.cfg.lr, eps=self.cfg.adam_eps, fused=True)
        if self.device.type == "cpu":
            allocate_adam_state(adam)
        return adam

    # ---- step 1 -----------------------------------------------------------------------------------------------
    def rollout(self, prompts: list, clock: dict | None = None) -> Rollout:
        """Sample one response per prompt (a string or a conversation) with the current policy (no gradients);
        with ``ppo.env``, play one multi-turn episode per prompt instead (tether.envs). Row i of the batch samples
        with the noise of (seed, iteration, i). ``clock`` receives the sampling and scoring seconds."""
        max_prompt_length = self.config.sampling.max_prompt_length
        if self.envs:
            with present(*self.scoring_roles.values()):
                return collect_episodes(
                    self.actor_critic,
                    self.reference,
                    self.envs,
                    self.tokenizer,
                    prompts,
                    self.sampling,
                    self.cfg.max_turns,
                    chunk=self.micro_batch_size,
                    max_prompt_length=max_prompt_length,
                    autocast=self.placement.autocast,
                    stops=self.stops,
                    device=self.device,
                    sampler=self.sampler,
                )
        prompt_ids, prompt_mask = prompt_batch(self.tokenizer, prompts, max_prompt_length)  # the same padding on all
        rows = distributed.shard(len(prompts))  # this process's block of the batch
        with distributed.whole(self.actor_critic):  # FSDP: whole weights for the rollout, gathered once
            rollout = collect_rollout(
                self.actor_critic,
                self.reference,
                self.scorer,
                self.tokenizer,
                self.placement.move(prompt_ids[rows]),
                self.placement.move(prompt_mask[rows]),
                self.sampling,
                chunk=self.micro_batch_size,
                autocast=self.placement.autocast,
                prompts=prompts[rows],
                stops=self.stops,
                keys=row_keys(self.config.seed, self.iteration, range(len(prompts))[rows]),
                clock=clock,
                scoring=lambda role: present(self.scoring_roles.get(role)),
                sampler=self.sampler,
            )
        return gather_rollout(rollout, self.tokenizer.pad_token_id)

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
            length_norm=self.cfg.length_norm,
            score_norm=self.cfg.score_norm,
            score_clip=self.cfg.score_clip,
            moments=self.moments,
        )
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, self.cfg.kl_estimator) * mask
        rewards, _ = shape_rewards(scores, kl, mask, self.kl_ctl.value, rollout.step_scores)
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

    # ---- step 4: optimize, in tether.trainers.update ----------------------------------------------------------
    @property
    def total_updates(self) -> int:
        return total_updates(self.config.ppo, self.config.stages)

    # ---- steps 2-5 on a given rollout ---------------------------------------------------------------------------
    def step(self, rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
        """One PPO iteration on a collected rollout: steps 2 to 5. Returns the completed rollout and its stats."""
        timings = {}
        t = time.perf_counter()
        # 2. reward: score (non-finite ones replaced), per-token KL penalty to the reference, shaped rewards
        raw_scores, nonfinite = sanitize_scores(rollout.raw_scores)
        rollout = self.compute_rewards(replace(rollout, raw_scores=raw_scores))
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
        stats |= collapse_stats(self.guards, rollout, stats["reward/score"], stats["policy/entropy"])
        stats["guard/nonfinite_scores"] = nonfinite
        self.kl_ctl.update(stats["kl/ref"], len(rollout))
        self.iteration += 1
        return rollout, stats

    def train(self, prompts: list[str], run_dir: Path, echo=print, on_step=None) -> dict[str, float]:
        """Run the configured iterations (those left, after a resume) over ``prompts``; returns the last stats.

        Writes ``metrics.jsonl``, checkpoints under ``run_dir/checkpoints`` (step 0 first: the first stable point)
        and ``summary.json``. SIGINT/SIGTERM finish the current iteration, checkpoint, and raise
        :class:`tether.errors.Interrupted`.
        """
        run_dir, stats = Path(run_dir), {}
        checkpoints = run_dir / "checkpoints"
        bar = progress(self.config.ppo.steps, "ppo", self.iteration, SHOWN, unit="iterations", echo=echo)
        logger = MetricLogger.from_config(run_dir, self.config, echo, display=bar)
        if self.saved_at is None:
            self.save(checkpoints)
        with stop_requests() as stop, logger, bar, evicted(*self.scoring_roles.values(), self.gold_role):
            while self.iteration < self.config.ppo.steps and not self.stopped:
                t0 = time.perf_counter()
                self.enter_stage(bar.echo)
                sampled_from = self.iteration
                # 1. rollout: sample responses; old log-probs, reference log-probs, values, raw scores
                batch, clock = self.next_prompts(prompts), {}
                rollout = self.rollout(batch, clock)
                t_rollout = time.perf_counter() - t0
                # 2-5. reward, advantages, update, KL control
                rollout, stats = self.step(rollout)
                stats |= clock | {"time/rollout": t_rollout, "time/step": time.perf_counter() - t0}
                stats |= perf_stats(rollout, stats, self.device)
                stats |= self.judge(rollout, batch)
                if on_step is not None:
                    stats.update(on_step(self, rollout) or {})
                # 6. guards: KL limit and non-finite steps restore the last stable checkpoint, then stop or go on;
                #    reward-hacking alarms warn, stop, or roll back to a checkpoint from before the alarm
                stats |= self.apply_guards(stats, sampled_from, checkpoints, bar.echo)
                stats |= self.apply_alarms(stats, checkpoints, bar.echo)
                logger.log(stats, self.iteration)
                bar.update(1)
                # 7. checkpoint: every save_every iterations, and when asked to stop (a signal may arrive mid-save)
                stopping = distributed.agree_stop(stop)  # a signal to any process stops them all here
                if self.cfg.save_every and self.iteration % self.cfg.save_every == 0 and not stopping:
                    self.save(checkpoints)
                if stopping:
                    self.events.append({"iteration": self.iteration, "kind": "interrupted", "signal": stopping[0]})
                    self.save(checkpoints)
                    write_summary(run_dir, self.summary(stats))
                    raise Interrupted(stopping[0], f"iteration {self.iteration}", "ppo", run_dir)
        if not stats:  # resumed after the last iteration: its metrics are the file's last row
            stats = {k: v for k, v in (read_metrics(logger.path) or [{}])[-1].items() if k != "step"}
        write_summary(run_dir, self.summary(stats))
        return stats

    def next_prompts(self, prompts: list[str]) -> list[str]:
        """The next rollout batch of prompts: passes over the prompts, each freshly shuffled (resumable position)."""
        n = self.config.ppo.rollout_batch_size
        while len(self.prompt_order) < n:
            self.prompt_order += torch.randperm(len(prompts), generator=self.generator).tolist()
        batch, self.prompt_order = self.prompt_order[:n], self.prompt_order[n:]
        return [prompts[i] for i in batch]

    def enter_stage(self, echo=print) -> None:
        """The coming iteration's stage settings; entering a stage sets its kl_coef (the tutorial's per-stage beta)."""
        index, self.cfg = stage_at(self.config.ppo, self.config.stages, self.iteration)
        if index != self.stage_index:
            self.stage_index = index
            stage = self.config.stages[index]
            if "kl_coef" in stage.overrides:
                self.kl_ctl.value = stage.overrides["kl_coef"]
            changes = ", ".join(f"{k}={v}" for k, v in stage.overrides.items()) or "no overrides"
            echo(f"stage {index + 1}/{len(self.config.stages)} '{stage.name}': {stage.steps} iterations ({changes})")

    def judge(self, rollout: Rollout, prompts: list) -> dict[str, float]:
        """What the alarms watch beyond the rollout's own metrics: filler phrases per response and, with a gold
        judge, its mean score (``response/filler``, ``gold/score``); an environment's ``env/return``, ``env/turns``."""
        responses = decode_responses(self.tokenizer, rollout.response_ids, rollout.response_mask)
        stats = {"response/filler": filler_rate(responses, self.phrases)}
        stats |= episode_stats(rollout) if self.envs else {}
        if self.gold is not None:
            args = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
            with present(self.gold_role):
                scores, _ = sanitize_scores(self.gold(*args, tokenizer=self.tokenizer, prompts=prompts).float())
            stats["gold/score"] = scores.mean().item()
        return stats

    def summary(self, stats: dict) -> dict:
        """What ``summary.json`` records about the run: progress, guard events, the last iteration's metrics."""
        final = {k: v for k, v in stats.items() if not k.startswith(("time/", "perf/"))}
        return {
            "iterations": self.iteration,
            "stopped_early": self.stopped,
            "events": self.events,
            "alarms": self.alarms.fired,
            "final": final,
        }

    @classmethod
    def from_config(cls, config: RunConfig, sampler: Sampler | None = None) -> PPOTrainer:
        """Load policy, reference, value model and reward (model or function) as ``config.model`` names them."""
        roles = load_roles(config)
        return cls(
            config,
            roles.actor_critic,
            roles.reference,
            roles.tokenizer,
            roles.scorer,
            roles.placement,
            roles.gold,
            sampler=sampler,
        )
