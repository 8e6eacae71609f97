"""Honest metrics: clean accuracy (ACC), attack success rate (ASR) on triggered *non-target*
inputs, robust accuracy (RA: triggered inputs still given their true class), and defense
effectiveness (DER). All in percent, 0-100.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Sequence

import torch
from torch import nn

from .data.imageset import ImageSet
from .errors import DataError
from .train import predict

if TYPE_CHECKING:
    from .attacks import Attack


@dataclass
class Scores:
    acc: float
    asr: Optional[float] = None
    ra: Optional[float] = None
    asr_by_class: Optional[Dict[str, float]] = None  # from the same predictions as ``asr``; not in as_dict()

    def as_dict(self) -> Dict[str, Optional[float]]:
        return {"acc": self.acc, "asr": self.asr, "ra": self.ra}


def accuracy(model: nn.Module, data: ImageSet, device: str = "cpu", batch_size: int = 1024) -> float:
    """Percentage of ``data`` classified as its label."""
    if data.labels is None:
        raise DataError("accuracy needs labels")
    if len(data) == 0:
        raise DataError("accuracy of an empty set is undefined")
    pred = predict(model, data.images, batch_size, device).argmax(1)
    return float((pred == data.labels).float().mean()) * 100


def rate_by_class(hit: torch.Tensor, labels: torch.Tensor, classes: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Percentage of ``hit`` per label present, keyed by class name (or the index as a string)."""
    out: Dict[str, float] = {}
    for c in sorted(int(v) for v in labels.unique()):
        name = classes[c] if classes and c < len(classes) else str(c)
        out[name] = float(hit[labels == c].float().mean()) * 100
    return out


def attack_scores(model: nn.Module, test: ImageSet, attack: "Attack", device: str = "cpu",
                  batch_size: int = 1024, triggered: Optional[ImageSet] = None) -> Scores:
    """ACC on ``test``; ASR and RA on its triggered non-target images (all-to-one), and ASR per
    true (source) class from the same predictions (``Scores.asr_by_class``, keyed by class name or
    index: a backdoor that flips some classes and not others shows there, not in the mean)."""
    acc = accuracy(model, test, device, batch_size)
    trig = triggered if triggered is not None else attack.triggered_test(test)
    if len(trig) == 0:
        raise DataError("no non-target test images to measure ASR on")
    pred = predict(model, trig.images, batch_size, device).argmax(1)
    hit = pred == attack.target_labels(trig.labels)
    ra = float((pred == trig.labels).float().mean()) * 100
    return Scores(acc, float(hit.float().mean()) * 100, ra, rate_by_class(hit, trig.labels, test.classes))


def der(before: Scores, after: Scores) -> float:
    """Defense effectiveness rating, percent: (max(0, dASR) - max(0, dACC) + 100) / 2.

    dASR = ASR_before - ASR_after (a drop is good), dACC = ACC_before - ACC_after (a drop is bad).
    50 means "no change"; 100 means ASR fell by 100 points at no accuracy cost.
    """
    if before.asr is None or after.asr is None:
        raise ValueError("DER needs ASR before and after")
    return (max(0.0, before.asr - after.asr) - max(0.0, before.acc - after.acc) + 100.0) / 2.0


@torch.inference_mode()
def agreement(student: nn.Module, teacher: nn.Module, images: torch.Tensor, device: str = "cpu",
              batch_size: int = 1024) -> float:
    """Percentage of images on which two models predict the same class (needs no labels)."""
    a = predict(student, images, batch_size, device).argmax(1)
    b = predict(teacher, images, batch_size, device).argmax(1)
    return float((a == b).float().mean()) * 100
