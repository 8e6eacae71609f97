"""NAD: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li, Ma; ICLR 2021).

1. Teacher: a copy of the backdoored model fine-tuned with cross-entropy on the clean labelled
   images.
2. Student: the backdoored model, trained with ``CE + sum_i beta_i * AT_i`` where
   ``AT_i = mean((a_s - a_t)^2)`` compares the L2-normalised attention maps
   ``a = sum_c |F_c|^p`` (p = 2) of the student's and teacher's i-th stage outputs.

Stage outputs are found generically: one traced forward pass records every module's 4-d output
in completion order; the *last* output at each spatial resolution is that stage's output (for a
ResNet this is the residual group, for a plain CNN the activation before the next pooling). The
deepest ``len(betas)`` stages are used, as NAD uses the last three groups of its WideResNet.

Defaults: the authors' code (github.com/bboylyg/NAD, config.py): teacher 10 epochs and student
20 epochs at batch size 64, lr 0.1 dropped to 0.01 after 2 epochs, betas (500, 1000, 1000), p = 2.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check, to_dict
from ..data import AugmentConfig
from ..errors import ModelError
from ..train import OptimConfig, Step, fit
from .base import DEFENSES, Defense, DefenseResult
from .ft import finetune, frozen_copy, input_shape_of, require_labels
from .reinit import dry_run


@dataclass
class NADTeacherOptim(OptimConfig):
    """Teacher fine-tuning (NAD code: te_epochs 10, lr 0.1 -> 0.01 after epoch 2, batch 64)."""

    epochs: int = field(default=10, metadata={"help": "teacher fine-tuning epochs (NAD: 10)"})
    batch_size: int = field(default=64, metadata={"help": "NAD: 64"})
    lr: float = field(default=0.1, metadata={"help": "NAD: 0.1, divided by 10 after 2 epochs"})
    schedule: Literal["cosine", "step", "constant"] = field(default="step", metadata={"help": "step schedule as in NAD's adjust_learning_rate"})
    milestones: Tuple[float, ...] = field(default=(0.2,), metadata={"help": "2 of 10 epochs"})


@dataclass
class NADStudentOptim(OptimConfig):
    """Student distillation (NAD code: 20 epochs, lr 0.1 -> 0.01 after epoch 2, batch 64)."""

    epochs: int = field(default=20, metadata={"help": "attention-distillation epochs (NAD: 20)"})
    batch_size: int = field(default=64, metadata={"help": "NAD: 64"})
    lr: float = field(default=0.1, metadata={"help": "NAD: 0.1, divided by 10 after 2 epochs"})
    schedule: Literal["cosine", "step", "constant"] = field(default="step", metadata={"help": "step schedule as in NAD's adjust_learning_rate"})
    milestones: Tuple[float, ...] = field(default=(0.1,), metadata={"help": "2 of 20 epochs"})


@dataclass
class NADConfig:
    """NAD options (defaults: the authors' code)."""

    betas: Tuple[float, ...] = field(default=(500.0, 1000.0, 1000.0), metadata={
        "help": "AT loss weights of the deepest stages, shallow to deep (NAD code: beta1-3 = 500, 1000, 1000)"})
    p: float = field(default=2.0, metadata={"help": "attention map power (NAD: 2)"})
    teacher: NADTeacherOptim = field(default_factory=NADTeacherOptim)
    optim: NADStudentOptim = field(default_factory=NADStudentOptim)
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"help": "NAD code: crop + flip"})

    def __post_init__(self) -> None:
        check(len(self.betas) >= 1, "nad.betas needs at least one weight")
        check(all(b >= 0 for b in self.betas), "nad.betas must be >= 0")
        check(self.p > 0, f"nad.p must be > 0, got {self.p}")


def stage_outputs(model: nn.Module, input_shape: Sequence[int]) -> List[Tuple[str, int, Tuple[int, ...]]]:
    """(module name, call index, output shape) of the last 4-d output at each resolution, shallow first."""
    events: List[Tuple[str, int, Tuple[int, ...]]] = []
    calls: Dict[str, int] = {}
    hooks = []

    def make(name):
        def hook(_m, _inp, out):
            i = calls.get(name, 0)
            calls[name] = i + 1
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                events.append((name, i, tuple(out.shape)))
        return hook

    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(make(name)))
    dry_run(model, input_shape, hooks)
    stages: Dict[Tuple[int, int], Tuple[str, int, Tuple[int, ...]]] = {}
    order: List[Tuple[int, int]] = []
    for name, i, shape in events:
        key = (shape[2], shape[3])
        if key not in stages:
            order.append(key)
        stages[key] = (name, i, shape)  # the last output at this resolution wins
    return [stages[k] for k in order]


