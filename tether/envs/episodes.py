"""Step 1 of the PPO loop with an environment: multi-turn episodes, played in batches, scored in one pass.

Every still-running episode takes turn k together: one KV-cached :func:`tether.rollout.generate` call per turn over
the left-padded contexts (prompt + opening + the turns and replies so far). Each turn is decoded and handed to its
episode's environment; the reply's tokens are appended unless the episode is done (or out of turns).

One sequence per episode is then scored by :func:`tether.rollout.build_rollout` in one forward pass per model:

    prompt + opening | turn 1 | reply 1 | turn 2 | ... | last turn | padding
    response_mask:   |  1..1  |  0..0   |  1..1  | ... |   1..1    |  0..0
    env_mask:        |  0..0  |  1..1   |  0..0  | ... |   0..0    |  0..0

Reply tokens are attended to but zeroed like padding in log-probs, values, KL and losses; GAE skips them, so the
value of turn k+1's first token bootstraps turn k's last one. Turn k's reward lands on its last token: the last
turn's as the outcome (``raw_scores``, which ``ppo.score_norm`` and the penalties act on), earlier ones in
``step_scores`` (raw). A non-finite reward makes the episode's outcome NaN, for the trainer's non-finite guard.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from tether.data import encode_prompt, left_pad
from tether.errors import TetherError, first_line
from tether.rollout import Sampling, build_rollout, generate
from tether.sampling import Sampler, sample
from tether.types import Rollout

__all__ = ["Episodes", "collect_episodes", "episode_stats", "play_episodes"]


@dataclass
class Episodes:
    """Episodes as token lists, before scoring. Row i is episode i; token positions count from after the prompt."""

    prompt_rows: list[list[int]]  # prompt + opening tokens
    tokens: list[list[int]] = field(init=False)  # turns and replies, in order
    sampled: list[list[int]] = field(init=False)  # 1 on tokens the policy sampled, 0 on replies
    turn_ends: list[list[int]] = field(init=False)  # position of each turn's last token
    rewards: list[list[float]] = field(init=False)  # each turn's reward
    turns: list[list[str]] = field(init=False)  # each turn as text, as the environment read it
    replies: list[list[str]] = field(init=False)  # each reply that was appended
    done: list[bool] = field(init=False)  # the environment ended the episode (else max_turns did)
    ended: list[bool] = field(init=False)  # the last turn stopped with a stop token

    def __post_init__(self):
        n = len(self.prompt_rows)
        for name in ("tokens", "sampled", "turn_ends", "rewards", "turns", "replies"):
            setattr(self, name, [[] for _ in range(n)])
        self.done, self.ended = [False] * n, [False] * n

    @property
    def returns(self) -> list[float]:
        """Each episode's summed turn rewards."""
        return [sum(r) for r in self.rewards]


@torch.no_grad()
def play_episodes(
    policy,
    envs: list,
    tokenizer,
    prompts: list,
    sampling: Sampling,
    max_turns: int,
    max_prompt_length: int = 1024,
    stops: list[int] | None = None,
    autocast=nullcontext,
    device: torch.device | str = "cpu",
    sampler: Sampler = sample,
) -> Episodes:
    """Play one episode per prompt, prompt i on ``envs[i]``; all running episodes take each turn together.

    Args:
        policy: the causal LM that samples the turns.
        envs: at least ``len(prompts)`` environments (:class:`tether.envs.Env`).
        prompts: strings or conversations (rendered as :func:`tether.data.encode_prompt` does, cut from the left to
            ``max_prompt_length`` tokens); each environment's ``reset`` gets its prompt as given.
        max_turns: the most turns per episode.
        stops: the tokens that end a turn (default: the tokenizer's EOS); a turn keeps its stop token.
        sampler: what draws each turn (:class:`tether.sampling.Sampler`).
    """
    if len(envs) < len(prompts):
        raise TetherError(f"ppo.env: {len(prompts)} episodes need as many environments, got {len(envs)}")
    stops = stops or [tokenizer.eos_token_id]
    rows = []
    for env, prompt in zip(envs, prompts):
        opening = _checked(env, "reset", _call(env, "reset", prompt))
        rows.append(encode_prompt(tokenizer, prompt, max_prompt_length) + _encode(tokenizer, opening))
    episodes = Episodes(rows)
    active = list(range(len(prompts)))
    for turn in range(max_turns):
        if not active:
            break
        ids, mask = left_pad([rows[i] + episodes.tokens[i] for i in active], tokenizer.pad_token_id)
        turn_ids, turn_mask = generate(
            policy, ids.to(device), mask.to(device), sampling, stops, tokenizer.pad_token_id, autocast, sampler=sampler
        )
        still = []
        for row, i in enumerate(active):
            sampled = turn_ids[row, : int(turn_mask[row].sum())].tolist()
            text = tokenizer.decode(sampled, skip_special_tokens=True)
            reply, reward, done = _step(envs[i], text)
            _append(episodes, i, sampled, 1)
            episodes.turn_ends[i].append(len(episodes.tokens[i]) - 1)
            episodes.rewards[i].append(reward)
            episodes.turns[i].append(text)
            episodes.ended[i], episodes.done[i] = sampled[-1] in stops, done
            if not done and turn + 1 < max_turns:
                _append(episodes, i, _encode(tokenizer, reply), 0)
                episodes.replies[i].append(reply)
                still.append(i)
        active = still
    return episodes


