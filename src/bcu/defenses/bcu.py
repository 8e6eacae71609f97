"""BCU: Backdoor Cleansing with Unlabeled data (Pang, Sun, Ling, Chen; CVPR 2023).

Copy the suspicious model into a student, re-initialise a depth-dependent random fraction of the
student's weights (:mod:`bcu.defenses.reinit`), then distil the teacher into the student on
unlabeled images with KL(teacher || student) on temperature-softened outputs, the temperature
rising over training. No label is read anywhere: the data reaches this module without labels.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import check, deep_merge, from_dict
from ..data.augment import AugmentConfig, mixup, noise_blend, random_warp
from ..data.imageset import ImageSet, Images
from ..data.load import load_dataset
from ..errors import ConfigError, DataError, show
from ..resume import malformed
from ..train import OptimConfig, Step, fit, memory_format_for, predict, recalibrate_batchnorm
from .adversary import AdversaryConfig, Bank
from .base import DEFENSES, Defense, DefenseResult, Run
from .synthesis import SynthesisConfig, synthesize
from .reinit import ReinitConfig, reinitialize
from .tracing import input_shape_of
from .. import seeding


@dataclass
class DistillConfig:
    """Distillation loss: KL on softmax(logits / T), T = 1 + 3 (e + 1) / E (paper). bcu's default adds
    the T^2 factor and shows the student a slightly warped, noise-blended view of what the teacher
    sees (the paper preset turns all three off). Mixup is available but off: it carries blended and
    warping backdoors into the student (docs/method.md)."""

    t_start: float = field(default=1.0, metadata={"help": "temperature before the first epoch"})
    t_end: float = field(default=4.0, metadata={"help": "temperature at the last epoch"})
    t_squared: bool = field(default=True, metadata={"help": "scale the loss by T^2 (Hinton et al.; paper: off)"})
    mixup_alpha: float = field(default=0.0, metadata={
        "help": "mix each batch with itself, Beta(alpha, alpha) weights (function matching; 0 = off, paper: 0)"})
    noise_blend: float = field(default=0.2, metadata={
        "help": "largest weight a of a random-noise image blended into the student's view, x + a (u - x) with "
                "u ~ U(0, 1) per pixel and a ~ U(0, noise_blend) per image; the teacher sees the clean view, "
                "so the student learns to ignore additive patterns (0 = off, paper: 0; bcu: 0.2, docs/method.md)"})
    warp: float = field(default=0.5, metadata={
        "help": "largest strength s of a smooth random warp applied to the student's view (WaNet's displacement "
                "units, s ~ U(0, warp) per image, a warp_grid x warp_grid control field); the teacher sees the "
                "unwarped view, so the student learns to ignore small geometric distortions (0 = off, paper: 0; "
                "bcu: 0.5, docs/method.md)"})
    warp_grid: int = field(default=4, metadata={"help": "control points per side of the random warp field"})
    batchnorm: Literal["train", "frozen"] = field(default="train", metadata={
        "help": "train: the student's BatchNorm layers use batch statistics and update their running statistics "
                "(paper); frozen: they keep normalising with the statistics the model stored in training, which "
                "the unlabeled images then cannot shift (for images of another kind)"})
    average_from: float = field(default=1.0, metadata={
        "help": "average the student's weights over the epochs from this fraction of training on (stochastic weight "
                "averaging, Izmailov et al. 2018; BatchNorm statistics are then re-estimated on the clean images); "
                "1 = off, the last epoch's weights (paper)"})
    clean_fraction: float = field(default=0.0, metadata={
        "help": "share of each batch that the student sees exactly as the teacher does (no warp, noise or adversary)"})
    recalibrate_bn: bool = field(default=False, metadata={
        "help": "after distillation, re-estimate the student's BatchNorm statistics on the clean unlabeled images "
                "(the training batches carry the student's perturbed views; paper: no)"})
    def __post_init__(self) -> None:
        check(self.t_start > 0 and self.t_end > 0, "temperatures must be > 0")
        check(self.mixup_alpha >= 0, f"mixup_alpha must be >= 0, got {self.mixup_alpha}")
        check(0 <= self.noise_blend <= 1, f"noise_blend must be in [0, 1], got {self.noise_blend}")
        check(self.warp >= 0, f"warp must be >= 0, got {self.warp}")
        check(self.warp_grid >= 2, f"warp_grid must be >= 2, got {self.warp_grid}")
        check(0 <= self.clean_fraction < 1, f"clean_fraction must be in [0, 1), got {self.clean_fraction}")
        check(0 <= self.average_from <= 1, f"average_from must be in [0, 1], got {self.average_from}")

    def temperature(self, epoch: int, epochs: int) -> float:
        return self.t_start + (self.t_end - self.t_start) * (epoch + 1) / epochs


@dataclass
class StopConfig:
    """Label-free early stopping on a held-out slice of the unlabeled images."""

    rule: Literal["none", "plateau"] = field(default="none", metadata={
        "help": "none: run every epoch; plateau: stop when agreement and loss on the slice stop improving"})
    monitor_size: int = field(default=500, metadata={"help": "unlabeled images watched each epoch"})
    patience: int = field(default=5, metadata={"help": "plateau: epochs without improvement before stopping"})
    min_delta: float = field(default=0.1, metadata={"help": "plateau: smallest agreement gain (points) that counts"})
    min_epochs: int = field(default=5, metadata={"help": "plateau: never stop before this epoch"})

    def __post_init__(self) -> None:
        check(self.monitor_size >= 0, "monitor_size must be >= 0")
        check(self.patience >= 1, "patience must be >= 1")


@dataclass
class CleanseConfig:
    """Everything that defines a cleanse run. Defaults: bcu's measured defaults (see docs/method.md);
    ``preset("paper")`` gives the authors' exact settings."""

    reinit: ReinitConfig = field(default_factory=ReinitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    seed: int = field(default=0, metadata={"help": "seed of masks, shuffling and augmentation"})
    hflip_only: Optional[List[str]] = field(default=None, metadata={
        "help": "flip only when the unlabeled set is one of these data sets (by name; the authors' code flips "
                "for cifar10 alone); unset: augment.hflip decides"})
    keep_last_batch: bool = field(default=False, metadata={
        "help": "train on the last, partial batch of each epoch too (the authors' code: yes; bcu drops it)"})


# The authors' settings, verbatim (every method option spelled out, so that a new default elsewhere
# never leaks into this preset).
PAPER: Dict[str, Any] = {
    "reinit": {"stem": 0.01, "stages": [0.01, 0.03, 0.09, 0.27], "head": 0.10, "scale": 1.0, "max_ratio": 1.0,
               "profile": "stages", "uniform": None, "rule": "depth", "fresh": "layer"},
    "distill": {"t_start": 1.0, "t_end": 4.0, "t_squared": False, "mixup_alpha": 0.0, "noise_blend": 0.0,
                "warp": 0.0, "clean_fraction": 0.0, "recalibrate_bn": False,
                "average_from": 1.0, "batchnorm": "train"},
    "optim": {"epochs": 100, "batch_size": 256, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
              "schedule": "cosine"},
    "augment": {"crop_pad": 4, "hflip": True},
    "stop": {"rule": "none"},
    "adversary": {"kind": "none"},
    "synthesis": {"mix": 0.0},
    "hflip_only": None, "keep_last_batch": False,
}

# What the authors' code (luluppang/BCU, defense/ft/distillation_dropout_increase.py with
# run/run_defense.sh) actually does, where it differs from what the paper says (docs/method.md):
# ratios by state-dict key prefix (a head not named `fc` gets the stem's 0.01; BatchNorm keys
# without `bn` are mixed), replaced values from a freshly constructed model (its own init: kaiming
# fan-out for their resnet18_DBD), flips for CIFAR-10 only, and the last partial batch kept.
AUTHORS: Dict[str, Any] = deep_merge(PAPER, {
    "reinit": {"rule": "names", "stem": 0.01,
               "prefixes": {"layer1": 0.01, "layer2": 0.03, "layer3": 0.09, "layer4": 0.27, "fc": 0.10},
               "skip": ["bn", "shortcut.1"], "fresh": "family", "include_bias": True},
    "hflip_only": ["cifar10"], "keep_last_batch": True,
})

# bcu's defaults are the dataclass defaults, chosen from the measurements in docs/method.md: on
# small networks the paper's ratios leave the backdoor in place, so every ratio is scaled by 4 (the
# deepest stage capped at 0.9), and the KL is scaled by T^2 so the student keeps learning as the
# temperature rises. The student sees each image blended with random noise (up to 0.2) and must
# answer as the teacher does on the clean image: this removes the Blended and SIG backdoors that
# the student otherwise re-learns from the teacher. Mixup of the unlabeled images (function
# matching) was measured and left off: it carries Blended and WaNet backdoors into the student.
DEFAULT: Dict[str, Any] = {}

# bcu 0.1's defaults (docs/method.md sections 1-10: chosen on cnn-small alone), kept for comparison.
V1: Dict[str, Any] = {
    "reinit": {"stem": 0.01, "stages": [0.01, 0.03, 0.09, 0.27], "head": 0.10, "scale": 4.0, "max_ratio": 0.9,
               "profile": "stages", "uniform": None, "rule": "depth", "fresh": "layer"},
    "distill": {"t_start": 1.0, "t_end": 4.0, "t_squared": True, "mixup_alpha": 0.0, "noise_blend": 0.2,
                "warp": 0.5, "warp_grid": 4, "clean_fraction": 0.0,
                "recalibrate_bn": False, "average_from": 1.0, "batchnorm": "train"},
    "optim": {"epochs": 100, "batch_size": 256, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
              "weight_decay": 5e-4, "schedule": "cosine"},
    "augment": {"crop_pad": 4, "hflip": True},
    "stop": {"rule": "none"},
    "adversary": {"kind": "none"},
    "synthesis": {"mix": 0.0},
    "hflip_only": None, "keep_last_batch": False,
}

PRESETS: Dict[str, Dict[str, Any]] = {"paper": PAPER, "authors": AUTHORS, "default": DEFAULT, "v1": V1}


def dataset_name(data: Any) -> str:
    """The data set an image set comes from, as ``hflip_only`` compares it: an ImageSet's name up to
    the first ``:`` (``fashion-mnist:train``), or a path's last part, lower-case. A CIFAR python
    folder (named ``cifar``) is ``cifar10`` or ``cifar100`` by its class list."""
    name = str(getattr(data, "name", "") or "")
    name = Path(name.split(":")[0].rstrip("/\\")).name.lower() if name else ""
    classes = getattr(data, "classes", None)
    if name == "cifar" and classes:
        name = f"cifar{len(classes)}"
    return name


def preset(name: str = "default", overrides: Optional[Dict[str, Any]] = None) -> CleanseConfig:
    """A validated config from a named preset with nested ``overrides`` merged in."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {show(name)} (known: {', '.join(PRESETS)})")
    return from_dict(CleanseConfig, deep_merge(PRESETS[name], overrides or {}))


class DistillObjective:
    """KL(teacher || student): both see the same (augmented, optionally mixed) view; with ``warp``
    and ``noise_blend`` the student's copy is then randomly warped and blended with random noise,
    the teacher's is not."""

    def __init__(self, teacher: nn.Module, cfg: DistillConfig, adversary: Optional[AdversaryConfig] = None,
                 image_shape: Optional[Tuple[int, int, int]] = None, seed: int = 0) -> None:
        self.teacher = teacher
        self.cfg = cfg
        self.adversary = adversary
        self.bank: Optional[Bank] = None
        if adversary is not None and adversary.kind != "none":
            if image_shape is None:
                raise ConfigError("the adversary needs the image shape")
            self.bank = Bank(adversary, tuple(image_shape), seed + 11)

    def __call__(self, student: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], step: Step):
        if y is not None:  # defensive: the loop is run with with_labels=False
            raise RuntimeError("bcu's distillation must never see labels")
        if self.cfg.mixup_alpha > 0:
            x = mixup(x, self.cfg.mixup_alpha, step.generator)
        T = self.cfg.temperature(step.epoch, step.epochs)
        with torch.inference_mode():
            t_logits = self.teacher(x).float()
        t_logits = t_logits.clone()  # an ordinary tensor again: autograd may save it for the backward pass
        keep = int(round(self.cfg.clean_fraction * x.shape[0]))  # the last `keep` images: the teacher's view
        head, clean = x[:x.shape[0] - keep], x[x.shape[0] - keep:]
        head = random_warp(head, self.cfg.warp, self.cfg.warp_grid, step.generator)  # the student's view only
        head = noise_blend(head, self.cfg.noise_blend, step.generator)  # 0 = unchanged
        if self.bank is not None:
            head = self.bank.apply(head, int(round(self.adversary.fraction * x.shape[0])), step.generator)
        x = torch.cat([head, clean]) if keep else head
        if self.cfg.batchnorm == "frozen":
            for m in student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        s_logits = student(x).float()
        loss = F.kl_div(F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1), reduction="batchmean",
                        log_target=True)
        if self.cfg.t_squared:
            loss = loss * T * T
        agree = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean()
        return loss, {"loss": float(loss.detach()), "agree": float(agree) * 100, "T": T}

    def state_dict(self) -> Dict[str, Any]:
        """The adversary's bank (resumed with the run; empty without one)."""
        return {} if self.bank is None else {"bank": self.bank.state_dict()}

    def load_state_dict(self, state: Any, where: Path) -> None:
        if self.bank is None:
            return
        bank = state.get("bank") if isinstance(state, dict) else None
        if not isinstance(bank, dict) or not all(isinstance(v, torch.Tensor) and v.is_floating_point()
                                                 and bool(torch.isfinite(v).all()) for v in bank.values()):
            raise malformed(where, "objective.bank", "not a table of finite tensors")
        try:
            self.bank.load_state_dict(bank)
        except ValueError as e:
            raise malformed(where, "objective.bank", str(e)) from None


