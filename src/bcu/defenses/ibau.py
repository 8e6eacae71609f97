"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng, Chen, Park, Mao, Jin, Jia; ICLR 2022).

The minimax problem ``min_theta max_delta L(theta, delta)`` over one universal perturbation
``delta`` (bounded in L2 norm) is solved in rounds:

* inner maximisation: ``delta`` starts at zero and takes one SGD step (lr 10) per batch on
  ``-CE(f(x + delta), f(x).argmax) + 0.001 ||delta||^2`` over one pass of the data, then is
  projected onto the L2 ball of radius ``pert_norm``;
* outer minimisation: for every batch, the *implicit hypergradient* of the outer loss
  ``CE(f(x + patch), y)`` (the perturbation pasted on a ``portion`` of the batch) with respect to
  the model parameters, through the fixed point ``delta* = T(delta*, theta)`` of the inner
  gradient-descent map ``T(d) = d - 0.1 * grad_d L_inner(d, theta)``; the vector
  ``v = (I - dT/ddelta)^-T grad_delta L_outer`` is computed by ``K`` fixed-point iterations
  ``v <- (dT/ddelta)^T v + grad_delta L_outer``, exactly as the authors' ``hypergrad.fixed_point``.

The hypergradient ``grad_theta L_outer + (dT/dtheta)^T v`` is delivered to the shared loop
:func:`bcu.train.fit` as the gradient of the surrogate ``L_outer + <v, T(delta, theta)>`` (v
detached), so one ``backward`` yields it exactly. Rounds are the loop's epochs; the next round's
perturbation is found in the epoch hook and saved with the objective in each resume checkpoint.

Defaults: the authors' code (github.com/YiZeng623/I-BAU) as also reproduced by BackdoorToolbox:
batch 100, 3 rounds, K = 5, inner lr 0.1, perturbation lr 10 and L2 radius 10, portion 0.01, and
the outer optimiser Adam at lr 0.001 (``optimizer: sgd`` with ``lr: 0.01`` is bcu 0.1's SGD,
momentum 0.9). The perturbation lives in the model's input space ([0, 1] pixels, before the
model's normalisation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import seeding
from ..config import check
from ..data.imageset import ImageSet, batches
from ..resume import malformed
from ..train import OptimConfig, Step, fit
from .base import DEFENSES, Defense, DefenseResult, Run
from .finetune import trainable


@dataclass
class IBAUConfig:
    """I-BAU options (defaults: the authors' released script unless noted)."""

    rounds: int = field(default=3, metadata={"help": "outer rounds (max-min alternations; authors' default: 3)"})
    K: int = field(default=5, metadata={"help": "fixed-point iterations of the implicit hypergradient (paper: 5)"})
    batch_size: int = field(default=100, metadata={"help": "images per step (authors' script: 100)"})
    optimizer: Literal["adam", "sgd"] = field(default="adam", metadata={
        "help": "outer optimiser: adam (authors' code) or sgd with momentum 0.9 (bcu 0.1)"})
    lr: float = field(default=0.001, metadata={"help": "outer lr (authors' code: Adam at 0.001)"})
    inner_lr: float = field(default=0.1, metadata={"help": "step of the inner fixed-point map T (authors: 0.1)"})
    pert_lr: float = field(default=10.0, metadata={"help": "SGD lr of the perturbation search (authors: 10)"})
    pert_norm: float = field(default=10.0, metadata={"help": "L2 radius of the perturbation (authors: 10)"})
    reg: float = field(default=0.001, metadata={"help": "weight of ||delta||^2 in the inner loss (authors: 0.001)"})
    portion: float = field(default=0.01, metadata={
        "help": "fraction of each batch that carries the perturbation in the outer loss (authors: 0.01; at least 1 image)"})

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "ibau.rounds must be >= 1")
        check(self.K >= 1, "ibau.K must be >= 1")
        check(self.batch_size >= 1, "ibau.batch_size must be >= 1")
        for n in ("lr", "inner_lr", "pert_lr", "pert_norm"):
            check(getattr(self, n) > 0, f"ibau.{n} must be > 0")
        check(0 <= self.portion <= 1, "ibau.portion must be in [0, 1]")


