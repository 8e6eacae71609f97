"""Deterministic weights and inputs for comparing bcu's re-implementations with the originals.

The same functions fill a model in ``tests/fixtures/backdoorbench/make_fixtures.py`` (run once,
with torchvision and the original BackdoorBench/BCU model files) and in the tests (without them):
pure arithmetic, so both sides get bit-identical tensors on any torch version.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn


PERIOD = 9973  # a prime: the pattern shifts from row to row of a weight matrix


def det_tensor(key_index: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """A fixed tensor of ``like``'s shape/dtype for state-dict entry ``name`` (the ``key_index``-th):
    one period of a sine, shaped by the entry's role, tiled (cheap for VGG's 100M-entry matrix)."""
    if not like.is_floating_point():
        return torch.zeros(like.shape, dtype=like.dtype)
    n = like.numel()
    s = torch.sin(torch.arange(min(n, PERIOD), dtype=torch.float64) * 0.7 + key_index * 1.3)
    if name.endswith("running_var"):
        v = 1.0 + 0.5 * s.abs()
    elif name.endswith("running_mean") or name.endswith("bias"):
        v = 0.1 * s
    elif like.dim() >= 2:
        fan_in = n // like.shape[0]
        v = s * (2.0 / math.sqrt(max(1, fan_in)))
    else:  # a norm layer's weight
        v = 1.0 + 0.1 * s
    v = v.to(like.dtype)
    return v.repeat(-(-n // len(v)))[:n].reshape(like.shape)


def det_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: det_tensor(i, k, v) for i, (k, v) in enumerate(model.state_dict().items())}


def det_input(n: int = 2, c: int = 3, h: int = 32, w: int = 32) -> torch.Tensor:
    x = torch.arange(n * c * h * w, dtype=torch.float64)
    return ((torch.sin(x * 0.013) + torch.cos(x * 0.0071)) * 0.5).reshape(n, c, h, w).to(torch.float32)
