"""FT: plain fine-tuning on the labelled clean subset (the baseline of Liu et al. 2018 and of
NAD, Li et al. 2021), plus the helpers every label-using baseline shares.

Fine-tuning runs through the shared loop :func:`bcu.train.fit` with cross-entropy on the defense
images and their labels. Defaults follow the fine-tuning baseline of the NAD paper (Li et al.,
ICLR 2021, Sec. 4.1): SGD, momentum 0.9, weight decay 5e-4, 20 epochs, lr 0.01.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import to_dict
from ..data import AugmentConfig, ImageSet
from ..errors import DataError
from ..train import OptimConfig, cross_entropy_objective, fit
from .base import DEFENSES, Defense, DefenseResult


@dataclass
class FinetuneOptim(OptimConfig):
    """SGD for fine-tuning baselines (NAD paper, Sec. 4.1: 20 epochs, lr 0.01, momentum 0.9, wd 5e-4)."""

    epochs: int = field(default=20, metadata={"help": "fine-tuning epochs (NAD paper's FT baseline: 20)"})
    batch_size: int = field(default=64, metadata={"help": "images per step (NAD code: 64)"})
    lr: float = field(default=0.01, metadata={"help": "initial learning rate (NAD paper's FT baseline: 0.01)"})


def require_labels(data: Optional[ImageSet], name: str) -> ImageSet:
    """Raise a clear DataError unless ``data`` has labels (label-using baselines)."""
    if data is None or len(data) == 0:
        raise DataError(f"defense {name!r} needs images")
    if data.labels is None:
        raise DataError(f"defense {name!r} uses labels; the data has none")
    return data


def input_shape_of(model: nn.Module, data: Optional[ImageSet] = None,
                   fallback: Optional[Tuple[int, int, int]] = None) -> Tuple[int, int, int]:
    """(C, H, W) the model takes: from its spec, else the data, else ``fallback``."""
    spec = getattr(model, "spec", None)
    if spec is not None:
        return tuple(int(v) for v in spec.input_shape)  # type: ignore[return-value]
    if data is not None:
        return data.shape
    if fallback is not None:
        return tuple(int(v) for v in fallback)  # type: ignore[return-value]
    raise DataError("cannot tell the model's input shape: give images or an input_shape option")


def frozen_copy(model: nn.Module, device: str) -> nn.Module:
    """An eval-mode copy with no trainable parameters (teachers, endpoints)."""
    m = copy.deepcopy(model).to(device).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def finetune(model: nn.Module, data: ImageSet, optim: OptimConfig, augment: Optional[AugmentConfig], *, seed: int,
             device: str, progress: Optional[bool], resume_dir: Optional[Path], desc: str,
             params=None) -> List[Dict[str, Any]]:
    """Cross-entropy fine-tuning of ``model`` in place through the shared loop."""
    return fit(model, data, cross_entropy_objective, optim, augment_cfg=augment, seed=seed, device=device,
               with_labels=True, params=params, resume_dir=resume_dir, desc=desc, progress=progress)


@dataclass
class FTConfig:
    """Fine-tuning baseline (defaults: NAD paper's FT baseline, Li et al. 2021)."""

    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={
        "help": "standard crop + flip augmentation, as in the NAD code"})


@DEFENSES.register("ft")
class FineTune(Defense):
    """FT: fine-tune on the labelled clean images (cross-entropy)."""

    Config = FTConfig
    uses_labels = True

    def run(self, model, data, *, device="cpu", seed=0, progress=None, resume_dir=None) -> DefenseResult:
        data = require_labels(data, self.name)
        t0 = time.time()
        out = copy.deepcopy(model).to(device)
        for p in out.parameters():
            p.requires_grad_(True)
        history = finetune(out, data, self.config.optim, self.config.augment, seed=seed, device=device,
                           progress=progress, resume_dir=resume_dir, desc="ft")
        out.eval()
        return DefenseResult(out, history, {"config": to_dict(self.config), "images": len(data),
                                            "seconds": time.time() - t0})
