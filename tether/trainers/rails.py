"""The PPO trainer's safety rails (steps 6 and 7 of tether.trainers.ppo): guards and alarms acting on an iteration's
metrics, checkpoints written and restored, and what a resume on a new reward starts afresh.

A mixin of :class:`tether.trainers.ppo.PPOTrainer`: the methods read and write the trainer's state (weights,
optimizer, KL controller, score moments, guard and alarm state, data position, events).
"""

from __future__ import annotations

from pathlib import Path

from tether import distributed
from tether.alarms import AlarmState, Thresholds, observe
from tether.checkpoint import (
    checkpoint_step,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
)
from tether.fields import to_dict
from tether.errors import TetherError
from tether.guards import Decision, check_bad_steps, check_kl
from tether.rewards import RunningMoments


class SafetyRails:
    """Guards, alarms, checkpoints and resume for the PPO trainer."""

    def apply_guards(self, stats: dict, sampled_from: int, checkpoints: Path, echo=print) -> dict[str, float]:
        """Act on the guards after an iteration; returns the ``guard/*`` metrics (docs/metrics.md).

        The rollout was sampled from the weights at iteration ``sampled_from``; if those weights are a checkpoint and
        the rollout's KL is within the limit (and finite), that checkpoint becomes the newest stable one.
        """
        decision = check_kl(stats["kl/ref"], self.cfg.kl_stop)
        if decision is None and self.saved_at == sampled_from:
            self.guards.last_stable = sampled_from
        decision = decision or check_bad_steps(self.guards, self.cfg.max_bad_steps)
        if decision is not None:
            self.restore_stable(decision, checkpoints, echo)
        stage = {"stage/index": self.stage_index} if self.config.stages else {}
        return {"guard/fired": float(decision is not None), "guard/rollbacks": self.guards.rollbacks} | stage

    def apply_alarms(self, stats: dict, checkpoints: Path, echo=print) -> dict[str, float]:
        """Feed the alarms this iteration's metrics and act on any that start (``ppo.on_alarm``); returns
        ``alarm/*``. ``rollback`` restores the newest checkpoint from before the alarm's evidence window and stops."""
        started, metrics = observe(self.alarms, stats, self.iteration, Thresholds.from_ppo(self.cfg))
        for alarm in started:
            alarm["action"] = action = self.cfg.on_alarm
            then = "continuing (ppo.on_alarm=warn)"
            if action == "stop":
                self.stopped, then = True, "stopping"
            elif action == "rollback":
                path = self.checkpoint_before(self.iteration - self.cfg.alarm_window, checkpoints)
                self.restore(path, full=False)
                self.stopped, alarm["restored"], then = True, path.name, f"restored {path.name}, stopping"
            echo(f"alarm at iteration {self.iteration}: {alarm['kind']}: {alarm['evidence']}; {then}")
        return metrics

    def checkpoint_before(self, iteration: int, checkpoints: Path) -> Path:
        """The newest checkpoint at or before ``iteration`` (else the oldest one kept)."""
        found = list_checkpoints(checkpoints)
        if not found:
            raise TetherError(f"ppo.on_alarm=rollback: no checkpoint to restore under {checkpoints}")
        earlier = [p for p in found if checkpoint_step(p) <= iteration]
        return earlier[-1] if earlier else found[0]

    def restore_stable(self, decision: Decision, checkpoints: Path, echo=print) -> None:
        """Load the newest stable checkpoint's weights, optimizer, KL controller and score normaliser (not the RNG
        or the data position), then stop or continue with a lower learning rate (``ppo.kl_stop_action``)."""
        stable = self.guards.last_stable
        path = step_dir(checkpoints, stable) if stable is not None and checkpoints is not None else None
        if path is None or not path.is_dir():
            found = list_checkpoints(checkpoints) if checkpoints is not None else []
            path = found[0] if found else None
        if path is None:
            where = f" under {checkpoints}" if checkpoints is not None else ""
            raise TetherError(f"{decision.evidence}, and no checkpoint to restore{where}")
        self.restore(path, full=False)
        self.guards.rollbacks += 1
        self.guards.bad_steps = 0
        action = self.cfg.kl_stop_action
        if action == "rollback":
            self.lr_scale *= self.cfg.kl_stop_lr_factor
        else:
            self.stopped = True
        event = {"iteration": self.iteration, "kind": decision.kind, "evidence": decision.evidence}
        self.events.append(event | {"restored": path.name, "action": action, "lr_scale": self.lr_scale})
        then = "stopping" if action == "stop" else f"continuing with lr x{self.lr_scale:g}"
        echo(f"guard at iteration {self.iteration}: {decision.evidence}; restored {path.name}, {then}")

    def forget_old_reward(self, saved: str) -> None:
        """Resumed on a different ``model.reward_model`` (a reward that changes: continue on the new signal): the
        policy, value model, optimizer and reference go on, but the score normaliser, the best score and the alarm
        history described the old reward, so they start afresh; summary.json records the change."""
        now = self.config.model.reward_model
        if saved != now:
            self.moments, self.alarms, self.guards.best_score = RunningMoments(), AlarmState(), None
            self.events.append({"iteration": self.iteration, "kind": "reward_changed", "from": saved, "to": now})

    def save(self, root: Path) -> Path:
        """A full checkpoint of this iteration: everything :meth:`restore` needs to continue bit for bit. Every
        process takes part (FSDP gathers its split weights); rank 0 writes it, the others wait until it is complete."""
        state = {
            "command": "ppo",
            "iteration": self.iteration,
            "update_index": self.update_index,
            "kl_ctl": self.kl_ctl.state_dict(),
            "moments": self.moments.state_dict(),
            "guards": self.guards.state_dict(),
            "alarms": self.alarms.state_dict(),
            "prompt_order": self.prompt_order,
            "stage_index": self.stage_index,
            "lr_scale": self.lr_scale,
            "stopped": self.stopped,
            "events": self.events,
            "config": to_dict(self.config),
        }
        path = step_dir(root, self.iteration)
        policy = self.actor_critic.policy
        save_checkpoint(path, self.actor_critic, self.optimizer, state, self.generator, policy, self.tokenizer)
        if distributed.is_main():
            prune_checkpoints(root, self.config.ppo.keep_checkpoints, protect=self.guards.last_stable)
        distributed.barrier()
        self.saved_at = self.iteration
        return path

    def restore(self, path: Path, full: bool = True) -> dict:
        """Load a checkpoint onto this trainer's device. ``full``: everything, to resume the run exactly; otherwise
        only the weights, optimizer, KL controller and score normaliser (a guard's rollback)."""
        state = load_training_state(path, self.actor_critic, self.optimizer, self.generator, restore_rng=full)
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.moments.load_state_dict(state["moments"])
        if full:
            self.iteration, self.update_index = state["iteration"], state["update_index"]
            self.guards.load_state_dict(state["guards"])
            self.alarms.load_state_dict(state.get("alarms", {}))
            self.prompt_order, self.stage_index = state["prompt_order"], state["stage_index"]
            self.lr_scale, self.stopped, self.events = state["lr_scale"], state["stopped"], state["events"]
            self.forget_old_reward(state["config"]["model"]["reward_model"])
        self.saved_at = checkpoint_step(path)
        return state
