"""Label-consistent backdoor (Turner, Tsipras & Madry, 2019): a clean-label attack.

Target-class training images are first made *hard to classify* with a projected-gradient (PGD)
adversarial perturbation bounded in L-inf (or, ``norm="l2"``, in L2 as in the authors' released
poisoned sets), so that a model can no longer fit them from their content alone, and then
stamped with a 3x3 black/white checkerboard in all four corners (the paper's flip-robust
"all-corners" trigger; the right-hand corners are the left-hand pattern mirrored). Labels are
never changed. At test time the full-amplitude trigger is stamped on non-target images.

The perturbation needs a clean model. Turner et al. used a (adversarially trained) pre-trained
model; here ``poison(train, model)`` takes one (and runs PGD on the model's device), and
``train()`` first trains a clean *surrogate* of the same architecture on the same (unpoisoned)
training set for ``surrogate_epochs`` epochs (:meth:`LabelConsistent.clean_model`), by plain
cross-entropy or (``surrogate="adversarial"``) by Madry et al.'s PGD adversarial training.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import seeding
from ..config import check
from ..data.augment import AugmentConfig
from ..data.imageset import ImageSet, pixel_stats, to_float
from ..errors import DataError
from ..models import Classifier, build, create_model
from ..train import OptimConfig, Step, cross_entropy_objective, fit
from .base import ATTACKS, Attack, AttackConfig, Training, clean_label_poison_rate, quantize

# Turner et al.'s corner pattern (1 = white, 0 = black) for the left-hand corners.
LEFT_CORNER = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


@dataclass
class LCConfig(AttackConfig):
    poison_rate: float = clean_label_poison_rate("Turner et al.")
    norm: Literal["linf", "l2"] = field(default="linf", metadata={
        "help": "norm of the PGD bound: L-inf or L2 (Turner et al. release both; their code's default base set "
                "is L2 300)"})
    epsilon: float = field(default=16.0, metadata={
        "help": "bound of the PGD perturbation on the 0-255 pixel scale, in the chosen norm (Turner et al. 2019: "
                "L-inf 8, 16, 32; L2 300, 600, 1200 on 3x32x32; measured on Fashion-MNIST in docs/attacks.md)"})
    pgd_steps: int = field(default=10, metadata={"help": "PGD iterations (Madry et al. 2018 style)"})
    step_size: Optional[float] = field(default=None, metadata={
        "help": "PGD step on the 0-255 scale (default: 2 for L-inf, Madry et al.'s CIFAR-10 setting; "
                "2.5 epsilon / pgd_steps for L2)"})
    trigger: Literal["all-corners", "bottom-right"] = field(default="all-corners", metadata={
        "help": "3x3 checkerboard in all four corners (paper) or only bottom-right"})
    amplitude: float = field(default=1.0, metadata={
        "help": "trigger amplitude on training images, 0-1 scale (1 = full, the paper's default; "
                "reduced amplitudes such as 16/255 add +-amplitude instead of overwriting)"})
    test_amplitude: float = field(default=1.0, metadata={"help": "trigger amplitude at test time (paper: full)"})
    surrogate: Literal["standard", "adversarial"] = field(default="standard", metadata={
        "help": "how the clean surrogate that the perturbations come from is trained: by plain cross-entropy, or "
                "adversarially (Madry et al. 2018 PGD training, as Turner et al.'s models were; measured weaker "
                "on Fashion-MNIST, docs/attacks.md)"})
    surrogate_epsilon: float = field(default=8.0, metadata={
        "help": "L-inf bound of the adversarial surrogate's training PGD, 0-255 scale (Turner et al.'s "
                "CIFAR-10 models: 8)"})
    surrogate_pgd_steps: int = field(default=5, metadata={
        "help": "PGD steps per batch while training the adversarial surrogate (step 2.5 epsilon / steps, "
                "Madry et al.)"})
    surrogate_epochs: Optional[int] = field(default=None, metadata={
        "help": "epochs of the clean surrogate that train() fits when no clean model is given "
                "(default: the attack's own training epochs)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.epsilon >= 0, f"epsilon must be >= 0, got {self.epsilon}")
        check(self.pgd_steps >= 0, f"pgd_steps must be >= 0, got {self.pgd_steps}")
        check(self.step_size is None or self.step_size > 0, f"step_size must be > 0, got {self.step_size}")
        check(0 < self.amplitude <= 1, f"amplitude must be in (0, 1], got {self.amplitude}")
        check(0 < self.test_amplitude <= 1, f"test_amplitude must be in (0, 1], got {self.test_amplitude}")
        check(self.surrogate_epochs is None or self.surrogate_epochs >= 1, "surrogate_epochs must be >= 1")
        check(0 <= self.surrogate_epsilon <= 255,
              f"surrogate_epsilon must be in [0, 255], got {self.surrogate_epsilon}")
        check(self.surrogate_pgd_steps >= 1, f"surrogate_pgd_steps must be >= 1, got {self.surrogate_pgd_steps}")
        if self.norm == "l2":
            check(self.epsilon > 0 or self.pgd_steps == 0, "an L2 bound needs epsilon > 0")
        else:
            check(self.epsilon <= 255, f"an L-inf epsilon must be <= 255, got {self.epsilon}")

    @property
    def step(self) -> float:
        """The PGD step on the 0-255 scale, with the per-norm default filled in."""
        if self.step_size is not None:
            return self.step_size
        return 2.0 if self.norm == "linf" else 2.5 * self.epsilon / max(self.pgd_steps, 1)


def _ascend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, steps: int,
            step_and_project) -> torch.Tensor:
    """Shared PGD loop: ``steps`` times, take the cross-entropy gradient w.r.t. ``delta``, let
    ``step_and_project(delta, grad)`` move and project it, then clip x + delta to [0, 1]."""
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = step_and_project(delta.detach(), grad)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
             generator: torch.Generator) -> torch.Tensor:
    """Untargeted L-inf PGD with a random start (Madry et al. 2018); x in [0, 1], returns x + delta."""
    if eps <= 0 or steps == 0:
        return x.clone()
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1).to(x.device, x.dtype) * eps
    return _ascend(model, x, y, delta, steps, lambda d, g: (d + step * g.sign()).clamp(-eps, eps))


def _per_image_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
           generator: torch.Generator) -> torch.Tensor:
    """Untargeted L2 PGD with a random start (Madry et al. 2018): normalised-gradient ascent steps, each
    projected onto the per-image L2 ball of radius ``eps`` and the [0, 1] box; returns x + delta."""
    if eps <= 0 or steps == 0:
        return x.clone()
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    radius = torch.rand(x.shape[0], generator=generator).to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    delta = noise / _per_image_norm(noise) * radius * eps  # uniform direction, radius in [0, eps]

    def step_and_project(d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        d = d + step * g / _per_image_norm(g)
        return d * (eps / _per_image_norm(d)).clamp(max=1.0)

    return _ascend(model, x, y, delta, steps, step_and_project)


PGD = {"linf": pgd_linf, "l2": pgd_l2}


class AdversarialTraining:
    """Madry et al. (2018): cross-entropy on L-inf PGD examples of each batch (found in eval mode,
    so that batch-norm statistics come from clean batches only)."""

    def __init__(self, epsilon: float, steps: int) -> None:
        self.epsilon, self.steps = epsilon, steps

    def __call__(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], step: Step):
        if y is None:
            raise DataError("adversarial training needs labels")
        model.eval()
        adv = pgd_linf(model, x, y, self.epsilon, 2.5 * self.epsilon / self.steps, self.steps, step.generator)
        model.train()
        logits = model(adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": float(loss.detach()), "adv_acc": float((logits.argmax(1) == y).float().mean()) * 100}


@ATTACKS.register("lc")
class LabelConsistent(Attack):
    """Label-consistent: PGD-hardened target-class images + 4-corner checkerboard; labels kept."""

    kind = "clean-label"
    supports_all_to_all = False
    Config = LCConfig
    config: LCConfig

    def setup(self) -> None:
        c, h, w = self.image_shape
        need = 6 if self.config.trigger == "all-corners" else 3
        check(min(h, w) >= need, f"the {self.config.trigger} trigger needs images of at least {need}x{need}")
        mask = torch.zeros(1, h, w)
        pattern = torch.zeros(c, h, w)
        right = LEFT_CORNER.flip(1)
        corners = [(h - 3, w - 3, right)]
        if self.config.trigger == "all-corners":
            corners += [(0, 0, LEFT_CORNER), (h - 3, 0, LEFT_CORNER), (0, w - 3, right)]
        for top, left, p in corners:
            mask[:, top:top + 3, left:left + 3] = 1
            pattern[:, top:top + 3, left:left + 3] = p
        self.buffers = {"mask": mask, "pattern": pattern}

    def stamp(self, x: torch.Tensor, amplitude: float) -> torch.Tensor:
        """Push trigger pixels towards white/black by ``amplitude`` (1: overwrite), clipped to [0, 1]."""
        mask = self.buffers["mask"].to(x.device, x.dtype)
        pattern = self.buffers["pattern"].to(x.device, x.dtype)
        pushed = (x + amplitude * (2 * pattern - 1)).clamp(0, 1)
        return x * (1 - mask) + pushed * mask

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.stamp(x, self.config.test_amplitude)

    # -- poisoning --------------------------------------------------------------------------------
    def harden(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str = "cpu",
               batch_size: int = 512) -> torch.Tensor:
        """PGD-perturbed copies of float images ``x`` (CPU in, CPU out), deterministic from the seed."""
        g = seeding.generator(self.config.seed + 2)
        was_training = model.training
        model.eval()
        dev = torch.device(device)
        model.to(dev)
        params = [p for p in model.parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        out = []
        try:
            for s in range(0, x.shape[0], batch_size):
                out.append(PGD[self.config.norm](model, x[s:s + batch_size].to(dev), y[s:s + batch_size].to(dev),
                                                 self.config.epsilon / 255, self.config.step / 255,
                                                 self.config.pgd_steps, g).cpu())
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            model.train(was_training)
        return torch.cat(out) if out else x[:0]

    def poison(self, train: ImageSet, model: Optional[nn.Module] = None):
        """Harden then stamp the chosen target-class images; ``model`` is the clean model for PGD, which
        runs on its device (when omitted, a cnn-small surrogate is trained on ``train`` on the CPU for
        ``surrogate_epochs`` or 5 epochs)."""
        if model is None:
            model = self.default_surrogate(train)
        idx = self.poison_indices(train)
        images = train.images.clone()
        if len(idx):
            device = next(model.parameters()).device
            hard = self.harden(model, to_float(train.images[idx]), train.labels[idx], device=device)
            images[idx] = quantize(self.stamp(hard, self.config.amplitude))
        return ImageSet(images, train.labels.clone(), train.classes, f"{train.name}+{self.name}"), idx

    def surrogate_objective(self):
        if self.config.surrogate == "standard":
            return cross_entropy_objective
        return AdversarialTraining(self.config.surrogate_epsilon / 255, self.config.surrogate_pgd_steps)

    def default_surrogate(self, train: ImageSet, device: str = "cpu", progress: Optional[bool] = None) -> nn.Module:
        mean, std = pixel_stats(train.images)
        with torch.random.fork_rng(devices=[]):
            seeding.manual_seed(self.config.seed)
            model = create_model("cnn-small", self.num_classes, train.shape, mean=mean, std=std)
        optim = OptimConfig(epochs=self.config.surrogate_epochs or 5, batch_size=128, lr=0.05)
        fit(model, train, self.surrogate_objective(), optim, augment_cfg=AugmentConfig(), seed=self.config.seed,
            device=device, desc="lc surrogate", progress=progress)
        return model

    def clean_model(self, model: nn.Module, train: ImageSet, optim: OptimConfig, run: Training) -> nn.Module:
        """A clean surrogate (same architecture, fresh weights) fitted on the unpoisoned set for
        ``surrogate_epochs`` (default: the attack's own epochs); PGD then runs against it."""
        with torch.random.fork_rng(devices=[]):
            seeding.manual_seed(run.seed + 7)
            surrogate = build(model.spec) if isinstance(model, Classifier) else copy.deepcopy(model)
        s_optim = dataclasses.replace(optim, epochs=self.config.surrogate_epochs or optim.epochs)
        run.fit(surrogate, train, self.surrogate_objective(), s_optim, desc="lc surrogate", phase="surrogate",
                seed=run.seed + 7)
        return surrogate