class WeightAverage:
    """Running mean of a model's floating-point parameters over the epochs it is called on."""

    def __init__(self, start_epoch: int) -> None:
        self.start = start_epoch
        self.mean: Optional[Dict[str, torch.Tensor]] = None
        self.count = 0

    def update(self, epoch: int, model: nn.Module) -> None:
        if epoch < self.start:
            return
        params = {k: v.detach() for k, v in model.named_parameters()}
        self.count += 1
        if self.mean is None:
            self.mean = {k: v.clone() for k, v in params.items()}
        else:
            for k, v in params.items():
                self.mean[k] += (v - self.mean[k]) / self.count

    @torch.no_grad()
    def apply(self, model: nn.Module) -> bool:
        if self.mean is None:
            return False
        for k, p in model.named_parameters():
            p.copy_(self.mean[k])
        return True


class Monitor:
    """Per-epoch label-free signals on a fixed slice of unlabeled images, and the stopping rule."""

    def __init__(self, teacher: nn.Module, images: torch.Tensor, cfg: StopConfig, device: str,
                 average: Optional[WeightAverage] = None) -> None:
        self.average = average
        self.images = images
        self.cfg = cfg
        self.device = device
        self.t_logits = predict(teacher, images, device=device) if len(images) else None
        self.best = -1.0
        self.best_loss = float("inf")
        self.bad = 0

    def __call__(self, epoch: int, student: nn.Module) -> Dict[str, Any]:
        if self.average is not None:
            self.average.update(epoch, student)
        if self.t_logits is None:
            return {}
        s = predict(student, self.images, device=self.device)
        agree = float((s.argmax(1) == self.t_logits.argmax(1)).float().mean()) * 100
        kl = float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(self.t_logits, 1), reduction="batchmean",
                            log_target=True))
        out: Dict[str, Any] = {"monitor_agree": agree, "monitor_kl": kl}
        if self._update(epoch, agree, kl):
            out["stop"] = True
        return out

    def _update(self, epoch: int, agree: float, kl: float) -> bool:
        """Advance the plateau counters; True when the rule says stop."""
        if self.cfg.rule != "plateau":
            return False
        improved = agree > self.best + self.cfg.min_delta or kl < self.best_loss * 0.98
        self.best = max(self.best, agree)
        self.best_loss = min(self.best_loss, kl)
        self.bad = 0 if improved else self.bad + 1
        return self.bad >= self.cfg.patience and epoch + 1 >= self.cfg.min_epochs

    def restore(self, history: List[Dict[str, Any]]) -> None:
        """Rebuild the counters from a resumed run's history, so --resume stops where a run would."""
        for row in history:
            if "monitor_agree" in row:
                self._update(int(row["epoch"]) - 1, row["monitor_agree"], row["monitor_kl"])


