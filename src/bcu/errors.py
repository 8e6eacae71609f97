"""Error types. Every problem a user can cause maps to one of these, with a one-line message.

The CLI prints ``bcu: error: <message>`` and exits with the class's ``exit_code``; anything
else escaping is a bug in bcu.

Messages quote file names, class names from pickles, config values: text an attacker controls.
:func:`clean` (used by every ``BcuError``) makes any such text safe for a terminal -- control
characters, escape sequences, bidirectional overrides and undecodable bytes are shown as
``\\xNN``/``\\uNNNN`` escapes -- and caps its length; :func:`show` is the bounded ``repr`` for
quoting a value in a message (never the unbounded ``repr`` of a user value).
"""
from __future__ import annotations

import reprlib
import unicodedata
from typing import Any

MESSAGE_LIMIT = 1000  # characters of one error line (docs/security.md)
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def clean(text: Any, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` as one terminal-safe line of at most ``limit`` characters (plus an ellipsis).

    Newlines and tabs become spaces; every other control or format character (ESC, BEL, the C1
    range, bidi overrides, zero-width characters, lone surrogates from undecodable file names) is
    written as an escape, so a file name can neither move the cursor nor set the terminal title.
    """
    s = text if isinstance(text, str) else str(text)
    cut = len(s) > limit
    s = s[:limit]
    out = []
    for ch in s:
        if ch in "\n\r\t":
            out.append(" ")
        elif ch.isprintable() and unicodedata.category(ch) not in _UNSAFE_CATEGORIES:
            out.append(ch)
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    line = "".join(out)
    if len(line) > limit:  # escapes made it longer
        line, cut = line[:limit], True
    return line + ("…" if cut else "")


class _BoundedRepr(reprlib.Repr):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = self.maxset = self.maxfrozenset = 6
        self.maxdeque = 6
        self.maxstring = self.maxlong = self.maxother = limit

    def repr_int(self, x: int, level: int) -> str:  # repr() of a 5,000-digit integer raises ValueError
        if x.bit_length() > 128:
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return super().repr_int(x, level)

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            s = object.__repr__(x) if type(x).__repr__ is object.__repr__ else repr(x)
        except Exception:  # a value whose repr fails is still quoted
            return f"<{type(x).__name__}>"
        return s if len(s) <= self.maxother else s[:self.maxother] + "..."


def show(value: Any, limit: int = 60) -> str:
    """A bounded, terminal-safe ``repr`` of a user value, for error messages.

    Nested containers are cut after 6 items and 3 levels, strings after ``limit`` characters,
    so an alias-bombed YAML list or a 5,000-digit integer costs a few bytes, not gigabytes.
    """
    return clean(_BoundedRepr(limit).repr(value), 4 * limit)


class BcuError(Exception):
    """Base class of all errors bcu reports to a user."""

    exit_code = 1

    def __str__(self) -> str:  # one line, always: capped and free of terminal escapes
        return clean(" ".join(str(a) for a in self.args).strip()).strip()


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


class ResumeMismatch(BcuError):
    """``--resume`` with a checkpoint written for other inputs or settings (the checkpoint is kept)."""

    exit_code = 1


class Interrupted(BcuError):
    """The user pressed Ctrl-C; a resumable checkpoint may exist."""

    exit_code = 130
