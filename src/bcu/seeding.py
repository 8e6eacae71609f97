"""Seeds: user seeds are 64-bit integers; generators derived from them never overflow.

A seed option accepts any integer in [-2^63, 2^63 - 1] (``check_seed``); bcu derives further seeds
from it by arithmetic (``seed * 1_000_003 + epoch * 7919``, ``seed + 7``...), which can leave the
range torch accepts. Every generator is therefore seeded through :func:`generator` /
:func:`manual_seed`, which reduce the value modulo 2^64 -- exactly what torch itself does with a
negative seed, so every seed that worked before gives the same random numbers as before.
"""
from __future__ import annotations

import torch

from .errors import ConfigError, show

SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1


def _wrap(seed: int) -> int:
    return int(seed) % (2 ** 64)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (any integer)."""
    return torch.Generator().manual_seed(_wrap(seed))


def manual_seed(seed: int) -> None:
    """``torch.manual_seed`` for any integer."""
    torch.manual_seed(_wrap(seed))


def check_seed(value: object, where: str = "seed") -> int:
    """``value`` when it is a 64-bit integer seed, else a ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or not SEED_MIN <= value <= SEED_MAX:
        raise ConfigError(f"{where} must be an integer in [-2^63, 2^63 - 1], got {show(value)}")
    return value
