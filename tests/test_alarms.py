"""Reward-hacking alarms: detectors on hand-made metric series, and the PPO trainer acting on them."""

import json
import sys

import pytest
import torch

from tether.alarms import AlarmState, Thresholds, count_phrases, detect, filler_rate, observe, parse_phrases
from tether.checkpoint import list_checkpoints
from tether.config import build_config
from tether.plot import alarm_onsets
from tether.trainers.ppo import PPOTrainer
from tether.tracking import read_metrics

T = Thresholds(window=2, length_growth=0.3, repeat_growth=0.1, filler_growth=0.25, gold_drop=0.1)
PROMPTS = ["1+1=", "2*3=", "9-4=", "7+7=", "3*3=", "8-1=", "5+4=", "6*2="]


def test_phrases_are_counted_case_insensitively_longest_first():
    phrases = parse_phrases("thank you| please ||Thank you so much")
    assert phrases == ["thank you", "please", "Thank you so much"]
    assert count_phrases("THANK YOU so much! Please, please.", phrases) == 3  # the long phrase counts once
    assert count_phrases("nothing here", phrases) == 0 and count_phrases("please", []) == 0
    assert filler_rate(["Great question! Sure! 4", "4", "sure! great QUESTION!"], ["great question", "sure!"]) == 4 / 3


def test_length_alarm_by_hand():
    history = {"score": [0.0, 0.2, 0.8, 1.0], "length": [10.0, 10.0, 13.0, 14.0]}
    # start means: score 0.1, length 10; now: score 0.9, length 13.5 (+35% > 30%)
    found = detect(history, T)
    assert list(found) == ["length"]
    assert "response/length 10.0 -> 13.5 tokens (+35%)" in found["length"] and "+0.100 -> +0.900" in found["length"]
    assert detect({**history, "length": [10.0, 10.0, 12.0, 13.0]}, T) == {}  # +25%: below the threshold
    assert detect({**history, "score": [1.0, 0.8, 0.2, 0.0]}, T) == {}  # longer but the score fell: no hacking
    assert detect({"score": [0.0, 0.2, 0.8], "length": [10.0, 10.0, 20.0]}, T) == {}  # fewer than 2 windows


def test_repetition_and_filler_alarms_by_hand():
    history = {"score": [0.0, 0.0, 1.0, 1.0], "repeat": [0.1, 0.1, 0.2, 0.3], "filler": [0.2, 0.2, 0.4, 0.4]}
    found = detect(history, T)  # repeat +0.15 > 0.1; filler +0.2 is not > 0.25
    assert list(found) == ["repetition"] and "collapse/repeat_fraction 0.10 -> 0.25 (+0.15)" in found["repetition"]
    history["filler"] = [0.2, 0.2, 0.5, 0.5]
    assert sorted(detect(history, T)) == ["filler", "repetition"]


def test_gold_alarm_fires_when_the_proxy_rises_as_gold_falls():
    score = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    # rolling means (window 2) of gold: 0.55, 0.75, 0.85, 0.7, 0.55 -> best 0.85 at iteration 4, now 0.55
    gold = [0.5, 0.6, 0.9, 0.8, 0.6, 0.5]
    found = detect({"score": score, "gold": gold}, T)
    assert list(found) == ["gold"] and "gold/score fell +0.850 -> +0.550 since iteration 4" in found["gold"]
    assert detect({"score": score, "gold": [0.5, 0.6, 0.9, 0.8, 0.8, 0.8]}, T) == {}  # a 0.05 drop is noise
    # a run that gained 0.8 and gave back 0.15 (rolling 0.1, 0.5, 0.9, 0.825, 0.75) eases; it does not hack
    assert detect({"score": score, "gold": [0.1, 0.1, 0.9, 0.9, 0.75, 0.75]}, T) == {}
    falling = {"score": [0.0, 0.2, 0.6, 0.6, 0.5, 0.3], "gold": gold}  # both fell: over-fitting, not hacking
    assert detect(falling, T) == {}


def test_observe_reports_each_alarm_once_and_keeps_its_metric_while_it_holds():
    state, started_at, on = AlarmState(), {}, []
    lengths = [10, 10, 14, 15, 10, 10, 16, 16]  # start mean 10; the newest two: 14.5 at 4, 16 at 8 (> +30%)
    for i, length in enumerate(lengths, start=1):
        stats = {"reward/score": float(i), "response/length": float(length), "response/filler": 0.0}
        started, metrics = observe(state, stats, i, T)
        started_at.update({a["kind"]: a["iteration"] for a in started})
        on.append(metrics["alarm/length"])
        assert "alarm/gold" not in metrics  # no gold judge, no gold alarm
    assert on == [0, 0, 0, 1, 0, 0, 0, 1] and started_at == {"length": 4}  # back at 8, but reported once
    assert [a["kind"] for a in state.fired] == ["length"]
    restored = AlarmState()
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert restored == state