def as_unlabeled(data: Any, name: str = "unlabeled") -> ImageSet:
    """Images only, from an ImageSet, a tensor/array (N, C, H, W), a Dataset yielding images, a
    DataLoader yielding batches of them, or a path (a folder, .npz, ... anything ``bcu cleanse --data``
    reads).

    Labels are never read: an ImageSet's ``labels`` attribute is not touched, a Dataset item or a
    DataLoader batch that is a tuple contributes only its first element.

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.rand(8, 1, 28, 28), torch.zeros(8)), batch_size=4)
    >>> as_unlabeled(loader).images.shape
    torch.Size([8, 1, 28, 28])
    """
    if isinstance(data, (str, Path)):
        return as_unlabeled(load_dataset(str(data), labels=False), name)
    if isinstance(data, torch.utils.data.DataLoader):
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
        if not batches:
            raise DataError("the unlabeled DataLoader yields no batches")
        data = torch.cat([torch.as_tensor(b) for b in batches])
    if isinstance(data, ImageSet):
        return ImageSet(data.images, None, None, data.name)
    if isinstance(data, Images):  # bcu.data.StreamingImages: stays on disk, labels dropped
        return data.without_labels()
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        x = data
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = []
        for i in range(len(data)):
            item = data[i]
            items.append(item[0] if isinstance(item, (tuple, list)) else item)
        if not items:
            raise DataError("the unlabeled data set is empty")
        x = torch.stack([torch.as_tensor(v) for v in items])
    else:
        raise DataError(f"cannot use {type(data).__name__} as unlabeled images")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise DataError(f"unlabeled images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = x.float()
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise DataError("float images must be finite and in [0, 1]")
        x = (x * 255).round().to(torch.uint8)
    return ImageSet(x.contiguous(), None, None, name)


class Cleanser:
    """Runs BCU on any ``nn.Module`` classifier that takes (N, C, H, W) images in [0, 1]."""

    def __init__(self, config: Optional[CleanseConfig] = None) -> None:
        self.config = config or preset("default")

    def run(self, model: nn.Module, unlabeled: Any, *, device: str = "cpu", progress: Optional[bool] = None,
            resume_dir: Optional[Path] = None, reinit: bool = True, distill: bool = True) -> DefenseResult:
        cfg = self.config
        t0 = time.time()
        synthesized = 0
        if unlabeled is None or (distill and cfg.synthesis.mix > 0):
            spec = getattr(model, "spec", None)
            if spec is None:
                raise DataError("a cleanse without images synthesizes them and needs the model's input shape "
                                "(a bcu model or one with a .spec)")
            n = cfg.synthesis.images if unlabeled is None else None
            if unlabeled is not None:
                real = as_unlabeled(unlabeled)
                n = int(round(cfg.synthesis.mix * len(real)))
            images = synthesize(model, tuple(spec.input_shape), spec.num_classes, cfg.synthesis, n, seed=cfg.seed,
                                device=device, progress=progress)
            synthesized = len(images)
            data = ImageSet(images, None, None, "synthesized") if unlabeled is None else ImageSet(
                torch.cat([real.images, images]), None, None, f"{real.name}+synthesized")
        else:
            data = as_unlabeled(unlabeled)
        shape = input_shape_of(model, data)
        if distill and len(data) < cfg.optim.batch_size:
            raise DataError(f"{len(data)} unlabeled images are fewer than one batch ({cfg.optim.batch_size}); "
                            f"lower the batch size or add images")
        teacher = copy.deepcopy(model).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.to(memory_format=memory_format_for(teacher, None))
        student = copy.deepcopy(model).to(device)
        layers = reinitialize(student, shape, cfg.reinit) if reinit else []
        g = seeding.generator(cfg.seed + 7)
        perm = torch.randperm(len(data), generator=g)
        n_mon = min(cfg.stop.monitor_size, len(data) // 5)
        if cfg.stop.rule != "none" and n_mon > 0:
            mon_idx, train_idx = perm[:n_mon], perm[n_mon:]  # held out from training
            train = data.subset(train_idx.sort().values)
        else:
            mon_idx, train = perm[:n_mon], data  # watched, not held out
        average = (WeightAverage(int(cfg.distill.average_from * cfg.optim.epochs))
                   if cfg.distill.average_from < 1 else None)
        monitor = Monitor(teacher, data.images[mon_idx.sort().values], cfg.stop, device, average)
        history: List[Dict[str, Any]] = []
        augment = cfg.augment
        if cfg.hflip_only is not None:
            augment = dataclasses.replace(augment, hflip=dataset_name(unlabeled) in [n.lower() for n in cfg.hflip_only])
        if distill:
            history = fit(student, train, DistillObjective(teacher, cfg.distill, cfg.adversary, shape, cfg.seed), cfg.optim,
                          augment_cfg=augment, seed=cfg.seed, device=device, with_labels=False,
                          epoch_hook=monitor, resume_dir=resume_dir, desc="cleanse", progress=progress,
                          drop_last=not cfg.keep_last_batch)
        averaged = distill and average is not None and average.apply(student)
        if distill and (cfg.distill.recalibrate_bn or averaged):
            clean = train.images[torch.arange(min(len(train), 10_000))]  # at most 10,000: statistics converge
            recalibrate_batchnorm(student, clean, cfg.optim.batch_size, device)
        student.eval()
        info = {"layers": [l.as_dict() for l in layers], "config": dataclasses.asdict(cfg), "hflip": augment.hflip,
                "epochs_run": len(history), "stopped_early": len(history) < cfg.optim.epochs and distill,
                "unlabeled_images": len(data) - synthesized, "synthesized_images": synthesized,
                "training_images": len(train), "monitor_images": int(n_mon),
                "seconds": time.time() - t0}
        return DefenseResult(student, history, info)


def cleanse(model: nn.Module, unlabeled: Any, config: Union[CleanseConfig, Dict[str, Any], str, None] = None,
            *, device: str = "cpu", progress: Optional[bool] = None) -> nn.Module:
    """Cleanse ``model`` with BCU on ``unlabeled`` images and return the cleansed copy.

    ``config``: a CleanseConfig, a preset name (``"default"``, ``"paper"``), or a dict of overrides
    on the default preset. The input model is not modified.
    """
    if isinstance(config, str):
        config = preset(config)
    elif isinstance(config, dict):
        config = preset("default", config)
    return Cleanser(config).run(model, unlabeled, device=device, progress=progress).model


@DEFENSES.register("bcu")
class BCU(Defense):
    """BCU: re-initialise by depth, then distil on unlabeled images (label-free)."""

    Config = CleanseConfig
    uses_labels = False
    synthesizes = True  # without images it inverts the teacher (bcu.defenses.synthesis)
    reinit = True
    distill = True

    def __init__(self, config: Optional[CleanseConfig] = None) -> None:
        super().__init__(config if config is not None else preset("default"))

    @classmethod
    def configure(cls, options: Optional[Dict[str, Any]] = None) -> CleanseConfig:
        """A config from options; ``{"preset": "v1", ...}`` starts from that preset instead of the default."""
        options = dict(options or {})
        name = options.pop("preset", "default")
        if not isinstance(name, str):
            raise ConfigError(f"preset must be a name ({', '.join(PRESETS)}), got {type(name).__name__}")
        return preset(name, options)

    def repair(self, model, data, run: Run) -> DefenseResult:
        """``run.seed`` (a benchmark cell's seed) offsets the config's seeds, so that seed 0 runs the config
        as written and other seeds draw other masks, shuffles and augmentations."""
        cfg = self.config
        if run.seed:
            cfg = dataclasses.replace(cfg, seed=cfg.seed + run.seed,
                                      reinit=dataclasses.replace(cfg.reinit, seed=cfg.reinit.seed + run.seed))
        return Cleanser(cfg).run(model, data, device=run.device, progress=run.progress, resume_dir=run.resume_dir,
                                 reinit=self.reinit, distill=self.distill)


@DEFENSES.register("kd")
class PlainKD(BCU):
    """Ablation: distillation on unlabeled images without re-initialisation."""

    reinit = False


@DEFENSES.register("re")
class ReinitOnly(BCU):
    """Ablation: depth-aware re-initialisation without distillation."""

    distill = False
