"""The helpers TRL 0.11 scripts import from ``trl`` and ``trl.core``: ``set_seed`` and ``LengthSampler``."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (every CUDA device too), as ``trl.set_seed`` did."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class LengthSampler:
    """A length drawn uniformly from ``[min_value, max_value)`` on each call (numpy's global RNG, as in TRL).

    Args:
        min_value: the smallest length.
        max_value: one more than the largest length.
    """

    def __init__(self, min_value: int, max_value: int):
        self.values = list(range(min_value, max_value))

    def __call__(self) -> int:
        return int(np.random.choice(self.values))
