"""CLP: data-free backdoor removal by Channel Lipschitzness-based Pruning (Zheng, Zhang, Wang,
Zhang; ECCV 2022).

For every convolution whose output feeds a normalisation layer, the conv and the (eval-mode)
BatchNorm are combined per output channel k as ``W_k * |gamma_k| / sigma_k``; the channel's
*upper bound of the channel Lipschitz constant* (UCLC) is the spectral norm of that combined
kernel reshaped to (in_channels, kh*kw). Within each layer, channels with
``UCLC > mean + u * std`` are pruned by zeroing the normalisation layer's weight and bias for that
channel (as in the authors' code). No image is used.

Conv -> norm pairs are found by tracing one forward pass on zeros
(:func:`bcu.defenses.tracing.pair_conv_norm`): never by module names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import check
from ..errors import ModelError
from .base import DEFENSES, Defense, DefenseResult, Run
from .tracing import input_shape_of, pair_conv_norm

def _norm_scale(norm: nn.Module, channels: int) -> torch.Tensor:
    """Per-channel |gamma| / sigma of an eval-mode norm layer (|gamma| alone without running stats)."""
    w = getattr(norm, "weight", None)
    gamma = w.detach().abs() if w is not None else torch.ones(channels)
    var = getattr(norm, "running_var", None)
    if var is not None:
        return gamma / (var.detach() + getattr(norm, "eps", 1e-5)).sqrt()
    return gamma


@torch.no_grad()
def channel_lipschitz(conv: nn.Module, norm: Optional[nn.Module]) -> torch.Tensor:
    """UCLC of every output channel of ``conv`` (combined with ``norm`` when given), batched."""
    w = conv.weight.detach().float()
    k = w.reshape(w.shape[0], w.shape[1], -1)  # (out, in/groups, kh*kw)
    if norm is not None:
        k = k * _norm_scale(norm, w.shape[0]).float().to(k.device)[:, None, None]
    return torch.linalg.matrix_norm(k, ord=2)


@dataclass
class CLPConfig:
    """CLP options (default u = 3: the paper's setting for CIFAR-10, Zheng et al. 2022, Sec. 5)."""

    u: float = field(default=3.0, metadata={"help": "prune channels with UCLC > mean + u * std of their layer (paper: 3)"})
    include_unpaired: bool = field(default=False, metadata={
        "help": "also prune convs with no norm layer by their own kernel's spectral norm (paper: conv+BN only)"})
    input_shape: Optional[Tuple[int, int, int]] = field(default=None, metadata={
        "help": "C,H,W for tracing when the model has no spec"})

    def __post_init__(self) -> None:
        check(self.u >= 0, f"clp.u must be >= 0, got {self.u}")


@DEFENSES.register("clp")
class CLP(Defense):
    """CLP: data-free pruning of channels with an outlying Lipschitz upper bound."""

    Config = CLPConfig
    uses_labels = False
    uses_data = False

    def repair(self, model, data, run: Run) -> DefenseResult:
        out = model.eval()
        shape = input_shape_of(out, data, self.config.input_shape)
        pairs = pair_conv_norm(out, shape)
        modules = dict(out.named_modules())
        layers: List[Dict[str, Any]] = []
        total = 0
        with torch.no_grad():
            for pair in pairs:
                if pair.norm is None and not self.config.include_unpaired:
                    continue
                conv = modules[pair.conv]
                norm = modules[pair.norm] if pair.norm else None
                lips = channel_lipschitz(conv, norm)
                if lips.numel() < 2:
                    continue
                thr = lips.mean() + self.config.u * lips.std()
                idx = torch.nonzero(lips > thr).flatten()
                if len(idx):
                    if norm is not None:
                        for pname in ("weight", "bias"):
                            p = getattr(norm, pname, None)
                            if p is not None:
                                p[idx] = 0
                    else:
                        conv.weight[idx] = 0
                        if conv.bias is not None:
                            conv.bias[idx] = 0
                total += len(idx)
                layers.append({"conv": pair.conv, "norm": pair.norm, "channels": pair.channels,
                               "pruned": idx.tolist(), "threshold": float(thr), "max_uclc": float(lips.max())})
        if not any(p.norm for p in pairs) and not self.config.include_unpaired:
            raise ModelError("clp found no convolution followed by a normalisation layer "
                             "(set include_unpaired=true to use the kernels alone)")
        return DefenseResult(out, [], {"layers": layers, "pruned_channels": total})
