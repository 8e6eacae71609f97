"""The attack contract: a trigger on batched images, one poisoning contract (static or per batch),
one training routine through :func:`bcu.train.fit`, and an artifact that regenerates the triggered
test set later.

Images are float tensors in [0, 1] of shape (N, C, H, W) on any device. Every random choice
(trigger pattern, poisoned indices) is drawn from generators seeded by the config, so the same
config always produces the same poisoned set and the same trigger.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Literal, Optional, Sequence, Tuple, Type, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .. import seeding, untrusted
from ..checkpoint import SUPPORTED_DTYPES
from ..config import check, from_dict
from ..data.augment import AugmentConfig
from ..data.imageset import ImageSet, to_float
from ..errors import ConfigError, DataError
from ..output import atomic_write_bytes, atomic_write_json
from ..registry import Registry
from ..train import Objective, OptimConfig, cross_entropy_objective, fit
from ..untrusted import check_image_shape, read_bounded, read_json

ATTACKS: Registry[Type["Attack"]] = Registry("attack")
ARTIFACT_JSON = "attack.json"
ARTIFACT_TENSORS = "attack.safetensors"
AttackKind = Literal["dirty-label", "clean-label"]
Poisoning = Literal["static", "per-batch"]


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
    """Base class: subclasses set ``name``, ``Config``, ``kind``, ``poisoning`` and implement :meth:`trigger`.

    One poisoning contract, in two forms (``poisoning``):

    * ``"static"``: :meth:`poison` returns a poisoned copy of the training set (the chosen images
      carry :meth:`train_trigger`; dirty-label attacks also relabel them), which :meth:`train` fits
      with cross-entropy. An attack whose poisoning needs a clean model (LC) builds it in
      :meth:`clean_model`.
    * ``"per-batch"``: the training set stays clean and the objective of :meth:`batch_objective`
      poisons every (shuffled, augmented) batch as ``fit`` draws it (:meth:`poison_batch`); networks
      of the attack's own are trained first in :meth:`pretrain`. :meth:`poison` is refused.

    Either way :meth:`train` is the one way a backdoored model is trained, through
    :func:`bcu.train.fit`, and :meth:`apply` (the test-time trigger, shape-checked) regenerates the
    triggered test set from the saved artifact.
    """

    name: ClassVar[str]
    kind: ClassVar[AttackKind] = "dirty-label"
    poisoning: ClassVar[Poisoning] = "static"
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
    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Test-time triggered copies of float images ``x`` in [0, 1] (same shape, device and dtype;
        the shape is checked by :meth:`apply`)."""

    def train_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger poisoned *training* images carry (static attacks; default: :meth:`trigger`)."""
        return self.trigger(x)

    # -- the trigger ------------------------------------------------------------------------------
    def check_shape(self, shape: Sequence[int]) -> None:
        """Images of another (C, H, W) than the trigger's are refused, in one line."""
        if tuple(int(v) for v in shape) != self.image_shape:
            raise DataError(f"{self.name}: images are {'x'.join(map(str, shape))} but the trigger was made "
                            f"for {'x'.join(map(str, self.image_shape))}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copies of float images ``x`` (N, C, H, W) in [0, 1]: the test-time trigger."""
        self.check_shape(x.shape[1:])
        return self.trigger(x)

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

    def check_training_set(self, train: ImageSet, optim: Optional[OptimConfig] = None) -> None:
        """Poisoning needs labelled images of the trigger's shape (and, per batch, at least one
        poisoned image in a batch of ``optim.batch_size``)."""
        if train.labels is None:
            raise DataError(f"{self.name}: poisoning needs a labelled training set")
        self.check_shape(train.shape)
        if self.poisoning == "per-batch" and optim is not None:
            check(self.config.poison_rate == 0 or int(optim.batch_size * self.config.poison_rate) >= 1,
                  f"{self.name}: poison_rate {self.config.poison_rate} leaves no backdoor sample in a batch of "
                  f"{optim.batch_size}")

    def poison_indices(self, train: ImageSet) -> torch.Tensor:
        """Deterministic choice of ``poison_rate * len(train)`` eligible images."""
        self.check_training_set(train)
        cand = self.candidate_indices(train)
        n = min(len(cand), int(round(self.config.poison_rate * len(train))))
        g = seeding.generator(self.config.seed + 1)
        return cand[torch.randperm(len(cand), generator=g)[:n]].sort().values

    def poison(self, train: ImageSet, model: Optional[nn.Module] = None) -> Tuple[ImageSet, torch.Tensor]:
        """Static attacks: (poisoned copy of ``train``, poisoned indices); the input set is not
        modified. ``model``: the clean model the poisoning needs, if any (:meth:`clean_model`)."""
        if self.poisoning != "static":
            raise ConfigError(f"{self.name} poisons each training batch as it is drawn, not the data set: use "
                              f"train() (or poison_batch() on one batch)")
        idx = self.poison_indices(train)
        images = train.images.clone()
        labels = train.labels.clone()
        for s in range(0, len(idx), 1024):
            part = idx[s:s + 1024]
            images[part] = quantize(self.train_trigger(to_float(train.images[part])))
            if self.kind != "clean-label":
                labels[part] = self.target_labels(train.labels[part])
        return ImageSet(images, labels, train.classes, f"{train.name}+{self.name}"), idx

    def triggered_test(self, test: ImageSet) -> ImageSet:
        """The ASR/RA test set: triggered non-target images with their *true* labels."""
        if test.labels is None:
            raise DataError("measuring ASR needs a labelled test set")
        self.check_shape(test.shape)
        keep = torch.nonzero(self.test_mask(test.labels)).flatten()
        images = torch.cat([quantize(self.apply(to_float(test.images[keep[s:s + 1024]])))
                            for s in range(0, len(keep), 1024)]) if len(keep) else test.images[:0]
        return ImageSet(images, test.labels[keep], test.classes, f"{test.name}+{self.name}")

    # -- training ---------------------------------------------------------------------------------
    def clean_model(self, model: nn.Module, train: ImageSet, optim: OptimConfig, run: "Training") -> Optional[nn.Module]:
        """Static attacks: the clean model :meth:`poison` needs (None: none needed)."""
        return None

    def pretrain(self, train: ImageSet, optim: OptimConfig, run: "Training") -> List[Dict[str, Any]]:
        """Per-batch attacks: train the attack's own networks before the model (returns their history)."""
        return []

    def batch_objective(self, optim: OptimConfig, run: "Training") -> Objective:
        """Per-batch attacks: the objective that poisons every batch (see :meth:`poison_batch`)."""
        raise NotImplementedError(f"{self.name} poisons its data set (poisoning = {self.poisoning!r})")

    def train(self, model: nn.Module, train: ImageSet, optim: OptimConfig, *, augment_cfg: Optional[AugmentConfig],
              seed: int = 0, device: str = "cpu", resume_dir: Optional[Path] = None,
              progress: Optional[bool] = None) -> List[Dict[str, Any]]:
        """Train ``model`` with the backdoor in place, through :func:`bcu.train.fit`: on the poisoned
        set with cross-entropy (static), or on the clean set with the per-batch objective."""
        run = Training(augment_cfg, seed, device, resume_dir, progress)
        self.check_training_set(train, optim)
        history: List[Dict[str, Any]] = []
        if self.poisoning == "static":
            clean = self.clean_model(model, train, optim, run)
            data, _ = self.poison(train, clean)
            del clean
            objective: Objective = cross_entropy_objective
        else:
            history = self.pretrain(train, optim, run)
            data, objective = train, self.batch_objective(optim, run)
        return history + run.fit(model, data, objective, optim, desc=f"attack {self.name}")

    # -- artifact ---------------------------------------------------------------------------------
    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "config": dataclasses.asdict(self.config),
                "image_shape": list(self.image_shape), "num_classes": self.num_classes}

    def save(self, directory: Union[str, Path]) -> None:
        """Write ``attack.json`` and ``attack.safetensors`` (the trigger's tensors) to ``directory``."""
        d = Path(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
        atomic_write_bytes(d / ARTIFACT_TENSORS, save_safetensors(tensors) if tensors else
                           save_safetensors({"_": torch.zeros(0)}))
        atomic_write_json(d / ARTIFACT_JSON, self.describe())

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        return dict(self.buffers)

    def load_state_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        """The trigger's tensors from an artifact: same names and shapes as this attack's, cast to
        its dtypes, finite after the cast (a NaN trigger would poison every image it touches)."""
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


@dataclass
class Training:
    """How an attack's training runs (the keyword arguments of :meth:`Attack.train`); :meth:`fit`
    runs one phase of it, with its own resume sub-folder."""

    augment_cfg: Optional[AugmentConfig]
    seed: int
    device: str
    resume_dir: Optional[Path]
    progress: Optional[bool]

    def fit(self, model: nn.Module, data: ImageSet, objective: Objective, optim: OptimConfig, *, desc: str,
            phase: Optional[str] = None, seed: Optional[int] = None, **kw: Any) -> List[Dict[str, Any]]:
        """:func:`bcu.train.fit` with this run's settings; ``phase`` names the resume sub-folder of a
        phase before the main one (the main phase resumes from ``resume_dir`` itself)."""
        resume_dir = self.resume_dir if (self.resume_dir is None or phase is None) else Path(self.resume_dir) / phase
        return fit(model, data, objective, optim, augment_cfg=self.augment_cfg,
                   seed=self.seed if seed is None else seed, device=self.device, resume_dir=resume_dir, desc=desc,
                   progress=self.progress, **kw)


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
        self.image_shape = check_image_shape(self.image_shape, "image_shape")
        check(2 <= self.num_classes <= untrusted.MAX_CLASSES,
              f"num_classes must be in [2, {untrusted.MAX_CLASSES}], got {self.num_classes}")


def load_attack(directory: Union[str, Path]) -> Attack:
    """Rebuild an attack, trigger tensors included, from an artifact folder written by ``save``.

    ``attack.json`` (at most :data:`bcu.untrusted.MAX_ATTACK_JSON_BYTES`) is parsed into
    :class:`ArtifactMeta`; ``attack.safetensors`` (at most ``MAX_ATTACK_TENSOR_BYTES``) must hold
    tensors of the attack's own names and shapes. Only DataError escapes.
    """
    d = Path(directory)
    meta_path = d / ARTIFACT_JSON if d.is_dir() else d
    raw = read_json(meta_path, untrusted.MAX_ATTACK_JSON_BYTES, "attack artifact", DataError)
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
        data = read_bounded(tpath, untrusted.MAX_ATTACK_TENSOR_BYTES, "attack tensors", DataError)
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
            raise DataError(f"{tpath} is unreadable: {e}") from None
        attack.load_state_tensors(tensors)
    return attack
