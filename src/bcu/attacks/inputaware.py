"""Input-aware dynamic backdoor (IAD; Nguyen & Tran, NeurIPS 2020).

Every input gets its own trigger: a generator network ``G`` draws a pattern from the image and a
mask network ``M`` decides where to paste it, ``x' = x + (G(x) - x) * M(x)``. Training has two
phases, as in the paper's code:

1. **mask pre-training** (``mask_epochs``; paper 25, default 2 here, see the field's help):
   ``M`` alone learns sparse masks (density loss ``lambda_norm * mean(relu(m - mask_density))``)
   that differ between images (diversity loss ``||x1 - x2|| / ||m1 - m2||``), with Adam;
2. **joint training**: the classifier (the ``OptimConfig``) and ``G`` (Adam, stepped after each
   classifier step by the same backward pass) are trained together through ``bcu.train.fit``,
   ``G`` and its Adam being part of every resume checkpoint; in every batch a fraction ``poison_rate`` gets its own
   trigger and the target label, a fraction ``cross_rate`` gets the trigger of *another* image
   and keeps its label (cross-trigger samples, so a trigger only works on its own image), and
   ``G`` also minimises the diversity loss on its patterns. ``M`` is frozen.

Both phases run through ``bcu.train.fit`` (phase 1 with its resume checkpoint in ``mask/``).

The artifact stores the weights of both networks, so ``load_attack(dir).apply(x)`` regenerates
the same triggers (both networks run in eval mode: deterministic). The networks follow the
paper's encoder-decoder (conv-BN-ReLU blocks, max-pool down, bilinear up); the defaults are the
paper's MNIST size (16 channels, 2 stages), small enough to be quick on CPU; the paper's
CIFAR-10 size is ``gen_channels=32, gen_stages=3``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import seeding
from ..config import check
from ..data.imageset import ImageSet
from ..errors import DataError
from ..resume import check_state_dict, load_optimizer_state, malformed
from ..train import Objective, OptimConfig, Step
from .base import ATTACKS, Attack, AttackConfig, Training

EPS = 1e-7  # the paper's EPSILON


@dataclass
class InputAwareConfig(AttackConfig):
    cross_rate: float = field(default=0.1, metadata={
        "help": "fraction of each batch given another image's trigger, labels kept (paper: p_cross=0.1)"})
    lambda_div: float = field(default=1.0, metadata={"help": "weight of the diversity loss (paper: 1)"})
    lambda_norm: float = field(default=100.0, metadata={"help": "weight of the mask density loss (paper: 100)"})
    mask_density: float = field(default=0.032, metadata={"help": "target mask density (paper: 0.032)"})
    lr_g: float = field(default=0.01, metadata={
        "help": "Adam lr of the pattern generator (paper: 0.01, betas 0.5/0.9)"})
    lr_m: float = field(default=0.01, metadata={"help": "Adam lr of the mask generator (paper: 0.01, betas 0.5/0.9)"})
    mask_epochs: int = field(default=2, metadata={
        "help": "epochs of mask pre-training (paper: 25 before 600 joint epochs; shortened for bcu's few-epoch "
                "CPU recipe, where one mask epoch costs ~3 classifier epochs; lr drops 10x at 40% and 80%, the "
                "paper's 10/20 of 25)"})
    gen_channels: int = field(default=16, metadata={
        "help": "channels of the first generator stage (paper: 16 for MNIST, 32 for CIFAR-10)"})
    gen_stages: int = field(default=2, metadata={
        "help": "down/up-sampling stages of the generators (paper: 2 for MNIST, 3 for CIFAR-10)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.cross_rate <= 1, f"cross_rate must be in [0, 1], got {self.cross_rate}")
        check(self.poison_rate + self.cross_rate <= 1, "poison_rate + cross_rate must be <= 1")
        check(self.lambda_div >= 0 and self.lambda_norm >= 0, "lambda_div and lambda_norm must be >= 0")
        check(0 < self.mask_density < 1, f"mask_density must be in (0, 1), got {self.mask_density}")
        check(self.lr_g > 0 and self.lr_m > 0, "lr_g and lr_m must be > 0")
        check(self.mask_epochs >= 0, f"mask_epochs must be >= 0, got {self.mask_epochs}")
        check(1 <= self.gen_channels <= 1024, f"gen_channels must be in [1, 1024], got {self.gen_channels}")
        check(1 <= self.gen_stages <= 5, f"gen_stages must be in 1..5, got {self.gen_stages}")


class _Block(nn.Sequential):
    """conv3x3 - BatchNorm (momentum 0.05, as the paper) - ReLU."""

    def __init__(self, cin: int, cout: int, relu: bool = True) -> None:
        layers: List[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class TriggerNet(nn.Module):
    """The paper's encoder-decoder generator; output in (0, 1) via tanh / (2 + eps) + 0.5."""

    def __init__(self, in_channels: int, out_channels: int, channels: int = 16, stages: int = 2) -> None:
        super().__init__()
        widths = [channels * 2 ** i for i in range(stages)]
        self.down = nn.ModuleList()
        cur = in_channels
        for wd in widths:
            self.down.append(nn.Sequential(_Block(cur, wd), _Block(wd, wd)))
            cur = wd
        self.middle = _Block(cur, cur)
        self.up = nn.ModuleList()
        for i in reversed(range(stages)):
            nxt = widths[i - 1] if i > 0 else out_channels
            self.up.append(nn.Sequential(_Block(cur, cur), _Block(cur, nxt, relu=i > 0)))
            cur = nxt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = []
        for block in self.down:
            x = block(x)
            sizes.append(x.shape[-2:])
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for block, size in zip(self.up, reversed(sizes)):
            x = block(F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False))
        return torch.tanh(x) / (2 + EPS) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """The paper's soft binarisation of the mask: tanh(20 m - 10) / (2 + eps) + 0.5."""
    return torch.tanh(m * 20 - 10) / (2 + EPS) + 0.5


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance (the paper's sqrt(mean(MSE)))."""
    return ((a - b) ** 2).flatten(1).mean(1).add(1e-12).sqrt()  # + 1e-12: finite gradient at 0


def partners(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random partner index for every sample of a batch, never the sample itself."""
    perm = torch.randperm(n, generator=generator)
    same = perm == torch.arange(n)
    perm[same] = (perm[same] + 1) % max(n, 1)
    return perm


@ATTACKS.register("inputaware")
class InputAware(Attack):
    """Input-aware dynamic: a generator network makes a per-image trigger, a mask network places it."""

    kind = "dirty-label"
    poisoning = "per-batch"
    Config = InputAwareConfig
    config: InputAwareConfig

    def setup(self) -> None:
        c, h, w = self.image_shape
        need = 2 ** self.config.gen_stages
        check(min(h, w) >= need, f"{self.config.gen_stages} generator stages need images of at least {need}x{need}")
        with torch.random.fork_rng(devices=[]):
            seeding.manual_seed(self.config.seed)
            self.generator = TriggerNet(c, c, self.config.gen_channels, self.config.gen_stages)
            self.mask_net = TriggerNet(c, 1, self.config.gen_channels, self.config.gen_stages)
        self.generator.eval()
        self.mask_net.eval()
        self._sync_buffers()

    # -- artifact: both networks' weights ---------------------------------------------------------
    def _sync_buffers(self) -> None:
        self.buffers = {**{f"generator.{k}": v.detach().cpu().clone() for k, v in self.generator.state_dict().items()},
                        **{f"mask.{k}": v.detach().cpu().clone() for k, v in self.mask_net.state_dict().items()}}

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        self._sync_buffers()
        return dict(self.buffers)

    def load_state_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self.generator.load_state_dict({k[len("generator."):]: v for k, v in self.buffers.items()
                                        if k.startswith("generator.")})
        self.mask_net.load_state_dict({k[len("mask."):]: v for k, v in self.buffers.items() if k.startswith("mask.")})
        self.generator.eval()
        self.mask_net.eval()

    # -- the trigger ------------------------------------------------------------------------------
    def patterns_and_masks(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.generator(x), threshold(self.mask_net(x))

    @staticmethod
    def paste(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + (pattern - x) * mask

    @torch.no_grad()
    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Each image with its own trigger (both networks in eval mode: deterministic)."""
        self.generator.to(x.device).eval()
        self.mask_net.to(x.device).eval()
        dtype = x.dtype
        p, m = self.patterns_and_masks(x.float())
        return self.paste(x.float(), p, m).clamp(0, 1).to(dtype)

    # -- training ---------------------------------------------------------------------------------
    def _mask_objective(self, net: nn.Module, x: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        m1 = threshold(net(x))
        m2 = threshold(net(x2))
        loss_norm = F.relu(m1 - self.config.mask_density).mean()
        loss_div = (_distance(x, x2) / (_distance(m1, m2) + EPS)).mean()
        loss = self.config.lambda_norm * loss_norm + self.config.lambda_div * loss_div
        return loss, {"mask_loss": float(loss.detach()), "mask_norm": float(loss_norm.detach()),
                      "mask_div": float(loss_div.detach()), "mask_density": float(m1.detach().mean())}

    def pretrain(self, train: ImageSet, optim: OptimConfig, run: Training) -> List[Dict[str, Any]]:
        """Phase 1: the mask network alone, Adam(lr_m, betas 0.5/0.9), lr x0.1 at 40% and 80%."""
        if self.config.mask_epochs == 0:
            return []
        mask_optim = OptimConfig(epochs=self.config.mask_epochs, batch_size=optim.batch_size, optimizer="adam",
                                 lr=self.config.lr_m, betas=(0.5, 0.9), weight_decay=0.0, schedule="step",
                                 milestones=(0.4, 0.8), gamma=0.1)

        def objective(net: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], step: Step):
            return self._mask_objective(net, x, x[partners(x.shape[0], step.generator).to(x.device)])

        return run.fit(self.mask_net, train, objective, mask_optim, desc="inputaware masks", phase="mask",
                       seed=run.seed + 101, with_labels=False, channels_last=False,
                       epoch_hook=lambda epoch, net: {"phase": "mask"})

    def batch_objective(self, optim: OptimConfig, run: Training) -> Objective:
        """Phase 2: the mask network frozen, the generator trained with the classifier."""
        dev = torch.device(run.device)
        self.mask_net.to(dev).eval()
        for p in self.mask_net.parameters():
            p.requires_grad_(False)
        self.generator.to(dev).train()
        return JointObjective(self, optim.epochs)

    def train(self, model: nn.Module, train: ImageSet, optim: OptimConfig, **kw: Any) -> List[Dict[str, Any]]:
        """Phase 1 (mask pre-training), then phase 2 (classifier + generator), both through ``fit``."""
        try:
            return super().train(model, train, optim, **kw)
        finally:
            for p in self.mask_net.parameters():
                p.requires_grad_(True)
            self.generator.eval()
            self.mask_net.eval()
            self.generator.cpu()
            self.mask_net.cpu()
            self._sync_buffers()

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(inputs, labels, diversity loss, num_bd) of one training batch, as the paper's train_step."""
        n = x.shape[0]
        num_bd = int(n * self.config.poison_rate)
        num_cross = min(int(n * self.config.cross_rate), n - num_bd)
        x2 = x[partners(n, generator).to(x.device)]
        parts = []
        p1 = x[:0]
        if num_bd:
            p1 = self.generator(x[:num_bd])
            with torch.no_grad():
                m1 = threshold(self.mask_net(x[:num_bd]))
            parts.append(self.paste(x[:num_bd], p1, m1))
        p2 = x[:0]
        if num_cross:
            src = x2[num_bd:num_bd + num_cross]
            p2 = self.generator(src)
            with torch.no_grad():
                m2 = threshold(self.mask_net(src))
            parts.append(self.paste(x[num_bd:num_bd + num_cross], p2, m2))
        parts.append(x[num_bd + num_cross:])
        labels = torch.cat([self.target_labels(y[:num_bd]), y[num_bd:]])
        k = min(num_bd, num_cross)
        if k:
            div = (_distance(x[:k], x2[num_bd:num_bd + k]) / (_distance(p1[:k], p2[:k]) + EPS)).mean()
        else:
            div = x.new_zeros(())
        return torch.cat(parts), labels, div, num_bd


class JointObjective:
    """Phase 2 of input-aware training: cross-entropy on each batch poisoned by
    :meth:`InputAware.poison_batch` plus the generator's diversity loss. The generator has an Adam
    of its own (the paper's betas 0.5/0.9, lr ``lr_g`` with the paper's milestones 200/300/400/500 of
    600 epochs, scaled), stepped after each classifier step from the same backward pass; both are
    part of every resume checkpoint (:class:`bcu.train.StatefulObjective`)."""

    def __init__(self, attack: InputAware, epochs: int) -> None:
        self.attack = attack
        self.epochs = epochs
        self.opt = torch.optim.Adam(attack.generator.parameters(), lr=attack.config.lr_g, betas=(0.5, 0.9))

    def lr_at(self, epoch: int) -> float:
        return self.attack.config.lr_g * 0.1 ** sum(epoch >= f * self.epochs for f in (1 / 3, 1 / 2, 2 / 3, 5 / 6))

    def __call__(self, net: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor],
                 step: Step) -> Tuple[torch.Tensor, Dict[str, float]]:
        if y is None:
            raise DataError("inputaware training needs labels")
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step.epoch)
        a = self.attack
        a.generator.train()
        xb, yb, div, num_bd = a.poison_batch(x, y, step.generator)
        logits = net(xb.contiguous(memory_format=torch.channels_last))
        ce = F.cross_entropy(logits, yb)
        loss = ce + a.config.lambda_div * div
        pred = logits.detach().argmax(1)
        metrics = {"loss": float(ce.detach()), "div": float(div.detach()),
                   "acc": float((pred[num_bd:] == yb[num_bd:]).float().mean()) * 100}
        if num_bd:
            metrics["asr"] = float((pred[:num_bd] == yb[:num_bd]).float().mean()) * 100
        return loss, metrics

    def after_step(self) -> None:
        """The generator's Adam step for the batch just back-propagated."""
        if any(p.grad is not None for p in self.attack.generator.parameters()):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.attack.generator.state_dict(), "opt_g": self.opt.state_dict()}

    def load_state_dict(self, state: Any, where: Path) -> None:
        if not isinstance(state, dict):
            raise malformed(where, "objective", "not a table of fields")
        gen = self.attack.generator
        gen.load_state_dict(check_state_dict(state.get("generator"), gen.state_dict(), where, "objective.generator"))
        load_optimizer_state(self.opt, state.get("opt_g"), where, "objective.opt_g")
