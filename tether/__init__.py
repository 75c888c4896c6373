"""tether: RLHF with PPO that stays tethered to a frozen reference."""

__version__ = "0.1.0"

_LEGACY = (
    "PPOConfig",
    "PPOTrainer",
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLMWithValueHead",
    "PreTrainedModelWrapper",
    "create_reference_model",
    "set_seed",
    "LengthSampler",
)
"""TRL 0.11's top-level names (``from trl import ...`` becomes ``from tether import ...``)."""


def __getattr__(name: str):
    """Import the legacy TRL-style API (tether.legacy) only when one of its names is used (PEP 562)."""
    if name in _LEGACY:
        from tether import legacy

        return getattr(legacy, name)
    raise AttributeError(f"module 'tether' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + list(_LEGACY))