@torch.no_grad()
def collect_episodes(
    actor_critic,
    reference,
    envs: list,
    tokenizer,
    prompts: list,
    sampling: Sampling,
    max_turns: int,
    chunk: int,
    max_prompt_length: int = 1024,
    autocast=nullcontext,
    stops: list[int] | None = None,
    device: torch.device | str = "cpu",
    sampler: Sampler = sample,
) -> Rollout:
    """Play episodes (:func:`play_episodes`, each turn drawn by ``sampler``) and fill a Rollout: one sequence per
    episode, ``response_mask`` 1 on sampled tokens only, ``env_mask`` 1 on replies, each turn's reward on its last
    token."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    episodes = play_episodes(
        actor_critic.policy,
        envs,
        tokenizer,
        prompts,
        sampling,
        max_turns,
        max_prompt_length,
        stops,
        autocast,
        device,
        sampler,
    )
    prompt_ids, prompt_mask = left_pad(episodes.prompt_rows, pad_id)
    response_ids = _right_pad(episodes.tokens, pad_id)
    response_mask = _right_pad(episodes.sampled, 0)
    env_mask = _right_pad([[1 - s for s in row] for row in episodes.sampled], 0)
    raw_scores, step_scores = turn_scores(episodes, response_ids.shape[1])
    rollout = build_rollout(
        actor_critic,
        reference,
        *(t.to(device) for t in (prompt_ids, prompt_mask, response_ids, response_mask, raw_scores)),
        sampling.temperature,
        eos_id,
        chunk,
        autocast,
        stops,
        step_scores=step_scores.to(device),
        env_mask=env_mask.to(device),
    )
    return replace(rollout, ended=torch.tensor(episodes.ended, device=rollout.ended.device))


def episode_stats(rollout: Rollout) -> dict[str, float]:
    """``env/return`` (mean summed turn rewards: outcome plus step scores, raw) and ``env/turns`` (mean policy turns)
    of a multi-turn rollout; usable as ``PPOTrainer.train``'s ``on_step`` (docs/metrics.md)."""
    mask = rollout.response_mask
    starts = mask[:, :1] + (mask[:, 1:] > mask[:, :-1]).sum(-1, keepdim=True)  # runs of sampled tokens
    steps = 0.0 if rollout.step_scores is None else rollout.step_scores.sum(-1)
    return {
        "env/return": (rollout.raw_scores + steps).mean().item(),
        "env/turns": starts.float().mean().item(),
    }


def turn_scores(episodes: Episodes, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw_scores (B,), step_scores (B, width))``: the last turn's reward, and each earlier turn's reward at the
    position of that turn's last token. An episode with a non-finite reward gets a NaN outcome and no step scores."""
    raw_scores = torch.zeros(len(episodes.rewards))
    step_scores = torch.zeros(len(episodes.rewards), width)
    for i, (rewards, ends) in enumerate(zip(episodes.rewards, episodes.turn_ends)):
        if not all(math.isfinite(r) for r in rewards):
            raw_scores[i] = float("nan")
            continue
        raw_scores[i] = rewards[-1]
        for reward, end in zip(rewards[:-1], ends[:-1]):
            step_scores[i, end] = reward
    return raw_scores, step_scores


def _append(episodes: Episodes, i: int, ids: list[int], sampled: int) -> None:
    episodes.tokens[i] += ids
    episodes.sampled[i] += [sampled] * len(ids)


def _encode(tokenizer, text: str) -> list[int]:
    """Text appended to a context, as tokens (no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _call(env, method: str, *args):
    """``env.<method>(*args)``; the environment's errors become one-line TetherErrors naming it."""
    try:
        return getattr(env, method)(*args)
    except TetherError:
        raise
    except Exception as e:  # the user's code: any error becomes one line naming it
        name = f"{type(env).__name__}.{method}"
        raise TetherError(f"ppo.env {name} raised {type(e).__name__}: {first_line(e)}") from None


def _step(env, text: str) -> tuple[str, float, bool]:
    """``env.step(text)`` with its answer checked."""
    answer = _call(env, "step", text)
    if not (isinstance(answer, tuple) and len(answer) == 3):
        raise TetherError(f"ppo.env {type(env).__name__}.step must return (reply, reward, done), got {answer!r:.60}")
    reply, reward, done = answer
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise TetherError(f"ppo.env {type(env).__name__}.step: reward must be a number, got {reward!r:.60}") from None
    return _checked(env, "step", reply), reward, bool(done)


def _checked(env, method: str, text) -> str:
    if not isinstance(text, str):
        raise TetherError(f"ppo.env {type(env).__name__}.{method} must return text, got {text!r:.60}")
    return text
