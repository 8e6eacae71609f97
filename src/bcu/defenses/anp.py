"""ANP: Adversarial Neuron Pruning (Wu & Wang; NeurIPS 2021).

Every neuron (channel) of every normalisation layer gets a mask ``m`` in [0, 1] and multiplicative
perturbations ``delta`` (on the affine weight) and ``xi`` (on the affine bias), both in
[-eps, eps]. The layer computes with weight ``gamma * (m + delta)`` and bias ``beta * (1 + xi)``.
Each step first draws the perturbations uniformly in [-eps, eps] and takes one ascent step on
the classification loss (lr eps / steps, then clipping), then updates the masks with
``alpha * L_nat + (1 - alpha) * L_perturbed`` by SGD and clips them to [0, 1]. Neurons whose
mask ends below ``threshold`` are pruned by zeroing their normalisation weight, in a copy of the
original model (as the authors' prune script does). Convolutions with no normalisation layer
after them (found by tracing, see :func:`bcu.defenses.tracing.pair_conv_norm`) get per-output-channel
masks on the conv weight instead.

The threshold is a config value (default 0.2, the paper's); it is never chosen with test ASR.
Defaults: the authors' code (github.com/csdongxian/ANP_backdoor): eps 0.4, alpha 0.2,
one perturbation step, mask lr 0.2 with momentum 0.9, 2000 iterations at batch size 128.
The mask optimisation runs through the shared loop :func:`bcu.train.fit`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..config import check
from ..errors import ModelError
from ..train import OptimConfig, Step, fit
from .base import DEFENSES, Defense, DefenseResult, Run
from .tracing import input_shape_of, is_norm, pair_conv_norm


@dataclass
class ANPConfig:
    """ANP options (defaults: Wu & Wang 2021 and their released code)."""

    eps: float = field(default=0.4, metadata={"help": "perturbation budget of delta and xi (paper: 0.4)"})
    steps: int = field(default=1, metadata={"help": "ascent steps on the perturbation per iteration (paper: 1)"})
    alpha: float = field(default=0.2, metadata={
        "help": "weight of the natural loss; 1 - alpha on the perturbed loss (paper: 0.2)"})
    mask_lr: float = field(default=0.2, metadata={"help": "SGD lr of the masks (paper code: 0.2, momentum 0.9)"})
    iterations: int = field(default=2000, metadata={"help": "mask optimisation steps (paper code: 2000)"})
    batch_size: int = field(default=128, metadata={"help": "images per step (paper code: 128)"})
    threshold: float = field(default=0.2, metadata={"help": "prune neurons whose mask is below this (paper: 0.2)"})

    def __post_init__(self) -> None:
        check(self.eps >= 0, f"anp.eps must be >= 0, got {self.eps}")
        check(self.steps >= 1, f"anp.steps must be >= 1, got {self.steps}")
        check(0 <= self.alpha <= 1, f"anp.alpha must be in [0, 1], got {self.alpha}")
        check(self.mask_lr > 0, f"anp.mask_lr must be > 0, got {self.mask_lr}")
        check(self.iterations >= 1, f"anp.iterations must be >= 1, got {self.iterations}")
        check(self.batch_size >= 1, f"anp.batch_size must be >= 1, got {self.batch_size}")
        check(0 <= self.threshold <= 1, f"anp.threshold must be in [0, 1], got {self.threshold}")


@dataclass
class Target:
    name: str
    kind: str  # "norm" or "conv"
    channels: int


def find_targets(model: nn.Module, input_shape) -> List[Target]:
    """Affine normalisation layers, plus convolutions that no normalisation layer follows."""
    modules = dict(model.named_modules())
    targets = []
    for name, m in modules.items():
        w = getattr(m, "weight", None)
        if is_norm(m) and isinstance(w, nn.Parameter) and w.dim() == 1:
            targets.append(Target(name, "norm", w.numel()))
    for pair in pair_conv_norm(model, input_shape):
        if pair.norm is None or pair.norm not in {t.name for t in targets}:
            targets.append(Target(pair.conv, "conv", pair.channels))
    return targets


class PerturbedModel(nn.Module):
    """The model with neuron masks (trainable) and perturbations (set by the objective)."""

    def __init__(self, model: nn.Module, targets: List[Target]) -> None:
        super().__init__()
        self.model = model
        self.targets = targets
        self.masks = nn.ParameterList([nn.Parameter(torch.ones(t.channels)) for t in targets])
        self.noise_w: List[torch.Tensor] = [torch.zeros(t.channels) for t in targets]
        self.noise_b: List[torch.Tensor] = [torch.zeros(t.channels) for t in targets]
        self.perturb = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = dict(self.model.named_modules())
        params: Dict[str, torch.Tensor] = {}
        for t, m, nw, nb in zip(self.targets, self.masks, self.noise_w, self.noise_b):
            mod = modules[t.name]
            w = mod.weight
            cw = (m + nw.to(m.device)) if self.perturb else m
            shape = [-1] + [1] * (w.dim() - 1)
            params[f"{t.name}.weight"] = w * cw.view(shape).to(w.dtype)
            if getattr(mod, "bias", None) is not None and self.perturb:
                params[f"{t.name}.bias"] = mod.bias * (1 + nb.to(m.device)).to(mod.bias.dtype)
        return functional_call(self.model, params, (x,))


class ANPObjective:
    def __init__(self, cfg: ANPConfig) -> None:
        self.cfg = cfg

    def __call__(self, pm: PerturbedModel, x: torch.Tensor, y: Optional[torch.Tensor], step: Step):
        if y is None:
            raise RuntimeError("anp needs labels")
        cfg = self.cfg
        with torch.no_grad():
            for m in pm.masks:  # projected SGD: the masks live in [0, 1]
                m.clamp_(0, 1)
        if cfg.eps > 0:
            dev = x.device
            noise = []
            for t in pm.targets:
                for _ in range(2):
                    r = (torch.rand(t.channels, generator=step.generator) * 2 - 1) * cfg.eps
                    noise.append(r.to(dev).requires_grad_(True))
            pm.noise_w, pm.noise_b = noise[0::2], noise[1::2]
            pm.perturb = True
            for _ in range(cfg.steps):  # maximise the loss over the perturbation
                loss_adv = F.cross_entropy(pm(x), y)
                grads = torch.autograd.grad(loss_adv, noise, allow_unused=True)
                with torch.no_grad():
                    for n, g in zip(noise, grads):
                        if g is not None:
                            n.add_(g, alpha=cfg.eps / cfg.steps).clamp_(-cfg.eps, cfg.eps)
            pm.noise_w = [n.detach() for n in noise[0::2]]
            pm.noise_b = [n.detach() for n in noise[1::2]]
            loss_rob = F.cross_entropy(pm(x), y)
            pm.perturb = False
        logits = pm(x)
        loss_nat = F.cross_entropy(logits, y)
        loss = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob if cfg.eps > 0 else loss_nat
        return loss, {"loss": float(loss.detach()), "loss_nat": float(loss_nat.detach()),
                      "acc": float((logits.argmax(1) == y).float().mean()) * 100}


@DEFENSES.register("anp")
class ANP(Defense):
    """ANP: learn neuron masks under adversarial neuron perturbation, prune masks below a threshold."""

    Config = ANPConfig
    uses_labels = True

    def repair(self, model, data, run: Run) -> DefenseResult:
        cfg = self.config
        device = run.device
        work = copy.deepcopy(model)  # carries the masks while they are learned; ``model`` is then pruned
        for p in work.parameters():
            p.requires_grad_(False)
        targets = find_targets(work, input_shape_of(work, data))
        if not targets:
            raise ModelError("anp found no normalisation layer or convolution to put neuron masks on")
        pm = PerturbedModel(work, targets).to(device)
        bs = min(cfg.batch_size, len(data))
        steps_per_epoch = max(1, len(data) // bs)
        optim = OptimConfig(epochs=math.ceil(cfg.iterations / steps_per_epoch), batch_size=bs, lr=cfg.mask_lr,
                            momentum=0.9, weight_decay=0.0, schedule="constant")
        history = fit(pm, data, ANPObjective(cfg), optim, augment_cfg=None, seed=run.seed, device=device,
                      with_labels=True, params=list(pm.masks), resume_dir=run.resume_dir, desc="anp",
                      progress=run.progress)
        masks = [m.detach().clamp(0, 1).cpu() for m in pm.masks]
        out = model.eval()
        modules = dict(out.named_modules())
        layers = []
        total = 0
        with torch.no_grad():
            for t, m in zip(targets, masks):
                idx = torch.nonzero(m < cfg.threshold).flatten()
                if len(idx):
                    modules[t.name].weight[idx.to(device)] = 0
                total += len(idx)
                layers.append({"layer": t.name, "kind": t.kind, "channels": t.channels, "pruned": idx.tolist(),
                               "mask_min": float(m.min()), "mask_mean": float(m.mean())})
        info = {"pruned_neurons": total, "neurons": sum(t.channels for t in targets),
                "masks": {t.name: m.tolist() for t, m in zip(targets, masks)}, "layers": layers}
        return DefenseResult(out, history, info)
