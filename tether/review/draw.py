"""What a review samples: the run's trained policy, its reward model and held-out prompts, found in the run folder.

- a ``tether demo`` run: the PPO policy ``RUN/ppo/model``, the reward model ``RUN/reward/model`` and the held-out
  prompts ``RUN/data/eval_prompts.jsonl`` (its ``config.yaml`` is written before training, so its ``model.*``
  fields name the demo's starting point, not its trained models);
- a ``tether ppo`` run: the policy ``RUN/model`` and the reward model (or reward function) ``model.reward_model``
  of ``RUN/config.yaml``; held-out prompts must be given (the run's ``ppo.prompts`` are what it trained on).

Both sample as the run's ``sampling`` section says (temperature, top-p, top-k, max_new_tokens) on the device and in
the precision of its ``model`` section.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from tether.config import RunConfig, build_config
from tether.errors import TetherError


@dataclass(frozen=True)
class RunSource:
    """Where a review's policy, reward and prompts come from."""

    run: Path
    kind: str  # "demo" or "ppo"
    policy: Path
    reward_model: str  # a folder, a Hub name or module:function
    prompts: Path | None  # None: not known (a ppo run without --prompts)
    config: RunConfig


def find_run(run: str | Path, prompts: str | None = None, reward_model: str | None = None) -> RunSource:
    """The policy, reward and prompts of run folder ``run`` (a demo or a ppo run); one-line errors name what is
    missing."""
    run = Path(run)
    if not run.is_dir():
        raise TetherError(f"{run}: no such run folder")
    if not (run / "config.yaml").is_file():
        raise TetherError(f"{run}: not a run folder (no config.yaml)")
    config = build_config(run / "config.yaml")
    given = Path(prompts) if prompts else None
    if (run / "ppo").is_dir() and (run / "reward").is_dir():  # tether demo
        if not (run / "ppo" / "model").is_dir():
            raise TetherError(f"{run / 'ppo' / 'model'}: no PPO policy (the demo did not finish)")
        if reward_model is None and not (run / "reward" / "model").is_dir():
            raise TetherError(f"{run / 'reward' / 'model'}: no reward model (the demo did not finish)")
        default = run / "data" / "eval_prompts.jsonl"
        reward = reward_model or str(run / "reward" / "model")
        return RunSource(run, "demo", run / "ppo" / "model", reward, given or default, config)
    if not (run / "model").is_dir():
        raise TetherError(f"{run}: no trained policy (expected model/ of tether ppo, or ppo/model/ of tether demo)")
    reward = reward_model or config.model.reward_model
    if not reward:
        raise TetherError(f"{run / 'config.yaml'}: model.reward_model is empty; give one with --reward-model")
    return RunSource(run, "ppo", run / "model", reward, given, config)


def read_prompts(source: RunSource) -> list:
    """The held-out prompts (strings or conversations), each once, in file order."""
    from tether.data import read_records

    if source.prompts is None:
        raise TetherError(
            f'{source.run}: a tether ppo run needs held-out prompts: give --prompts FILE ({{"prompt": ...}} JSONL '
            "of prompts the policy did not train on)"
        )
    seen, prompts = set(), []
    for record in read_records(source.prompts, ("prompt",)):
        key = json.dumps(record["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(record["prompt"])
    return prompts


def shuffle_prompts(prompts: list, seed: int) -> list:
    """The prompts in the order a review draws them from (a shuffle by ``seed``)."""
    return random.Random(seed).sample(prompts, len(prompts))


class PolicySampler:
    """The run's policy and reward, loaded once: samples responses and scores them."""

    def __init__(self, source: RunSource):
        from tether.models import load_causal_lm, load_tokenizer
        from tether.precision import Placement
        from tether.roles import load_scorer
        from tether.rollout import Sampling

        m, s = source.config.model, source.config.sampling
        self.placement = Placement.from_config(m)
        self.tokenizer = load_tokenizer(str(source.policy), m.trust_remote_code)
        dtype = self.placement.frozen_dtype
        self.policy = self.placement.frozen(load_causal_lm(str(source.policy), dtype, m.trust_remote_code))
        self.scorer = load_scorer(source.reward_model, self.tokenizer, self.placement, m.trust_remote_code)
        self.sampling = Sampling.from_config(s)
        self.max_prompt_length = s.max_prompt_length

    def __call__(self, prompts: list, per_prompt: int, seed: int, candidates: int) -> list[dict]:
        """Up to ``per_prompt`` distinct responses to each prompt, the first ``per_prompt`` different ones among
        ``candidates`` sampled: dicts with prompt, response, rm_score, a prompt's responses next to each other."""
        from tether.evaluate import evaluate_policy

        result = evaluate_policy(
            self.policy,
            None,
            self.tokenizer,
            prompts,
            self.sampling,
            placement=self.placement,
            scorer=self.scorer,
            samples_per_prompt=candidates,
            max_prompt_length=self.max_prompt_length,
            seed=seed,
        )
        kept = []
        for i in range(0, len(result["samples"]), candidates):
            seen = set()
            for sample in result["samples"][i : i + candidates]:
                if sample["response"].strip() not in seen and len(seen) < per_prompt:
                    seen.add(sample["response"].strip())
                    kept.append({k: sample[k] for k in ("prompt", "response", "rm_score")})
        return kept


def draw_samples(source: RunSource, prompts: list, num: int, per_prompt: int, seed: int, oversample: int = 4):
    """``num`` samples of the run's policy: ``per_prompt`` distinct responses to each of the first prompts of
    ``prompts`` (fewer where the policy repeats itself in ``per_prompt * oversample`` tries; the next prompts then
    make up the number), each with its reward-model score. Fewer than ``num`` when the prompts run out."""
    sampler = PolicySampler(source)
    candidates = per_prompt * oversample if per_prompt > 1 else 1
    samples: list[dict] = []
    start, round_ = 0, 0
    while len(samples) < num and start < len(prompts):
        wanted = math.ceil((num - len(samples)) / per_prompt)
        samples += sampler(prompts[start : start + wanted], per_prompt, seed + round_, candidates)
        start, round_ = start + wanted, round_ + 1
    return samples[:num]
