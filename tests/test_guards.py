"""The tutorial's guards: collapse signals by hand, the KL guard's restore, the non-finite guard, staged schedules."""

import json
import math

import pytest
import torch

from tether.checkpoint import step_dir, trained_weights
from tether.config import build_config
from tether.guards import GuardState, check_kl, repeat_fraction, sanitize_scores
from tether.trainers.ppo import PPOTrainer
from tether.tracking import read_metrics

PROMPTS = ["1+1=", "2*3=", "9-4=", "7+7=", "3*3=", "8-1=", "5+4=", "6*2="]
QUIET = dict(echo=lambda *a: None)


@pytest.fixture
def trainer_for(tiny_ppo_args):
    def make(tmp_path, *overrides, config_file=None):
        config = build_config(
            config_file,
            [*tiny_ppo_args, "ppo.steps=4", "model.device=cpu", f"output_dir={tmp_path}", *overrides],
        )
        torch.manual_seed(config.seed)
        return PPOTrainer.from_config(config)

    return make


def test_repeat_fraction_by_hand():
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 0, 0], [5, 5, 5, 5, 5, 0, 0, 0], [1, 2, 3, 4, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 6 + [0] * 2, [1] * 5 + [0] * 3, [1] * 4 + [0] * 4])
    # row 0: 3-grams 123 231 312 123 -> 1 of 4 repeats; row 1: 555 x3 -> 2 of 3; row 2: 123 234 -> 0
    assert repeat_fraction(ids, mask) == pytest.approx((1 / 4 + 2 / 3 + 0) / 3)


def test_sanitize_scores_and_the_kl_check():
    scores, bad = sanitize_scores(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    assert bad == 2 and scores.tolist() == [1.0, 2.0, 3.0, 2.0]
    assert sanitize_scores(torch.tensor([float("nan")] * 2))[0].tolist() == [0.0, 0.0]
    assert check_kl(11.0, None) is None and check_kl(9.9, 10.0) is None
    assert check_kl(10.5, 10.0).kind == "kl_stop" and check_kl(float("nan"), 10.0) is not None


def test_guard_state_round_trips():
    state = GuardState(bad_steps=2, first_entropy=1.5, best_score=0.3, last_stable=4, rollbacks=1)
    other = GuardState()
    other.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert other == state


def test_kl_guard_restores_the_last_stable_checkpoint_and_stops(trainer_for, tmp_path):
    # lr 3e-2 pushes the policy away from the reference fast; a tiny limit makes the guard fire within a few steps
    trainer = trainer_for(tmp_path, "ppo.lr=3e-2", "ppo.kl_stop=0.5", "ppo.save_every=1", "ppo.steps=8")
    trainer.train(PROMPTS, tmp_path, **QUIET)
    (event,) = trainer.events
    assert event["kind"] == "kl_stop" and event["action"] == "stop" and trainer.stopped
    assert trainer.iteration < 8  # stopped early
    records = read_metrics(tmp_path / "metrics.jsonl")
    fired = [r["step"] for r in records if r["guard/fired"]]
    assert fired == [trainer.iteration] and records[-1]["kl/ref"] > 0.5
    assert all(r["kl/ref"] <= 0.5 for r in records[:-1])
    # the weights are those of the newest checkpoint whose own rollout stayed below the limit
    stable = trainer.guards.last_stable
    assert event["restored"] == f"step_{stable:06d}" and stable == trainer.iteration - 2
    saved = trained_weights(step_dir(tmp_path / "checkpoints", stable))
    current = dict(trainer.actor_critic.named_parameters())
    assert saved.keys() == {k for k, p in current.items() if p.requires_grad}
    assert all(torch.equal(saved[k], current[k].detach()) for k in saved)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_early"] and summary["events"][0]["evidence"].startswith("KL to the reference")


def test_kl_guard_rollback_continues_with_a_lower_learning_rate(trainer_for, tmp_path):
    trainer = trainer_for(
        tmp_path,
        "ppo.lr=3e-2",
        "ppo.lr_schedule=constant",
        "ppo.kl_stop=0.5",
        "ppo.kl_stop_action=rollback",
        "ppo.kl_stop_lr_factor=0.1",
        "ppo.save_every=1",
        "ppo.steps=8",
    )
    trainer.train(PROMPTS, tmp_path, **QUIET)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9)) and not trainer.stopped
    first = next(r["step"] for r in records if r["guard/fired"])
    after = records[first]  # the iteration after the first rollback
    assert after["ppo/lr"] == pytest.approx(3e-2 * 0.1 ** after["guard/rollbacks"])
    assert trainer.guards.rollbacks == len(trainer.events) >= 1


