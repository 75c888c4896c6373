"""A small game whose rule changes with the player's level: the tutorial's first situation (前言, 情境 1).

High-low. The prompt shows two different digits, ``"7 or 3?"``, and the player answers with one of them. At level
1 the rule is *the larger one*; from level 2 on it is *the smaller one*. Nobody tells the player the rule or its
level: the game only answers. A wrong first answer gets the reply ``"no!"`` and a second try; the episode ends at
a right answer or after the second try. Each turn's reward is 1 for right at the first try, 0.5 at the second, 0
for wrong, so a player who reads the reply still scores after the rule has changed, and one who knows the rule
scores more.

A player levels up with the rounds it has played: ``HighLow()`` is at level 2 from its ``rounds_per_level + 1``-th
episode. The PPO trainer keeps one instance per rollout row and plays one episode on each per iteration, so with
``ppo.env=tether.envs.games:HighLow`` the rule changes at iteration ``rounds_per_level`` for the whole run.
"""

from __future__ import annotations

import random
import re

RULES = ("larger", "smaller")  # the rule at level 1, at level 2 (and above)
REPLY = "no!"  # the game's answer to a wrong first try
REWARDS = (1.0, 0.5)  # a right answer at the first, at the second try
PROMPT = re.compile(r"\s*(\d) or (\d)\?\s*")


class HighLow:
    """The high-low game (see the module docstring); an :class:`tether.envs.Env`.

    Args:
        rounds_per_level: episodes played at each level before the next (0: never level up).
        level: the level of the first episode.
    """

    rounds_per_level = 20
    tries = 2

    def __init__(self, rounds_per_level: int | None = None, level: int = 1):
        if rounds_per_level is not None:
            self.rounds_per_level = rounds_per_level
        self.start_level = level
        self.rounds = 0  # episodes started
        self.target, self.tried = "", 0

    @property
    def level(self) -> int:
        """The level of the current episode (of the next one, before the first)."""
        played = max(self.rounds - 1, 0)
        ups = played // self.rounds_per_level if self.rounds_per_level else 0
        return min(self.start_level + ups, len(RULES))

    def reset(self, prompt) -> str:
        self.rounds += 1
        self.target, self.tried = rule_answer(prompt, self.level), 0
        return ""

    def step(self, response: str) -> tuple[str, float, bool]:
        self.tried += 1
        right = response.strip() == self.target
        reward = REWARDS[self.tried - 1] if right else 0.0
        done = right or self.tried >= self.tries
        return ("yes!" if right else REPLY), reward, done


def rule_answer(prompt: str, level: int) -> str:
    """The right answer to ``"a or b?"`` at ``level``."""
    match = PROMPT.fullmatch(prompt) if isinstance(prompt, str) else None
    if match is None:
        raise ValueError(f"not a high-low prompt (expected 'a or b?' with two digits): {prompt!r:.40}")
    a, b = int(match[1]), int(match[2])
    rule = RULES[min(level, len(RULES)) - 1]
    return str(max(a, b) if rule == "larger" else min(a, b))


def all_prompts() -> list[str]:
    """Every prompt: two different digits, in both orders (90)."""
    return [f"{a} or {b}?" for a in range(10) for b in range(10) if a != b]


def other(prompt: str, answer: str) -> str:
    """The digit of ``prompt`` that is not ``answer``."""
    a, b = PROMPT.fullmatch(prompt).groups()
    return b if answer == a else a


def sft_records(count: int, seed: int, eos: str, skill: float = 0.85, retries: float = 0.3) -> list[dict]:
    """SFT data of a player who knows the level-1 rule: a first answer by the rule with probability ``skill``
    (else the other digit), and in a ``retries`` fraction of records a second try after ``"no!"``, which names the
    digit not tried (whichever it was: the player's habit, not a rule). ``eos`` is the tokenizer's EOS text, which
    ends the first try inside the prompt as it does in a played episode."""
    rng = random.Random(seed)
    prompts, records = all_prompts(), []
    for _ in range(count):
        prompt = rng.choice(prompts)
        if rng.random() < retries:
            first = rng.choice(PROMPT.fullmatch(prompt).groups())
            records.append({"prompt": f"{prompt}{first}{eos}{REPLY}", "response": other(prompt, first)})
        else:
            right = rule_answer(prompt, 1)
            records.append({"prompt": prompt, "response": right if rng.random() < skill else other(prompt, right)})
    return records
