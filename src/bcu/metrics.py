"""Honest metrics: clean accuracy (ACC), attack success rate (ASR) on triggered *non-target*
inputs, robust accuracy (RA: triggered inputs still given their true class), and defense
effectiveness (DER). All in percent, 0-100.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

import torch
from torch import nn

from .data import ImageSet
from .errors import DataError
from .train import predict

if TYPE_CHECKING:
    from .attacks import Attack


@dataclass
class Scores:
    acc: float
    asr: Optional[float] = None
    ra: Optional[float] = None

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


def attack_scores(model: nn.Module, test: ImageSet, attack: "Attack", device: str = "cpu",
                  batch_size: int = 1024, triggered: Optional[ImageSet] = None) -> Scores:
    """ACC on ``test``; ASR and RA on its triggered non-target images (all-to-one)."""
    acc = accuracy(model, test, device, batch_size)
    trig = triggered if triggered is not None else attack.triggered_test(test)
    if len(trig) == 0:
        raise DataError("no non-target test images to measure ASR on")
    pred = predict(model, trig.images, batch_size, device).argmax(1)
    asr = float((pred == attack.target_labels(trig.labels)).float().mean()) * 100
    ra = float((pred == trig.labels).float().mean()) * 100
    return Scores(acc, asr, ra)


def asr_by_class(model: nn.Module, test: ImageSet, attack: "Attack", device: str = "cpu",
                 batch_size: int = 1024, triggered: Optional[ImageSet] = None) -> Dict[str, float]:
    """ASR per true (source) class of the triggered non-target test images, keyed by class name
    (or index). A backdoor that flips some classes and not others shows here, not in the mean."""
    trig = triggered if triggered is not None else attack.triggered_test(test)
    if len(trig) == 0:
        raise DataError("no non-target test images to measure ASR on")
    pred = predict(model, trig.images, batch_size, device).argmax(1)
    hit = pred == attack.target_labels(trig.labels)
    names = list(test.classes) if test.classes else None
    out: Dict[str, float] = {}
    for c in sorted(int(v) for v in trig.labels.unique()):
        m = trig.labels == c
        out[names[c] if names and c < len(names) else str(c)] = float(hit[m].float().mean()) * 100
    return out


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
