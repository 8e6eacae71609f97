"""FT: plain fine-tuning on the labelled clean subset (the baseline of Liu et al. 2018 and of
NAD, Li et al. 2021).

Fine-tuning runs through the shared loop :func:`bcu.train.fit` with cross-entropy on the defense
images and their labels. Defaults follow the fine-tuning baseline of the NAD paper (Li et al.,
ICLR 2021, Sec. 4.1): SGD, momentum 0.9, weight decay 5e-4, 20 epochs, lr 0.01.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data.augment import AugmentConfig
from .base import DEFENSES, Defense, DefenseResult, Run
from .finetune import FinetuneOptim, finetune, trainable


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

    def repair(self, model, data, run: Run) -> DefenseResult:
        history = finetune(trainable(model), data, self.config.optim, self.config.augment, seed=run.seed,
                           device=run.device, progress=run.progress, resume_dir=run.resume_dir, desc="ft")
        return DefenseResult(model, history, {"images": len(data)})
