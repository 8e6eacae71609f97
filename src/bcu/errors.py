"""Error types. Every problem a user can cause maps to one of these, with a one-line message.

The CLI prints ``bcu: error: <message>`` and exits with the class's ``exit_code``; anything
else escaping is a bug in bcu.
"""
from __future__ import annotations


class BcuError(Exception):
    """Base class of all errors bcu reports to a user."""

    exit_code = 1

    def __str__(self) -> str:  # one line, always
        return " ".join(str(a) for a in self.args).replace("\n", " ").strip()


class ConfigError(BcuError, ValueError):
    """An invalid option, config file, or unknown registry name."""

    exit_code = 2


class ModelError(BcuError):
    """A checkpoint that cannot be loaded safely or does not match its declared architecture."""

    exit_code = 3


class DataError(BcuError):
    """Input images that are missing, unreadable, of the wrong shape, or too few."""

    exit_code = 4


class OutputError(BcuError):
    """An output location that exists, cannot be written, or a disk that is full."""

    exit_code = 5


class Interrupted(BcuError):
    """The user pressed Ctrl-C; a resumable checkpoint may exist."""

    exit_code = 130
