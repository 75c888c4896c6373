"""The legacy API's errors: TetherErrors that are also the built-in exceptions TRL raised in the same places."""

from __future__ import annotations

from tether.errors import TetherError


class LegacyValueError(TetherError, ValueError):
    """A bad value given to the legacy API. TRL raised ``ValueError`` for these, so ``except ValueError`` works."""


class UnknownArgumentError(TetherError, TypeError):
    """An unknown keyword argument (a TetherError that is also a TypeError, as a wrong keyword is in Python)."""
