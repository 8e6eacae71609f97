"""The attack interface: a trigger on batched images, a poisoning recipe, a training routine, and
an artifact that regenerates the triggered test set later.

Images are float tensors in [0, 1] of shape (N, C, H, W) on any device. Every random choice
(trigger pattern, poisoned indices) is drawn from generators seeded by the config, so the same
config always produces the same poisoned set and the same trigger.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Literal, Optional, Tuple, Type, Union

import torch
from torch import nn

from ..checkpoint import atomic_write_bytes, atomic_write_json
from ..config import check, from_dict, to_dict
from ..data import AugmentConfig, ImageSet, to_float
from ..errors import ConfigError, DataError
from ..registry import Registry
from ..train import OptimConfig, cross_entropy_objective, fit
from .. import seeding

ATTACKS: Registry[Type["Attack"]] = Registry("attack")
ARTIFACT_JSON = "attack.json"
ARTIFACT_TENSORS = "attack.safetensors"


@dataclass
class AttackConfig:
    """Options every attack shares."""

    target: int = field(default=0, metadata={"help": "target class (all-to-one)"})
    poison_rate: float = field(default=0.1, metadata={"help": "fraction of the training set poisoned"})
    mode: Literal["all-to-one", "all-to-all"] = field(default="all-to-one", metadata={
        "help": "all-to-one: every triggered input -> target; all-to-all: y -> (y + 1) mod K"})
    seed: int = field(default=0, metadata={"help": "seed of the trigger and of the poisoned indices"})

    def __post_init__(self) -> None:
        check(0.0 <= self.poison_rate <= 1.0, f"poison_rate must be in [0, 1], got {self.poison_rate}")
        check(self.target >= 0, f"target must be >= 0, got {self.target}")


def clean_label_poison_rate(authors: str) -> Any:
    """The ``poison_rate`` field of a clean-label attack: half of the target class by default."""
    return field(default=0.05, metadata={
        "help": f"fraction of the training set poisoned, all drawn from the target class ({authors} poison a "
                "fraction of the target class; 0.05 = half of it on a balanced 10-class set: at 0.1 the whole "
                "class carries the trigger and clean target images are misclassified, -7 ACC on Fashion-MNIST)"})


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> uint8, as a poisoned image is stored on disk."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class Attack(ABC):
    """Base class: subclasses set ``name``, ``Config``, ``kind`` and implement :meth:`apply`."""

    name: ClassVar[str]
    kind: ClassVar[str] = "dirty-label"
    Config: ClassVar[Type[AttackConfig]] = AttackConfig
    supports_all_to_all: ClassVar[bool] = True

    def __init__(self, config: Optional[AttackConfig] = None, image_shape: Tuple[int, int, int] = (1, 28, 28),
                 num_classes: int = 10) -> None:
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise ConfigError(f"{self.name} needs a {self.Config.__name__}, got {type(self.config).__name__}")
        self.image_shape = tuple(int(v) for v in image_shape)
        self.num_classes = int(num_classes)
        check(self.config.target < self.num_classes,
              f"target {self.config.target} is not a class of a {self.num_classes}-class model")
        check(self.config.mode == "all-to-one" or self.supports_all_to_all,
              f"{self.name} supports only all-to-one")
        self.buffers: Dict[str, torch.Tensor] = {}
        self.setup()

    # -- to implement -----------------------------------------------------------------------------
    def setup(self) -> None:
        """Build trigger tensors into ``self.buffers`` (deterministic from ``self.config``)."""

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copies of float images ``x`` in [0, 1] (same shape, device and dtype)."""

    # -- labels and poisoning ---------------------------------------------------------------------
    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.config.mode == "all-to-all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.config.target)

    def test_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Which test inputs count for ASR: non-target classes (all-to-one) or all (all-to-all)."""
        if self.config.mode == "all-to-all":
            return torch.ones_like(y, dtype=torch.bool)
        return y != self.config.target

    def candidate_indices(self, train: ImageSet) -> torch.Tensor:
        """Images eligible for poisoning; dirty-label attacks use non-target images."""
        assert train.labels is not None
        if self.kind == "clean-label":
            return torch.nonzero(train.labels == self.config.target).flatten()
        return torch.nonzero(self.test_mask(train.labels)).flatten()

    def check_shape(self, data: ImageSet) -> None:
        if tuple(data.shape) != self.image_shape:
            raise DataError(f"{self.name}: images are {'x'.join(map(str, data.shape))} but the trigger was made "
                            f"for {'x'.join(map(str, self.image_shape))}")

    def poison_indices(self, train: ImageSet) -> torch.Tensor:
        """Deterministic choice of ``poison_rate * len(train)`` eligible images."""
        if train.labels is None:
            raise DataError(f"{self.name}: poisoning needs a labelled training set")
        self.check_shape(train)
        cand = self.candidate_indices(train)
        n = min(len(cand), int(round(self.config.poison_rate * len(train))))
        g = seeding.generator(self.config.seed + 1)
        return cand[torch.randperm(len(cand), generator=g)[:n]].sort().values

    def poison(self, train: ImageSet, model: Optional[nn.Module] = None) -> Tuple[ImageSet, torch.Tensor]:
        """(poisoned copy of ``train``, poisoned indices). The input set is not modified."""
        idx = self.poison_indices(train)
        images = train.images.clone()
        labels = train.labels.clone()
        for s in range(0, len(idx), 1024):
            part = idx[s:s + 1024]
            images[part] = quantize(self.apply(to_float(train.images[part])))
            if self.kind != "clean-label":
                labels[part] = self.target_labels(train.labels[part])
        return ImageSet(images, labels, train.classes, f"{train.name}+{self.name}"), idx

    def triggered_test(self, test: ImageSet) -> ImageSet:
        """The ASR/RA test set: triggered non-target images with their *true* labels."""
        if test.labels is None:
            raise DataError("measuring ASR needs a labelled test set")
        self.check_shape(test)
        keep = torch.nonzero(self.test_mask(test.labels)).flatten()
        images = torch.cat([quantize(self.apply(to_float(test.images[keep[s:s + 1024]])))
                            for s in range(0, len(keep), 1024)]) if len(keep) else test.images[:0]
        return ImageSet(images, test.labels[keep], test.classes, f"{test.name}+{self.name}")

    def train(self, model: nn.Module, train: ImageSet, optim: OptimConfig, *, augment_cfg: Optional[AugmentConfig],
              seed: int = 0, device: str = "cpu", resume_dir: Optional[Path] = None,
              progress: Optional[bool] = None) -> List[Dict[str, Any]]:
        """Train ``model`` on the poisoned set with cross-entropy (override for WaNet, IAD)."""
        poisoned, _ = self.poison(train, model)
        return fit(model, poisoned, cross_entropy_objective, optim, augment_cfg=augment_cfg, seed=seed,
                   device=device, resume_dir=resume_dir, desc=f"attack {self.name}", progress=progress)

    # -- artifact ---------------------------------------------------------------------------------
    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "config": to_dict(self.config),
                "image_shape": list(self.image_shape), "num_classes": self.num_classes}

    def save(self, directory: Union[str, Path]) -> None:
        """Write ``attack.json`` and ``attack.safetensors`` (the trigger's tensors) to ``directory``."""
        from safetensors.torch import save

        d = Path(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
        atomic_write_bytes(d / ARTIFACT_TENSORS, save(tensors) if tensors else save({"_": torch.zeros(0)}))
        atomic_write_json(d / ARTIFACT_JSON, self.describe())

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        return dict(self.buffers)

    def load_state_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        """The trigger's tensors from an artifact: same names and shapes as this attack's, cast to
        its dtypes, finite after the cast (a NaN trigger would poison every image it touches)."""
        from ..checkpoint import SUPPORTED_DTYPES

        for k in self.buffers:
            if k not in tensors or tensors[k].shape != self.buffers[k].shape:
                raise DataError(f"attack artifact lacks a matching tensor {k!r}")
            t = tensors[k]
            if t.layout != torch.strided or t.dtype not in SUPPORTED_DTYPES:
                raise DataError(f"attack artifact tensor {k!r} has dtype {t.dtype}, which bcu does not load")
            t = t.to(self.buffers[k].dtype)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise DataError(f"attack artifact tensor {k!r} contains NaN or Inf")
            self.buffers[k] = t


def create_attack(name: str, config: Optional[Dict[str, Any]] = None, image_shape: Tuple[int, int, int] = (1, 28, 28),
                  num_classes: int = 10) -> Attack:
    """Build a registered attack from a name and a dict of options (validated)."""
    cls = ATTACKS.get(name)
    return cls(from_dict(cls.Config, config or {}), image_shape, num_classes)


@dataclass
class ArtifactMeta:
    """The fields of ``attack.json`` bcu reads, typed (every value is validated before use)."""

    name: str
    image_shape: Tuple[int, int, int]
    num_classes: int
    config: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..untrusted import MAX_CLASSES, check_image_shape

        self.image_shape = check_image_shape(self.image_shape, "image_shape")
        check(2 <= self.num_classes <= MAX_CLASSES, f"num_classes must be in [2, {MAX_CLASSES}], got {self.num_classes}")


def load_attack(directory: Union[str, Path]) -> Attack:
    """Rebuild an attack, trigger tensors included, from an artifact folder written by ``save``.

    ``attack.json`` (at most :data:`bcu.untrusted.MAX_ATTACK_JSON_BYTES`) is parsed into
    :class:`ArtifactMeta`; ``attack.safetensors`` (at most ``MAX_ATTACK_TENSOR_BYTES``) must hold
    tensors of the attack's own names and shapes. Only DataError escapes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from ..untrusted import MAX_ATTACK_JSON_BYTES, MAX_ATTACK_TENSOR_BYTES, read_bounded, read_json

    d = Path(directory)
    meta_path = d / ARTIFACT_JSON if d.is_dir() else d
    raw = read_json(meta_path, MAX_ATTACK_JSON_BYTES, "attack artifact", DataError)
    if not isinstance(raw, dict):
        raise DataError(f"{meta_path} is not a bcu attack artifact (not a JSON object)")
    known = {f.name for f in dataclasses.fields(ArtifactMeta)}
    try:
        meta = from_dict(ArtifactMeta, {k: v for k, v in raw.items() if k in known})
        attack = create_attack(meta.name, meta.config, meta.image_shape, meta.num_classes)
    except ConfigError as e:
        raise DataError(f"{meta_path} is not a usable bcu attack artifact: {e}") from None
    tpath = meta_path.parent / ARTIFACT_TENSORS
    if tpath.is_file():
        data = read_bounded(tpath, MAX_ATTACK_TENSOR_BYTES, "attack tensors", DataError)
        try:
            tensors = load(data)
        except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
            raise DataError(f"{tpath} is unreadable: {e}") from None
        attack.load_state_tensors(tensors)
    return attack