def test_non_finite_steps_are_skipped_then_restored(trainer_for, tmp_path):
    trainer = trainer_for(tmp_path, "ppo.max_bad_steps=3", "ppo.save_every=1")
    real = trainer.clip_gradients
    calls = []

    def poisoned():  # optimizer steps 5 to 8 (all of iteration 2, the start of 3) see an infinite gradient
        calls.append(1)
        norms = real()
        return {k: math.inf for k in norms} if 5 <= len(calls) <= 8 else norms

    trainer.clip_gradients = poisoned
    trainer.train(PROMPTS, tmp_path, **QUIET)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["guard/skipped_steps"] == 0 and records[1]["guard/skipped_steps"] == 4
    assert records[1]["guard/fired"] == 1.0 and trainer.events[0]["kind"] == "non_finite"
    # checkpoint 1's own rollout (iteration 2's) was fine: the non-finite steps came after it, so it is restored
    assert trainer.events[0]["restored"] == "step_000001" and trainer.iteration == 2 and trainer.stopped


NAN_REWARD = """
def nan_for_first(prompts, responses):
    return [float("nan")] + [len(r) / 10 for r in responses[1:]]
"""


def test_a_reward_function_that_returns_nan_for_one_sample_does_not_stop_the_run(trainer_for, tmp_path, monkeypatch):
    (tmp_path / "nan_rewards.py").write_text(NAN_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    trainer = trainer_for(tmp_path, "model.reward_model=nan_rewards:nan_for_first", "ppo.steps=2")
    trainer.train(PROMPTS, tmp_path, **QUIET)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["guard/nonfinite_scores"] for r in records] == [1, 1]
    assert all(math.isfinite(r["loss/total"]) and math.isfinite(r["reward/score"]) for r in records)


STAGED = """
stages:
  - {name: warmup, steps: 2, lr: 1.0e-3, clip_range: 0.1, kl_coef: 0.2, ppo_epochs: 1}
  - {name: main, steps: 2, lr: 2.0e-3, kl_coef: 0.05}
ppo:
  lr_schedule: constant
"""


def test_stages_change_settings_in_order_and_resume_inside_a_stage(trainer_for, tmp_path):
    (tmp_path / "staged.yaml").write_text(STAGED)
    full = trainer_for(tmp_path / "full", config_file=tmp_path / "staged.yaml")
    full.train(PROMPTS, tmp_path / "full", **QUIET)
    records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["stage/index"] for r in records] == [0, 0, 1, 1]
    assert [r["ppo/lr"] for r in records] == [1e-3, 1e-3, 2e-3, 2e-3]
    assert [r["kl/coef"] for r in records] == [0.2, 0.2, 0.05, 0.05]
    assert full.update_index == 2 * 1 * 2 + 2 * 2 * 2  # ppo_epochs 1 then 2, two minibatches each
    # stop after iteration 3 (inside stage 'main'), then resume a fresh trainer from that checkpoint
    part = trainer_for(tmp_path / "part", "ppo.save_every=1", config_file=tmp_path / "staged.yaml")
    part.config.ppo.steps = 3
    part.train(PROMPTS, tmp_path / "part", **QUIET)
    resumed = trainer_for(tmp_path / "part", "ppo.save_every=1", config_file=tmp_path / "staged.yaml")
    resumed.restore(step_dir(tmp_path / "part" / "checkpoints", 3))
    assert resumed.stage_index == 1
    last = resumed.train(PROMPTS, tmp_path / "part", **QUIET)
    assert last["kl/coef"] == records[-1]["kl/coef"] and last["reward/score"] == records[-1]["reward/score"]
    a, b = dict(full.actor_critic.named_parameters()), dict(resumed.actor_critic.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_threshold_kl_control_in_a_run(trainer_for, tmp_path):
    trainer = trainer_for(tmp_path, "ppo.kl_control=threshold", "ppo.kl_target=100", "ppo.kl_coef=0.1")
    trainer.train(PROMPTS, tmp_path, **QUIET)
    coefs = [r["kl/coef"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    # KL stays far below 0.5 x target: beta shrinks x0.75 after every iteration
    assert coefs == pytest.approx([0.1 * 0.75**i for i in range(4)])
