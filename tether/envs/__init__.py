"""Environments that answer back: the interface, loading one as ``module:Class``, and multi-turn episodes.

An environment plays one episode at a time with the policy::

    opening = env.reset(prompt)                      # text the policy reads after the prompt ("" for none)
    reply, reward, done = env.step(response)         # the policy's turn as text -> the environment's answer

The policy's turns and the environment's replies are joined into one sequence per episode (prompt + opening, then
turn 1, reply 1, turn 2, ...); ``response_mask`` is 1 only on the tokens the policy sampled, so replies are read but
never trained on, and each turn's reward lands on that turn's last token (:mod:`tether.envs.episodes`).

With ``ppo.env=module:Class`` the PPO trainer builds ``ppo.rollout_batch_size`` instances with ``Class()`` once and
row i of every rollout batch plays on instance i, so an instance may keep state across episodes (a player's level).
That state is not part of checkpoints: a resumed run starts its environments afresh.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from tether.errors import TetherError, first_line
from tether.rewards import load_callable

__all__ = ["Env", "load_env", "make_envs"]


@runtime_checkable
class Env(Protocol):
    """What ``ppo.env`` names: an object with ``reset`` and ``step`` (no base class needed)."""

    def reset(self, prompt) -> str:
        """Start an episode on ``prompt`` (as the data gave it: a string or a conversation); returns the opening
        text the policy reads after the prompt, before its first turn ("" for none)."""
        ...

    def step(self, response: str) -> tuple[str, float, bool]:
        """Answer the policy's turn (decoded, special tokens dropped): ``(reply, reward, done)``. ``reward`` is this
        turn's reward; ``reply`` is appended to the context before the next turn (unused once ``done``)."""
        ...


def load_env(spec: str):
    """The class (or any factory) that ``module:Class`` or ``path/to/file.py:Class`` names."""
    return load_callable(spec, "ppo.env", "Class")


def make_envs(spec: str, count: int) -> list[Env]:
    """``count`` fresh instances of the environment ``spec`` names; ``[]`` for an empty spec."""
    if not spec:
        return []
    factory = load_env(spec)
    envs = []
    for _ in range(count):
        try:
            env = factory()
        except Exception as e:  # the user's code: any error becomes one line naming it
            raise TetherError(f"ppo.env '{spec}': creating it raised {type(e).__name__}: {first_line(e)}") from None
        if not isinstance(env, Env):
            raise TetherError(f"ppo.env '{spec}': {type(env).__name__} has no reset(prompt) and step(response)")
        envs.append(env)
    return envs
