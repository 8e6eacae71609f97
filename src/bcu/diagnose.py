"""Know before you run: a label-free diagnosis of unlabeled images against the suspicious model.

Distillation can only teach the student what the teacher says on the unlabeled images. Before a
cleanse, :func:`diagnose` measures, without labels:

* **which classes the teacher predicts** on the images and how evenly: the share of each class and
  the *effective number of classes* ``exp(H)`` of that distribution (``H`` its entropy in nats;
  ``K`` for a balanced set, 1 when every image gets the same class);
* **how confident** the teacher is: the mean of its largest softmax probability;
* where the model has **BatchNorm**, how far the images' feature statistics at every BatchNorm
  input are from the running statistics the model stored in training: per channel the KL
  divergence ``KL(N(mu_b, var_b) || N(mu_r, var_r))`` between the two Gaussians (0 when the batch
  statistics equal the stored ones), averaged over channels; reported per layer and as the mean
  over layers. Images of another kind move the statistics of the first layers most.

A class the teacher predicts for fewer than ``min_share / K`` of the images (and fewer than
``min_images``) cannot be taught by these images: the diagnosis says so, and so does every
threshold that is crossed (:attr:`DataDiagnosis.warnings`). The thresholds were measured on
Fashion-MNIST models with in-distribution and other real images (docs/method.md).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .errors import DataError
from .train import predict


@dataclass
class DiagnosisConfig:
    """Thresholds of the warnings (measured, docs/method.md)."""

    min_share: float = 0.2     # a class needs at least min_share / K of the images ...
    min_images: int = 20       # ... or at least this many, to count as taught
    min_effective: float = 0.7  # warn below this fraction of K effective classes
    min_confidence: float = 0.6  # warn below this mean top-1 probability
    # warn above this mean BatchNorm KL; measured on cnn-small (docs/method.md): held-out Fashion-MNIST 0.002,
    # half of its classes 0.018, animal silhouettes 0.036, handwritten digits 0.10, the synthetic task 0.36
    # (and 0.025 on the held-out images of a 6-epoch model of the synthetic task): 0.08 leaves 3x room above those
    max_bn_shift: float = 0.08
    images: int = 5000         # diagnose at most this many images (a deterministic subset)


@dataclass
class DataDiagnosis:
    images: int
    num_classes: int
    predicted: List[int]
    share: List[float]
    effective_classes: float
    untaught: List[int]
    confidence: float
    bn_shift: Optional[float]
    bn_layers: List[Dict[str, Any]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.warnings

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def lines(self, classes: Optional[List[str]] = None) -> List[str]:
        """A short human-readable summary."""
        name = (lambda k: classes[k] if classes and k < len(classes) else str(k))
        shares = ", ".join(f"{name(k)} {100 * s:.1f}%" for k, s in enumerate(self.share))
        out = [f"unlabeled images: {self.images}; the model predicts {sum(c > 0 for c in self.predicted)} of "
               f"{self.num_classes} classes on them, effective number of classes {self.effective_classes:.2f}",
               f"  predicted shares: {shares}",
               f"  mean confidence (top-1 probability): {self.confidence:.3f}"]
        if self.bn_shift is not None:
            worst = max(self.bn_layers, key=lambda l: l["kl"])
            out.append(f"  BatchNorm statistics shift (mean KL over {len(self.bn_layers)} layers): {self.bn_shift:.3f}"
                       f" (largest {worst['kl']:.3f} at {worst['layer']})")
        for w in self.warnings:
            out.append(f"warning: {w}")
        return out


def _bn_inputs(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None and m.running_var is not None]


@torch.no_grad()
def bn_shift(model: nn.Module, images: torch.Tensor, device: str = "cpu", batch_size: int = 500) -> List[Dict[str, Any]]:
    """Per BatchNorm layer: mean over channels of KL(N(batch stats) || N(running stats)) of its input
    over ``images`` (eval mode; the model is not changed)."""
    bns = _bn_inputs(model)
    if not bns:
        return []
    sums: Dict[str, List[torch.Tensor]] = {n: [] for n, _ in bns}

    def hook(name):
        def pre(_m, inp):
            x = inp[0].detach().double()
            dims = [0] + list(range(2, x.dim()))
            cnt = x.numel() // x.shape[1]
            s, s2 = x.sum(dims), (x * x).sum(dims)
            if sums[name]:
                sums[name][0] += s
                sums[name][1] += s2
                sums[name][2] += cnt
            else:
                sums[name] = [s, s2, torch.tensor(float(cnt), dtype=torch.float64)]
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in bns]
    try:
        predict(model, images, batch_size, device)
    finally:
        for h in handles:
            h.remove()
    out = []
    for n, m in bns:
        s, s2, cnt = (t.cpu() for t in sums[n])
        mu = s / cnt
        var = (s2 / cnt - mu * mu).clamp_min(0) + m.eps
        mu_r = m.running_mean.detach().double().cpu()
        var_r = m.running_var.detach().double().cpu().clamp_min(0) + m.eps
        kl = 0.5 * ((var + (mu - mu_r) ** 2) / var_r - 1 - torch.log(var / var_r))
        out.append({"layer": n, "channels": int(kl.numel()), "kl": float(kl.mean())})
    return out


def diagnose(model: nn.Module, images: torch.Tensor, num_classes: Optional[int] = None, device: str = "cpu",
             cfg: Optional[DiagnosisConfig] = None) -> DataDiagnosis:
    """Diagnose uint8 (N, C, H, W) ``images`` (no labels) against ``model``; see the module docstring."""
    cfg = cfg or DiagnosisConfig()
    if images.shape[0] == 0:
        raise DataError("no unlabeled images to diagnose")
    if images.shape[0] > cfg.images:
        g = torch.Generator().manual_seed(0)
        images = images[torch.randperm(images.shape[0], generator=g)[:cfg.images].sort().values]
    logits = predict(model, images, 1024, device).float()
    k = int(num_classes or logits.shape[1])
    prob = logits.softmax(1)
    pred = prob.argmax(1)
    counts = torch.bincount(pred, minlength=k)[:k]
    n = int(images.shape[0])
    share = counts.double() / n
    nz = share[share > 0]
    eff = float(torch.exp(-(nz * nz.log()).sum()))
    need = max(1, min(cfg.min_images, math.ceil(cfg.min_share * n / k)))
    untaught = [c for c in range(k) if int(counts[c]) < need and share[c] < cfg.min_share / k]
    conf = float(prob.max(1).values.mean())
    layers = bn_shift(model, images, device)
    shift = sum(l["kl"] for l in layers) / len(layers) if layers else None
    warnings = []
    if untaught:
        warnings.append(f"the model predicts {len(untaught)} of {k} classes for almost none of these images "
                        f"(classes {', '.join(map(str, untaught))}: fewer than {need} image{'s' if need > 1 else ''} each); "
                        f"distillation cannot teach them, so expect the cleansed model to lose them")
    if eff < cfg.min_effective * k:
        warnings.append(f"the predicted classes are uneven (effective number {eff:.2f} of {k})")
    if conf < cfg.min_confidence:
        warnings.append(f"the model is unsure on these images (mean confidence {conf:.2f}): they may not be of the "
                        f"kind it was trained on")
    if shift is not None and shift > cfg.max_bn_shift:
        warnings.append(f"the images' feature statistics are far from those the model was trained on (BatchNorm "
                        f"shift {shift:.2f} > {cfg.max_bn_shift})")
    return DataDiagnosis(n, k, [int(c) for c in counts], [float(s) for s in share], eff, untaught, conf, shift,
                         layers, warnings)
