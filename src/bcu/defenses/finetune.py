"""Training helpers the label-using baselines share (not a method of its own): the fine-tuning
optimiser of the NAD paper's FT baseline, cross-entropy fine-tuning through the shared loop, and
frozen copies for teachers and curve endpoints."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from ..data.augment import AugmentConfig
from ..data.imageset import ImageSet
from ..train import OptimConfig, cross_entropy_objective, fit


@dataclass
class FinetuneOptim(OptimConfig):
    """SGD for fine-tuning baselines (NAD paper, Sec. 4.1: 20 epochs, lr 0.01, momentum 0.9, wd 5e-4)."""

    epochs: int = field(default=20, metadata={"help": "fine-tuning epochs (NAD paper's FT baseline: 20)"})
    batch_size: int = field(default=64, metadata={"help": "images per step (NAD code: 64)"})
    lr: float = field(default=0.01, metadata={"help": "initial learning rate (NAD paper's FT baseline: 0.01)"})


def trainable(model: nn.Module) -> nn.Module:
    """``model`` with every parameter trainable (in place)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


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
