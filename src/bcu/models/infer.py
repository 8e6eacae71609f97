"""Which registered architecture a bare state dict belongs to, from its keys and shapes alone.

A ``.pt`` file from a training script carries no architecture name. Every registered
architecture is built on the ``meta`` device (no memory) with its factory's defaults; those
whose key *set* equals the file's are candidates. For each candidate the values a state dict
does record are read off it by building variants and diffing their shapes, never from
architecture-specific knowledge:

* ``num_classes``: the dimensions that change between 10 and 11 classes (the head);
* input channels: the dimensions that change with the stem's input channels;
* ``width`` (for factories that take one): the ratio of the first dimension that still differs;
* the input side, only where some shape depends on it (a flattening classifier, a ViT's
  position table): the first of a few common sizes that fits; otherwise the factory's default
  side is assumed, and said so.

The candidate is kept only if a model built with the values read has exactly the file's keys and
shapes. Several registered names may build the same network (:data:`SAME_NETWORK`); they count
as one. Two different networks that both fit are refused as ambiguous, with one line. Where
torchvision is installed its classifiers are candidates too (:mod:`bcu.models.external`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import ModelError
from .backdoorbench import ALIASES
from .external import SAME_AS, inference_candidates
from .registry import MODELS, factory_of

Shapes = Dict[str, Tuple[int, ...]]

#: names that build the very same network as the name they map to (keys, forward and init); the
#: target is the one reported
SAME_NETWORK: Dict[str, str] = {**ALIASES, **SAME_AS}

#: input sides tried, in order, for architectures whose weights depend on the input size
COMMON_SIDES = (28, 32, 64, 224, 16, 96, 128, 256, 8, 48, 299)


@dataclass
class Inferred:
    """What :func:`infer_architecture` read from a state dict."""

    arch: str
    num_classes: int
    input_shape: Tuple[int, int, int]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    side_assumed: bool = False          # the input size is not recorded in the weights
    same_as: List[str] = field(default_factory=list)  # other names of the same network

    def describe(self) -> str:
        c, h, w = self.input_shape
        opts = "".join(f", {k}={v:g}" if isinstance(v, float) else f", {k}={v}" for k, v in self.kwargs.items())
        side = (f"{h}x{w} assumed (the weights do not record it; pass --input-shape otherwise)" if self.side_assumed
                else f"{h}x{w}")
        alias = f" (= {', '.join(self.same_as)})" if self.same_as else ""
        return (f"inferred architecture {self.arch}{alias} from the weights' keys and shapes: "
                f"{self.num_classes} classes, {c} input channels{opts}, input {side}")


def shapes_of(state: Mapping[str, Any]) -> Shapes:
    return {str(k): tuple(int(d) for d in v.shape) for k, v in state.items()}


def _default_shape(factory) -> Tuple[int, int, int]:
    p = inspect.signature(factory).parameters.get("input_shape")
    d = p.default if p is not None and p.default is not inspect.Parameter.empty else (3, 32, 32)
    return tuple(int(v) for v in d)  # type: ignore[return-value]


_CACHE: Dict[Tuple[Any, ...], Optional[Shapes]] = {}


def _meta_shapes(factory, num_classes: int, input_shape: Sequence[int], kwargs: Mapping[str, Any]) -> Optional[Shapes]:
    """Key -> shape of ``factory(...)`` built on the meta device, or None if it cannot be built so
    (memoised: factories are deterministic, and every inference builds every family's defaults)."""
    key = (factory, int(num_classes), tuple(input_shape), tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        try:
            with torch.device("meta"):
                net = factory(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
            _CACHE[key] = shapes_of(net.state_dict())
        except Exception:  # a variant the factory refuses (too small an input, ...) is simply not a fit
            _CACHE[key] = None
        if len(_CACHE) > 512:
            _CACHE.pop(next(iter(_CACHE)))
    return _CACHE[key]


def _diff(a: Shapes, b: Shapes) -> List[Tuple[str, int]]:
    """(key, dim) positions where two builds with the same keys differ."""
    out = []
    for k, s in a.items():
        t = b.get(k)
        if t is None or len(t) != len(s):
            return [(k, -1)]
        out += [(k, i) for i, (x, y) in enumerate(zip(s, t)) if x != y]
    return out


def _read(positions: List[Tuple[str, int]], target: Shapes) -> Optional[int]:
    """The one value ``target`` holds at every position, or None if they disagree."""
    vals = {target[k][i] for k, i in positions if i >= 0 and i < len(target.get(k, ()))}
    return vals.pop() if len(vals) == 1 else None


def _factory(name: str):
    """A registered family's constructor, or a library source's (``torchvision:NAME``) with that
    library's defaults (1,000 classes, 3x224x224) so that its default build can be compared."""
    if name in MODELS:
        return MODELS.get(name)
    if name in _LIBRARY:
        return _LIBRARY[name]
    build = factory_of(name)

    def library(num_classes: int = 1000, input_shape: Tuple[int, int, int] = (3, 224, 224)):
        return build(num_classes, input_shape)

    _LIBRARY[name] = library
    return library


_LIBRARY: Dict[str, Any] = {}


def _candidates() -> List[str]:
    return list(MODELS.names()) + inference_candidates()


def _fit(name: str, target: Shapes, num_classes: Optional[int],
         input_shape: Optional[Tuple[int, int, int]]) -> Optional[Inferred]:
    factory = _factory(name)
    params = inspect.signature(factory).parameters
    if "num_classes" not in params or "input_shape" not in params:
        return None
    c0, h0, w0 = _default_shape(factory)
    base = _meta_shapes(factory, 10, (c0, h0, w0), {})
    if base is None or set(base) != set(target):
        return None
    # the values a state dict records, read where a variant's shapes differ from the base's
    if num_classes is None:
        more = _meta_shapes(factory, 11, (c0, h0, w0), {})
        num_classes = _read(_diff(base, more), target) if more is not None else None
        if num_classes is None:
            return None
    channels = input_shape[0] if input_shape else None
    if channels is None:
        other = _meta_shapes(factory, 10, (c0 + 1, h0, w0), {})
        pos = _diff(base, other) if other is not None else []
        channels = _read(pos, target) if pos else c0
        if channels is None:
            return None
    kwargs: Dict[str, Any] = {}
    sides = [(input_shape[1], input_shape[2])] if input_shape else [(h0, w0)]
    side_assumed = input_shape is None
    if input_shape is None:
        bigger = _meta_shapes(factory, 10, (c0, 2 * h0, 2 * w0), {})
        if bigger is None or _diff(base, bigger):  # the weights depend on the input size: search it
            sides = [(h0, w0)] + [(s, s) for s in COMMON_SIDES if s != h0 or s != w0]
            side_assumed = False
    for h, w in sides:
        got = _meta_shapes(factory, num_classes, (channels, h, w), kwargs)
        if got is None:
            continue
        if got != target and "width" in params:
            got, kwargs = _fit_width(factory, got, target, num_classes, (channels, h, w))
        if got == target:
            return Inferred(name, int(num_classes), (int(channels), int(h), int(w)), kwargs, side_assumed)
    return None


#: widths tried after the ratios the shapes suggest (a rounding rule such as MobileNet's
#: divisible-by-8 channels makes the ratio of one layer differ from the multiplier)
COMMON_WIDTHS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.25, 1.5, 2.0)


def _fit_width(factory, got: Shapes, target: Shapes, num_classes: int,
               shape: Tuple[int, int, int]) -> Tuple[Shapes, Dict[str, Any]]:
    """A ``width`` whose build has exactly ``target``'s shapes: the ratios of the differing
    dimensions (most frequent first), then :data:`COMMON_WIDTHS`; at most 16 builds."""
    votes: Dict[float, int] = {}
    for k, i in _diff(got, target):
        if i < 0:
            return got, {}
        if got[k][i] > 0:
            r = round(target[k][i] / got[k][i] * 64) / 64
            if r > 0:
                votes[r] = votes.get(r, 0) + 1
    tried = sorted(votes, key=lambda r: -votes[r]) + [w for w in COMMON_WIDTHS if w not in votes]
    for width in tried[:16]:
        trial = _meta_shapes(factory, num_classes, shape, {"width": width})
        if trial == target:
            return trial, {"width": width}
    return got, {}


def infer_architecture(state: Mapping[str, Any], where: str = "the weights", num_classes: Optional[int] = None,
                       input_shape: Optional[Tuple[int, int, int]] = None,
                       names: Optional[Sequence[str]] = None) -> Inferred:
    """The registered architecture whose state dict has exactly ``state``'s keys and shapes.

    ``num_classes``/``input_shape`` given by the user are taken as they are. Raises a one-line
    :class:`ModelError` when nothing fits or when two different networks do.
    """
    target = shapes_of(state)
    fits: List[Inferred] = []
    for name in names if names is not None else _candidates():
        if name in SAME_NETWORK:
            continue
        got = _fit(name, target, num_classes, input_shape)
        if got is not None:
            got.same_as = sorted(k for k, v in SAME_NETWORK.items() if v == name)
            fits.append(got)
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise ModelError(f"cannot tell the architecture of {where}: its keys and shapes fit "
                         f"{' and '.join(f.arch for f in fits)}; pass --arch")
    raise ModelError(f"cannot tell the architecture of {where} from its {len(target)} keys ({_closest(target)}); "
                     f"pass --arch (bcu list models)")


def _closest(target: Shapes) -> str:
    """'closest: NAME (k keys differ)' over the registered architectures' default builds."""
    best: Optional[Tuple[int, str, str]] = None
    for name in _candidates():
        if name in SAME_NETWORK:
            continue
        factory = _factory(name)
        try:
            base = _meta_shapes(factory, 10, _default_shape(factory), {})
        except (TypeError, ValueError):
            base = None
        if base is None:
            continue
        extra = sorted(set(target) - set(base))
        missing = sorted(set(base) - set(target))
        n = len(extra) + len(missing)
        if best is None or n < best[0]:
            first = (f"unexpected {extra[0]!r}" if extra else f"missing {missing[0]!r}") if n else ""
            best = (n, name, first)
    if best is None:
        return "no registered architecture to compare"
    n, name, first = best
    if not n:
        return f"closest: {name}, same keys, other shapes"
    return f"closest: {name}, {n} key{'s differ' if n > 1 else ' differs'}, e.g. {first}"
