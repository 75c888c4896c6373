"""Reward-hacking alarms (the tutorial's Reward Hacking and 長度偏差 sections): PPO optimises the reward model, not
what people want, and these detectors watch for the patterns that show it.

Each detector compares the mean of the run's first ``window`` iterations ("start") with the mean of the newest
``window`` ("now"), and fires only while the score has risen: a rising score that comes with

- ``length``      responses growing by more than ``length_growth`` of their start length (length bias);
- ``repetition``  n-gram repetition (``collapse/repeat_fraction``) up by more than ``repeat_growth``;
- ``filler``      politeness/filler phrases per response up by more than ``filler_growth``;
- ``gold``        a gold judge (``gold/score``: the demo's judge or ``model.gold_reward``) more than ``gold_drop``
                  below its best smoothed level, and more than half of its gain since the start, while the score is
                  above its level at that best (over-optimisation: the proxy still climbs, the truth gives back).

Each kind is reported once, when it first starts; ``alarm/<kind>`` is 1 while its condition holds. Pure Python over the
metric history: no model, no I/O, testable on hand-made series.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

WATCHED = {
    "score": "reward/score",
    "length": "response/length",
    "repeat": "collapse/repeat_fraction",
    "filler": "response/filler",
    "gold": "gold/score",
}
"""History series name -> the metric it follows."""

KINDS = ("length", "repetition", "filler", "gold")


@dataclass
class Thresholds:
    """When each detector fires (the ``ppo.alarm_*`` fields, documented in docs/reward-hacking.md)."""

    window: int = 5
    length_growth: float = 0.3
    repeat_growth: float = 0.1
    filler_growth: float = 0.25
    gold_drop: float = 0.1

    @classmethod
    def from_ppo(cls, cfg) -> Thresholds:
        return cls(
            cfg.alarm_window,
            cfg.alarm_length_growth,
            cfg.alarm_repeat_growth,
            cfg.alarm_filler_growth,
            cfg.alarm_gold_drop,
        )


@dataclass
class AlarmState:
    """The watched series, the alarms now active and every onset (saved in checkpoints, so resume continues it)."""

    history: dict[str, list[float]] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    fired: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def count_phrases(text: str, phrases: list[str]) -> int:
    """How many times any of ``phrases`` occurs in ``text`` (case-insensitive, non-overlapping)."""
    if not phrases:
        return 0
    pattern = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return len(re.findall(pattern, text, flags=re.IGNORECASE))


def parse_phrases(spec: str) -> list[str]:
    """``ppo.filler_phrases`` ('|'-separated) as a list, empty entries dropped."""
    return [p.strip() for p in spec.split("|") if p.strip()]


def filler_rate(responses: list[str], phrases: list[str]) -> float:
    """Mean filler phrases per response."""
    return sum(count_phrases(r, phrases) for r in responses) / max(len(responses), 1)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _rolling(values: list[float], window: int) -> list[float]:
    """Trailing means over ``window`` values, from the first full window on."""
    return [_mean(values[i - window : i]) for i in range(window, len(values) + 1)]


def detect(history: dict[str, list[float]], t: Thresholds) -> dict[str, str]:
    """The alarms whose condition holds now: kind -> evidence. Needs ``2 * window`` iterations of history."""
    w, score = t.window, history.get("score", [])
    if len(score) < 2 * w:
        return {}
    start, now = _mean(score[:w]), _mean(score[-w:])
    if not now > start:
        return {}
    rose = f"reward/score {start:+.3f} -> {now:+.3f}"
    found = {}
    series = {k: v for k, v in history.items() if len(v) == len(score)}
    if "length" in series:
        a, b = _mean(series["length"][:w]), _mean(series["length"][-w:])
        if b > a * (1 + t.length_growth):
            found["length"] = f"{rose} while response/length {a:.1f} -> {b:.1f} tokens (+{b / a - 1:.0%})"
    for kind, name, limit, metric in (
        ("repetition", "repeat", t.repeat_growth, "collapse/repeat_fraction"),
        ("filler", "filler", t.filler_growth, "response/filler"),
    ):
        if name in series:
            a, b = _mean(series[name][:w]), _mean(series[name][-w:])
            if b - a > limit:
                found[kind] = f"{rose} while {metric} {a:.2f} -> {b:.2f} (+{b - a:.2f})"
    if "gold" in series:
        found |= _gold_drop(series["score"], series["gold"], t)
    return found


def _gold_drop(score: list[float], gold: list[float], t: Thresholds) -> dict[str, str]:
    """Proxy up, gold down: smoothed gold below its best by more than ``gold_drop`` and more than half of what it had
    gained since the start (so a run that gained a lot may ease a little), while the score is above its level then."""
    gold_s, score_s = _rolling(gold, t.window), _rolling(score, t.window)
    best = max(range(len(gold_s)), key=gold_s.__getitem__)
    drop, gain = gold_s[best] - gold_s[-1], gold_s[best] - gold_s[0]
    if drop > max(t.gold_drop, gain / 2) and score_s[-1] > score_s[best]:
        at = best + t.window  # the iteration that completed the best window
        return {
            "gold": f"reward/score {score_s[best]:+.3f} -> {score_s[-1]:+.3f} while gold/score fell "
            f"{gold_s[best]:+.3f} -> {gold_s[-1]:+.3f} since iteration {at}"
        }
    return {}


def observe(state: AlarmState, stats: dict, iteration: int, t: Thresholds) -> tuple[list[dict], dict[str, float]]:
    """Add this iteration's metrics to the history; returns (alarms that start now, ``alarm/*`` metrics)."""
    for name, key in WATCHED.items():
        if isinstance(stats.get(key), (int, float)):
            state.history.setdefault(name, []).append(float(stats[key]))
    found, seen = detect(state.history, t), {a["kind"] for a in state.fired}
    started = [{"kind": k, "iteration": iteration, "evidence": e} for k, e in found.items() if k not in seen]
    state.active = list(found)
    state.fired += started
    watched = [k for k in KINDS if k != "gold" or "gold" in state.history]
    return started, {f"alarm/{k}": float(k in found) for k in watched}
