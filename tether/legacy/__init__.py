"""The legacy TRL PPO API (``PPOConfig``, ``PPOTrainer``, ``AutoModelForCausalLMWithValueHead``) on tether's core.

TRL removed this API in v0.12; code written for it (the tutorial's "使用 TRL 函式庫" snippet) runs here with only
its imports changed. ``PPOTrainer.step`` builds a :class:`tether.types.Rollout` from the user's tokens and scores and
runs one iteration of the core :class:`tether.trainers.ppo.PPOTrainer`; its stats are translated to TRL's keys.
Differences from TRL are listed in ``docs/migration.md``.
"""

from tether.legacy.config import PPOConfig
from tether.legacy.trainer import PPOTrainer
from tether.legacy.value_head import AutoModelForCausalLMWithValueHead

__all__ = ["PPOConfig", "PPOTrainer", "AutoModelForCausalLMWithValueHead"]
