"""The model contract: the registry, the spec stored in every sidecar, and the normalising wrapper.

Every classifier bcu builds is a :class:`Classifier`: :class:`Normalize` (the spec's mean/std) then
a registered architecture, taking (N, C, H, W) images in [0, 1]. The defenses also accept any other
``nn.Module`` with that input contract; :func:`input_shape_of` and :func:`check_images` read the
input shape from a spec where there is one.
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from .. import untrusted
from ..config import check
from ..errors import ConfigError, DataError, show
from ..registry import Registry
from ..untrusted import check_image_shape

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = MODELS.register


class ModelSource(Protocol):
    """Architectures of another library, named ``PREFIX:NAME`` (``timm:resnet18``, ``torchvision:resnet18``).

    A source imports its library only when a model is built, never when bcu is imported, and
    never fetches weights: the user's file is the model (:mod:`bcu.models.external`)."""

    def factory(self, name: str) -> Callable[..., nn.Module]:
        """A constructor ``(num_classes, input_shape, **options) -> nn.Module`` for ``name`` (ConfigError if
        the library does not know it)."""
        ...

    def normalization(self, name: str, channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """The library's own pretrained mean/std for ``name`` (``--norm timm``)."""
        ...


SOURCES: Registry[ModelSource] = Registry("model source")
register_source = SOURCES.register

# a library's architecture name: lower-case words, optionally one ``.tag`` (timm's pretrained tags)
_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,99}(\.[a-z0-9_]{1,100})?$")


def split_arch(arch: str) -> Tuple[Optional[str], str]:
    """``'timm:resnet18'`` -> ``('timm', 'resnet18')``; a name of bcu's own zoo (``backdoorbench:*``
    included: registered names are looked up first) -> ``(None, name)``."""
    if ":" in arch and arch not in MODELS:
        prefix, name = arch.split(":", 1)
        return prefix, name
    return None, arch


def known_arch(arch: Any) -> bool:
    """A name of bcu's zoo, or ``PREFIX:NAME`` of a registered source with a well-formed NAME."""
    if not isinstance(arch, str) or len(arch) > 200:
        return False
    prefix, name = split_arch(arch)
    if prefix is None:
        return arch in MODELS
    return prefix in SOURCES and bool(_SOURCE_NAME.match(name))


def factory_of(arch: str) -> Callable[..., nn.Module]:
    """The constructor of ``arch``: bcu's registry, or the source named by its prefix."""
    prefix, name = split_arch(arch)
    return MODELS.get(arch) if prefix is None else SOURCES.get(prefix).factory(name)


def arch_names() -> str:
    return ", ".join(MODELS.names()) + "".join(f", {p}:NAME" for p in SOURCES.names())


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
        check(known_arch(self.arch), f"unknown architecture {show(self.arch)} (known: {arch_names()})")
        check(isinstance(self.num_classes, int) and not isinstance(self.num_classes, bool)
              and 2 <= self.num_classes <= untrusted.MAX_CLASSES,
              f"num_classes must be an integer in [2, {untrusted.MAX_CLASSES}], got {show(self.num_classes)}")
        self.input_shape = check_image_shape(tuple(self.input_shape) if isinstance(self.input_shape, list)
                                             else self.input_shape, "input_shape")
        c = self.input_shape[0]
        check(len(self.mean) in (1, c) and len(self.std) in (1, c),
              f"mean/std need 1 or {c} values")
        check(all(isinstance(v, (int, float)) and math.isfinite(v) for v in (*self.mean, *self.std)),
              "mean/std values must be finite numbers")
        check(all(s > 0 for s in self.std), "std values must be > 0")
        check(isinstance(self.kwargs, dict) and len(self.kwargs) <= 32, "kwargs must be a table of at most 32 options")
        for k, v in self.kwargs.items():
            check(isinstance(k, str) and len(k) <= 64, f"kwargs: option name {show(k)} is not a short text")
            check(_plain_option(v), f"kwargs.{k}: expected a number, true/false or a short text, got {show(v)}")
        if self.classes is not None:
            check(len(self.classes) == self.num_classes,
                  f"{len(self.classes)} class names for num_classes={self.num_classes}")
            check(all(isinstance(n, str) and len(n) <= 256 for n in self.classes),
                  "class names must be texts of at most 256 characters")