def find_perturbation(model: nn.Module, data: ImageSet, cfg: IBAUConfig, device: str, seed: int) -> torch.Tensor:
    """The inner maximisation: one universal perturbation over one pass of the (label-free) data."""
    was = model.training
    model.eval()
    pert = torch.zeros(1, *data.shape, device=device, requires_grad=True)
    opt = torch.optim.SGD([pert], lr=cfg.pert_lr)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for x, _ in batches(data, cfg.batch_size, shuffle=True, generator=seeding.generator(seed),
                            device=device, with_labels=False):
            with torch.no_grad():
                pseudo = model(x).argmax(1)
            loss = -F.cross_entropy(model(x + pert), pseudo) + cfg.reg * pert.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was)
    with torch.no_grad():
        d = pert.detach()
        return d * min(1.0, cfg.pert_norm / (float(d.norm()) + 1e-12))


class IBAUObjective:
    """The outer loss and its implicit hypergradient for the current round's perturbation ``pert``,
    which is part of every resume checkpoint (a resumed run continues with the same perturbation)."""

    def __init__(self, cfg: IBAUConfig, pert: torch.Tensor) -> None:
        self.cfg = cfg
        self.pert = pert

    def state_dict(self) -> Dict[str, Any]:
        return {"pert": self.pert.detach().cpu()}

    def load_state_dict(self, state: Any, where: Path) -> None:
        pert = state.get("pert") if isinstance(state, dict) else None
        if not isinstance(pert, torch.Tensor) or pert.shape != self.pert.shape or not pert.is_floating_point() \
                or not torch.isfinite(pert).all():
            raise malformed(where, "objective.pert", f"expected a finite perturbation of shape {tuple(self.pert.shape)}")
        self.pert = pert.to(self.pert.device, self.pert.dtype)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], step: Step):
        if y is None:
            raise RuntimeError("ibau needs labels")
        cfg = self.cfg
        d = self.pert.to(x.device).detach().requires_grad_(True)

        def inner(dd):
            return -F.cross_entropy(model(x + dd), y) + cfg.reg * dd.pow(2).sum()

        # the outer loss: the perturbation pasted on a random `portion` of the batch
        n = x.shape[0]
        k = max(1, int(n * cfg.portion)) if cfg.portion > 0 else 0
        sel = torch.zeros(n, 1, 1, 1, device=x.device)
        if k:
            sel[torch.randperm(n, generator=step.generator)[:k].to(x.device)] = 1
        logits = model(x + sel * d)
        outer = F.cross_entropy(logits, y)
        g_out_d = torch.autograd.grad(outer, d, retain_graph=True)[0]
        # fixed-point map T(d) = d - inner_lr * grad_d inner(d); its Jacobians via autograd
        g_in = torch.autograd.grad(inner(d), d, create_graph=True)[0]
        mapped = d - cfg.inner_lr * g_in
        v = torch.zeros_like(d)
        for _ in range(cfg.K):
            v = torch.autograd.grad(mapped, d, grad_outputs=v, retain_graph=True)[0] + g_out_d
        surrogate = outer + (v.detach() * mapped).sum()  # d/dtheta = grad_theta outer + (dT/dtheta)^T v
        return surrogate, {"loss": float(outer.detach()), "acc": float((logits.argmax(1) == y).float().mean()) * 100,
                           "pert_norm": float(d.detach().norm())}


@DEFENSES.register("ibau")
class IBAU(Defense):
    """I-BAU: minimax unlearning of a universal perturbation with implicit hypergradients."""

    Config = IBAUConfig
    uses_labels = True

    def repair(self, model, data, run: Run) -> DefenseResult:
        cfg = self.config
        device, seed = run.device, run.seed
        out = trainable(model)
        unl = data.without_labels()
        objective = IBAUObjective(cfg, find_perturbation(out, unl, cfg, device, seed))

        def next_round(epoch: int, m: nn.Module) -> Dict[str, Any]:
            objective.pert = find_perturbation(m, unl, cfg, device, seed * 7919 + epoch + 1)
            return {"next_pert_norm": float(objective.pert.norm())}

        bs = min(cfg.batch_size, len(data))
        optim = OptimConfig(epochs=cfg.rounds, batch_size=bs, optimizer=cfg.optimizer, lr=cfg.lr, momentum=0.9,
                            weight_decay=0.0, schedule="constant")
        history = fit(out, data, objective, optim, augment_cfg=None, seed=seed, device=device, with_labels=True,
                      epoch_hook=next_round, resume_dir=run.resume_dir, desc="ibau", progress=run.progress)
        return DefenseResult(out, history, {"images": len(data)})
