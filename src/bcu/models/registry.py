"""The model registry, the model spec stored in every sidecar, and the normalising wrapper."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import check
from ..errors import ConfigError
from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = MODELS.register


@dataclass
class ModelSpec:
    """Everything needed to rebuild a classifier: stored as the JSON sidecar of a checkpoint."""

    arch: str
    num_classes: int = 10
    input_shape: Tuple[int, int, int] = (1, 28, 28)
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    classes: Optional[List[str]] = None

    def __post_init__(self) -> None:
        check(self.arch in MODELS, f"unknown architecture {self.arch!r} (known: {', '.join(MODELS.names())})")
        check(isinstance(self.num_classes, int) and self.num_classes >= 2,
              f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        check(len(self.input_shape) == 3 and all(int(v) > 0 for v in self.input_shape),
              f"input_shape must be (C, H, W), got {self.input_shape!r}")
        c = self.input_shape[0]
        check(len(self.mean) in (1, c) and len(self.std) in (1, c),
              f"mean/std need 1 or {c} values")
        check(all(s > 0 for s in self.std), "std values must be > 0")
        if self.classes is not None:
            check(len(self.classes) == self.num_classes,
                  f"{len(self.classes)} class names for num_classes={self.num_classes}")


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are constants, not parameters or state."""

    def __init__(self, mean: Tuple[float, ...], std: Tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """A network that takes images in [0, 1]: ``Normalize`` then the architecture's ``net``.

    Only ``net``'s state dict is saved, so a plain state dict of the bare architecture (as most
    training scripts write it) loads directly.
    """

    def __init__(self, net: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def create_model(arch: str, num_classes: int = 10, input_shape: Tuple[int, int, int] = (1, 28, 28),
                 mean: Tuple[float, ...] = (0.0,), std: Tuple[float, ...] = (1.0,),
                 classes: Optional[List[str]] = None, **kwargs: Any) -> Classifier:
    """Build a registered architecture wrapped with its input normalisation (timm-style)."""
    spec = ModelSpec(arch.lower(), num_classes, tuple(int(v) for v in input_shape), tuple(mean), tuple(std),
                     dict(kwargs), classes)
    return build(spec)


def build(spec: ModelSpec) -> Classifier:
    factory = MODELS.get(spec.arch)
    params = inspect.signature(factory).parameters
    unknown = [k for k in spec.kwargs if k not in params]
    if unknown:
        raise ConfigError(f"architecture {spec.arch!r} has no option {unknown[0]!r}")
    try:
        net = factory(num_classes=spec.num_classes, input_shape=tuple(spec.input_shape), **spec.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {spec.arch!r}: {e}") from None
    return Classifier(net, spec)