def _plain_option(v: Any, nested: bool = False) -> bool:
    """An architecture option from a file: a bool, an int within +-2^31, a finite float, a short text,
    or a list of at most 8 of those (``img_size: [32, 32]``)."""
    if isinstance(v, (list, tuple)) and not nested:
        return len(v) <= 8 and all(_plain_option(x, True) for x in v)
    if isinstance(v, bool):
        return True
    if isinstance(v, int):
        return -(2 ** 31) <= v < 2 ** 31
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, str) and len(v) <= 256


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
    name = arch if ":" in arch else arch.lower()
    spec = ModelSpec(name, num_classes, tuple(int(v) for v in input_shape), tuple(mean), tuple(std), dict(kwargs), classes)
    return build(spec)


def _construct(factory: Callable[..., nn.Module], spec: ModelSpec) -> nn.Module:
    try:
        return factory(num_classes=spec.num_classes, input_shape=tuple(spec.input_shape), **spec.kwargs)
    except ConfigError:
        raise
    except Exception as e:  # the values come from a file: any failure to build is "cannot build", one line
        text = (str(e).strip().splitlines() or [""])[0].split(" Exception raised from")[0][:200]
        raise ConfigError(f"cannot build {spec.arch!r}: {type(e).__name__}: {text}") from None


def build(spec: ModelSpec, check_state: Optional[Callable[[Dict[str, torch.Tensor]], None]] = None) -> Classifier:
    """The network of ``spec``, wrapped with its normalisation.

    It is first built on the ``meta`` device, where no memory is allocated: a spec whose options
    ask for more than :data:`bcu.untrusted.MAX_PARAMS` values (``hidden: 1000000``, a huge
    ``width``) is refused, and ``check_state`` (given the meta state dict) can refuse a mismatch
    with the weights at hand, before any real allocation. So a model file bounds the model it
    builds: its tensors must match the architecture's exactly.
    """
    factory = factory_of(spec.arch)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):  # a source checks its own
        unknown = [k for k in spec.kwargs if k not in params]
        if unknown:
            raise ConfigError(f"architecture {spec.arch!r} has no option {show(unknown[0])}")
    with torch.device("meta"):
        meta = _construct(factory, spec)
    values = sum(t.numel() for t in meta.state_dict().values())
    if values > untrusted.MAX_PARAMS:
        raise ConfigError(f"{spec.arch!r} with these options has {values:,} parameters, more than the "
                          f"{untrusted.MAX_PARAMS:,} bcu builds (docs/security.md)")
    if check_state is not None:
        check_state(meta.state_dict())
    del meta
    return Classifier(_construct(factory, spec), spec)


def input_shape_of(model: nn.Module) -> Optional[Tuple[int, int, int]]:
    """(C, H, W) from the model's spec (a :class:`Classifier`), else None."""
    spec = getattr(model, "spec", None)
    return None if spec is None else tuple(int(v) for v in spec.input_shape)  # type: ignore[return-value]


def check_images(model: nn.Module, shape: Sequence[int], where: str) -> None:
    """Images of ``shape`` (C, H, W) are refused unless the model's spec takes them (one line naming what
    differs); a model without a spec takes anything."""
    want = input_shape_of(model)
    if want is None:
        return
    c, h, w = want
    dc, dh, dw = (int(v) for v in shape)
    if (c, h, w) != (dc, dh, dw):
        what = "channel count" if c != dc else "image size"
        raise DataError(f"{where}: images are {dc}x{dh}x{dw} (CxHxW) but the model expects {c}x{h}x{w}: "
                        f"wrong {what}")
