"""tether: RLHF with PPO that stays tethered to a frozen reference."""

__version__ = "0.1.0"

_LEGACY = ("PPOConfig", "PPOTrainer", "AutoModelForCausalLMWithValueHead")


def __getattr__(name: str):
    """Import the legacy TRL-style API (tether.legacy) only when one of its names is used (PEP 562)."""
    if name in _LEGACY:
        from tether import legacy

        return getattr(legacy, name)
    raise AttributeError(f"module 'tether' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + list(_LEGACY))