class FeatureTap:
    """Captures (a clone of) chosen modules' outputs on every forward pass."""

    def __init__(self, model: nn.Module, points: List[Tuple[str, int, Tuple[int, ...]]]) -> None:
        modules = dict(model.named_modules())
        self.points = points
        self.feats: Dict[int, torch.Tensor] = {}
        self.calls: Dict[str, int] = {}
        self.handles = []
        names = sorted({n for n, _, _ in points})
        for n in names:
            self.handles.append(modules[n].register_forward_hook(self._hook(n)))
        self.handles.append(model.register_forward_pre_hook(lambda *_: self.calls.clear()))

    def _hook(self, name):
        def hook(_m, _inp, out):
            i = self.calls.get(name, 0)
            self.calls[name] = i + 1
            for j, (n, ci, _) in enumerate(self.points):
                if n == name and ci == i:
                    self.feats[j] = out.clone()  # clone: later in-place ops must not touch it
        return hook

    def take(self) -> List[torch.Tensor]:
        out = [self.feats[j] for j in range(len(self.points))]
        self.feats = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """NAD's attention: sum_c |F_c|^p, flattened and L2-normalised per image."""
    am = f.float().abs().pow(p).sum(1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + 1e-6)


def attention_loss(fs: torch.Tensor, ft: torch.Tensor, p: float) -> torch.Tensor:
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


class NADObjective:
    def __init__(self, teacher: nn.Module, t_tap: FeatureTap, s_tap: FeatureTap, betas: Sequence[float],
                 p: float) -> None:
        self.teacher, self.t_tap, self.s_tap, self.betas, self.p = teacher, t_tap, s_tap, list(betas), p

    def __call__(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], step: Step):
        if y is None:
            raise RuntimeError("nad needs labels")
        with torch.no_grad():
            self.teacher(x)
        t_feats = self.t_tap.take()
        logits = model(x)
        s_feats = self.s_tap.take()
        ce = F.cross_entropy(logits, y)
        at = [attention_loss(s, t.detach(), self.p) for s, t in zip(s_feats, t_feats)]
        at_total = sum(b * a for b, a in zip(self.betas, at))
        loss = ce + at_total
        return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()), "at": float(at_total.detach()),
                      "acc": float((logits.argmax(1) == y).float().mean()) * 100}


@DEFENSES.register("nad")
class NAD(Defense):
    """NAD: fine-tune a teacher, then distil its attention maps into the backdoored model."""

    Config = NADConfig
    uses_labels = True

    def run(self, model, data, *, device="cpu", seed=0, progress=None, resume_dir=None) -> DefenseResult:
        cfg = self.config
        data = require_labels(data, self.name)
        t0 = time.time()
        shape = input_shape_of(model, data)
        teacher = copy.deepcopy(model).to(device)
        for q in teacher.parameters():
            q.requires_grad_(True)
        t_hist = finetune(teacher, data, cfg.teacher, cfg.augment, seed=seed + 1, device=device, progress=progress,
                          resume_dir=(resume_dir / "teacher") if resume_dir else None, desc="nad teacher")
        teacher = frozen_copy(teacher, device)
        student = copy.deepcopy(model).to(device)
        for q in student.parameters():
            q.requires_grad_(True)
        stages = stage_outputs(student, shape)
        if not stages:
            raise ModelError("nad needs a network with 4-d (N, C, H, W) feature maps")
        k = min(len(cfg.betas), len(stages))
        points = stages[-k:]
        betas = list(cfg.betas)[-k:]
        t_tap, s_tap = FeatureTap(teacher, points), FeatureTap(student, points)
        try:
            history = fit(student, data, NADObjective(teacher, t_tap, s_tap, betas, cfg.p), cfg.optim,
                          augment_cfg=cfg.augment, seed=seed, device=device, with_labels=True,
                          resume_dir=(resume_dir / "student") if resume_dir else None, desc="nad", progress=progress)
        finally:
            t_tap.remove()
            s_tap.remove()
        student.eval()
        info = {"config": to_dict(cfg), "stages": [{"module": n, "call": i, "shape": list(s)} for n, i, s in points],
                "betas": betas, "teacher_history": t_hist, "images": len(data), "seconds": time.time() - t0}
        return DefenseResult(student, history, info)
