"""The legacy TRL PPO API (TRL 0.11's ``PPOConfig``, ``PPOTrainer``, ``AutoModelForCausalLMWithValueHead``, ...)
on tether's core.

TRL removed this API in v0.12; code written for it (TRL's own ``examples/scripts/ppo.py``, its notebooks, the
tutorial's "使用 TRL 函式庫" snippet) runs here with only its imports changed: ``from tether.legacy import ...``
for ``from trl import ...`` and ``from trl.core import ...``. ``PPOTrainer.step`` builds a
:class:`tether.types.Rollout` from the user's tokens and scores and runs one iteration of the core PPO trainer with
TRL's update rules; its stats carry TRL's keys. Bad values raise :class:`LegacyValueError`, a ``ValueError`` as in
TRL. Differences from TRL are listed in ``docs/migration.md``.
"""

from tether.legacy.config import PPOConfig
from tether.legacy.core import LengthSampler, set_seed
from tether.legacy.errors import LegacyValueError, UnknownArgumentError
from tether.legacy.reference import create_reference_model
from tether.legacy.trainer import PPOTrainer
from tether.legacy.value_head import (
    SUPPORTED_ARCHITECTURES,
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
    ValueHead,
)

__all__ = [
    "PPOConfig",
    "PPOTrainer",
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLMWithValueHead",
    "PreTrainedModelWrapper",
    "ValueHead",
    "SUPPORTED_ARCHITECTURES",
    "create_reference_model",
    "set_seed",
    "LengthSampler",
    "LegacyValueError",
    "UnknownArgumentError",
]
