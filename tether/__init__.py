"""tether: RLHF with PPO that stays tethered to a frozen reference."""

__version__ = "0.1.0"