def test_alarm_onsets_for_the_plot():
    records = [{"step": 1, "alarm/length": 0.0}, {"step": 2, "alarm/length": 1.0}, {"step": 3, "alarm/gold": 1.0}]
    assert alarm_onsets(records) == {"length": 2, "gold": 3}


# ---- the trainer acting on alarms, on the tiny models ------------------------------------------------------------
@pytest.fixture
def length_reward(tmp_path, monkeypatch):
    """A reward function that pays for the letter 'a' (counted as filler) and a gold judge that dislikes it: a
    filler hack the tiny random policy finds in a few iterations."""
    (tmp_path / "hack_rewards.py").write_text(
        "def filler(prompts, responses):\n    return [r.count('a') for r in responses]\n"
        "def plain(prompts, responses):\n    return [-r.count('a') for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("hack_rewards", None)


def _trainer(tiny_ppo_args, tmp_path, *overrides):
    config = build_config(
        None,
        [
            *tiny_ppo_args,
            "model.reward_model=hack_rewards:filler",
            "model.gold_reward=hack_rewards:plain",
            "ppo.filler_phrases=a",
            "model.device=cpu",
            "ppo.steps=12",
            "ppo.lr=2e-2",
            "ppo.kl_coef=0.0",
            "ppo.kl_stop=none",
            "ppo.alarm_window=2",
            "sampling.max_new_tokens=12",
            f"output_dir={tmp_path}",
            *overrides,
        ],
    )
    torch.manual_seed(config.seed)
    return PPOTrainer.from_config(config)


def test_a_filler_hack_sets_off_the_alarms_and_warn_goes_on(tiny_ppo_args, tmp_path, length_reward):
    trainer = _trainer(tiny_ppo_args, tmp_path)
    lines = []
    trainer.train(PROMPTS, tmp_path, echo=lines.append)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["response/filler"] > rows[0]["response/filler"] + 1  # the hack happened
    assert all("gold/score" in r and "response/filler" in r for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    kinds = [a["kind"] for a in summary["alarms"]]
    assert "filler" in kinds and "gold" in kinds and summary["iterations"] == 12 and not summary["stopped_early"]
    first = summary["alarms"][0]
    assert rows[first["iteration"] - 1][f"alarm/{first['kind']}"] == 1.0
    assert any(line.startswith(f"alarm at iteration {first['iteration']}: {first['kind']}") for line in lines)


def test_on_alarm_stop_and_rollback(tiny_ppo_args, tmp_path, length_reward):
    stop = _trainer(tiny_ppo_args, tmp_path / "stop", "ppo.on_alarm=stop")
    stop.train(PROMPTS, tmp_path / "stop", echo=lambda *a: None)
    onset = stop.alarms.fired[0]["iteration"]
    assert stop.stopped and stop.iteration == onset < 12

    rollback = _trainer(tiny_ppo_args, tmp_path / "rb", "ppo.on_alarm=rollback", "ppo.save_every=1")
    rollback.train(PROMPTS, tmp_path / "rb", echo=lambda *a: None)
    (alarm, *_) = rollback.alarms.fired
    restored = int(alarm["restored"].removeprefix("step_"))
    assert alarm["iteration"] == onset and restored == onset - 2  # before the evidence window (alarm_window=2)
    assert rollback.stopped and rollback.iteration == onset
    weights = {n: p.detach().clone() for n, p in rollback.actor_critic.named_parameters()}
    reload = _trainer(tiny_ppo_args, tmp_path / "rb2")
    reload.restore(tmp_path / "rb" / "checkpoints" / alarm["restored"])
    for name, param in reload.actor_critic.named_parameters():
        assert torch.equal(param, weights[name]), name


def test_no_alarm_on_a_quiet_run(tiny_ppo_args, tmp_path):
    config = build_config(None, [*tiny_ppo_args, "model.device=cpu", "ppo.steps=3", f"output_dir={tmp_path}"])
    trainer = PPOTrainer.from_config(config)
    trainer.train(PROMPTS, tmp_path, echo=lambda *a: None)
    assert json.loads((tmp_path / "summary.json").read_text())["alarms"] == []
    assert list_checkpoints(tmp_path / "checkpoints")
