"""Fine-Pruning (Liu, Dolan-Gavitt, Garg; RAID 2018).

1. Find the last convolution of the network by tracing one forward pass (execution order),
   never by name.
2. Measure each of its channels' mean activation on the clean defense images: the mean of the
   ReLU of the channel's output after the normalisation layer that consumes it (the
   post-activation the paper ranks by, for conv-BN-ReLU nets; the raw conv output where no
   norm follows).
3. Prune channels in increasing order of activation (dormant first), one at a time, while the
   clean accuracy on the defense images stays within ``acc_drop`` points of the unpruned model's
   (the paper's stopping rule: prune until accuracy drops by 4%).
4. Fine-tune the pruned model on the labelled images (the pruned channels stay zero: their
   weights, bias and the norm's affine parameters are zeroed and their gradients masked).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check
from ..data.augment import AugmentConfig
from ..errors import ModelError
from ..train import predict
from .base import DEFENSES, Defense, DefenseResult, Run
from .finetune import FinetuneOptim, finetune, trainable
from .tracing import ConvPair, input_shape_of, pair_conv_norm


@dataclass
class FPConfig:
    """Fine-pruning options (Liu et al. 2018)."""

    acc_drop: float = field(default=4.0, metadata={
        "help": "stop pruning before clean accuracy on the defense images falls more than this many points "
                "below the unpruned model's (paper: 4%)"})
    max_ratio: float = field(default=0.95, metadata={"help": "never prune more than this fraction of the channels"})
    step: int = field(default=1, metadata={"help": "channels pruned per step (paper: one at a time)"})
    finetune: bool = field(default=True, metadata={"help": "fine-tune after pruning (the 'fine' in fine-pruning)"})
    optim: FinetuneOptim = field(default_factory=FinetuneOptim, metadata={"help": "fine-tuning, as the ft baseline"})
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check(self.acc_drop >= 0, f"fp.acc_drop must be >= 0, got {self.acc_drop}")
        check(0 < self.max_ratio <= 1, f"fp.max_ratio must be in (0, 1], got {self.max_ratio}")
        check(self.step >= 1, f"fp.step must be >= 1, got {self.step}")


def last_conv(model: nn.Module, input_shape) -> ConvPair:
    pairs = pair_conv_norm(model, input_shape)
    if not pairs:
        raise ModelError("fine-pruning needs a convolutional layer; the model has none")
    return pairs[-1]


@torch.no_grad()
def channel_activation(model: nn.Module, pair: ConvPair, images: torch.Tensor, device: str,
                       batch_size: int = 512) -> torch.Tensor:
    """Mean post-activation of each channel of ``pair.conv`` on ``images`` (eval mode)."""
    modules = dict(model.named_modules())
    target = modules[pair.norm] if pair.norm else modules[pair.conv]
    sums = torch.zeros(pair.channels, dtype=torch.float64)
    count = 0

    def hook(_m, _inp, out):
        nonlocal count
        a = F.relu(out.detach().float())
        dims = [0] + list(range(2, a.dim()))
        sums.add_(a.mean(dims).double().cpu() * a.shape[0])
        count += a.shape[0]

    h = target.register_forward_hook(hook)
    try:
        predict(model, images, batch_size, device)
    finally:
        h.remove()
    return (sums / max(count, 1)).float()


def channel_mask_hook(module: nn.Module, mask: torch.Tensor):
    """Multiply ``module``'s output channels by ``mask`` (pruning search without touching weights)."""
    def hook(_m, _inp, out):
        shape = [1, -1] + [1] * (out.dim() - 2)
        return out * mask.to(out.device, out.dtype).view(shape)
    return module.register_forward_hook(hook)


def _acc(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str) -> float:
    return float((predict(model, images, 1024, device).argmax(1) == labels).float().mean()) * 100


@torch.no_grad()
def zero_channels(model: nn.Module, pair: ConvPair, idx: torch.Tensor) -> List[nn.Parameter]:
    """Zero the conv's output channels ``idx`` (weight, bias, and the following norm's affine)."""
    modules = dict(model.named_modules())
    touched = []
    for name in [pair.conv] + ([pair.norm] if pair.norm else []):
        for pname in ("weight", "bias"):
            p = getattr(modules[name], pname, None)
            if isinstance(p, nn.Parameter) and p.dim() >= 1 and p.shape[0] == pair.channels:
                p[idx.to(p.device)] = 0
                touched.append(p)
    return touched


def mask_gradients(params: List[nn.Parameter], idx: torch.Tensor) -> list:
    """Keep channels ``idx`` of ``params`` at zero during training (their gradients are zeroed)."""
    handles = []
    for p in params:
        keep = torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
        keep[idx.to(p.device)] = 0
        shape = [-1] + [1] * (p.dim() - 1)
        handles.append(p.register_hook(lambda g, k=keep.view(shape): g * k.to(g.device, g.dtype)))
    return handles


@DEFENSES.register("fp")
class FinePruning(Defense):
    """Fine-Pruning: prune dormant channels of the last conv layer, then fine-tune."""

    Config = FPConfig
    uses_labels = True

    def repair(self, model, data, run: Run) -> DefenseResult:
        cfg = self.config
        device = run.device
        out = model.eval()
        pair = last_conv(out, input_shape_of(out, data))
        modules = dict(out.named_modules())
        act = channel_activation(out, pair, data.images, device)
        order = torch.argsort(act, stable=True)  # dormant first
        base = _acc(out, data.images, data.labels, device)
        mask = torch.ones(pair.channels)
        h = channel_mask_hook(modules[pair.norm] if pair.norm else modules[pair.conv], mask)
        n_pruned = 0
        trace: List[Dict[str, Any]] = [{"pruned": 0, "acc": base}]
        limit = int(cfg.max_ratio * pair.channels)
        try:
            k = cfg.step
            while k <= limit:
                mask.fill_(1)
                mask[order[:k]] = 0
                acc = _acc(out, data.images, data.labels, device)
                trace.append({"pruned": k, "acc": acc})
                if acc < base - cfg.acc_drop:
                    break
                n_pruned = k
                k += cfg.step
        finally:
            h.remove()
        idx = order[:n_pruned]
        params = zero_channels(out, pair, idx)
        acc_pruned = _acc(out, data.images, data.labels, device)
        history: List[Dict[str, Any]] = []
        if cfg.finetune and n_pruned < pair.channels:
            trainable(out)  # before the gradient hooks: a hook needs a parameter that requires grad
            handles = mask_gradients(params, idx)
            try:
                history = finetune(out, data, cfg.optim, cfg.augment, seed=run.seed, device=device,
                                   progress=run.progress, resume_dir=run.resume_dir, desc="fp")
            finally:
                for hd in handles:
                    hd.remove()
            zero_channels(out, pair, idx)  # exact zeros regardless of optimiser arithmetic
        info = {"layer": pair.conv, "norm": pair.norm, "channels": pair.channels,
                "pruned": idx.tolist(), "prune_ratio": n_pruned / pair.channels, "acc_unpruned": base,
                "acc_pruned": acc_pruned, "search": trace}
        return DefenseResult(out, history, info)
