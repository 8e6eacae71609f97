"""Runtime flags, validated in one place: ``--device`` and ``--threads`` of every command, and the
``device`` of a bench config. Each bad value is one ConfigError line (exit 2), never a torch
traceback: ``--device foo`` (not a device), ``meta``/``mps``/``xpu``... (not a device bcu runs on),
``cuda`` without CUDA or ``cuda:7`` on a machine with two GPUs; ``--threads 0`` or ``-1``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError

MAX_THREADS = 4096


def check_device(text: object, where: str = "--device") -> str:
    """``text`` when it names a device bcu can use here (``cpu``, ``cuda``, ``cuda:N``)."""
    if not isinstance(text, str) or not text or len(text) > 32:
        raise ConfigError(f"{where}: expected a device name such as cpu, cuda or cuda:1")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{where} {text!r}: not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return text
    if dev.type != "cuda":
        raise ConfigError(f"{where} {text!r}: bcu runs on cpu or cuda devices, not {dev.type}")
    if not torch.cuda.is_available():
        raise ConfigError(f"{where} {text}: CUDA is not available on this machine")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{where} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def check_threads(n: Optional[int], where: str = "--threads") -> Optional[int]:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS:
        raise ConfigError(f"{where} must be a number of threads in [1, {MAX_THREADS}], got {n}")
    return n


def setup(device: Optional[str] = "cpu", threads: Optional[int] = None) -> None:
    """Validate the runtime flags, then apply ``threads``."""
    if device is not None:
        check_device(device)
    if check_threads(threads) is not None:
        torch.set_num_threads(threads)
