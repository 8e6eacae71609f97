"""Depth-aware partial re-initialisation, for any ``nn.Module``.

The weight-bearing layers are found by tracing one forward pass (execution order and output
shapes), never by names. The first is the *stem*, the last the *head*; the layers between are
grouped into *stages* by the spatial resolution of their output (a new stage starts where the
network downsamples; flattened layers join the last stage). The paper's ratios
(stem 0.01; stages 0.01, 0.03, 0.09, 0.27; head 0.10 for ResNet-18's stem/layer1-4/fc) are mapped
onto however many stages a network has by geometric interpolation, which reproduces them exactly
for four stages. Each parameter element is then replaced, with probability equal to its layer's
ratio, by the value from a fresh default initialisation of that layer. Normalisation layers and
their running statistics are never touched, and kept weights are not rescaled.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import check
from ..errors import ModelError
from .. import seeding

NORM_TYPES: Tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def is_norm(module: nn.Module) -> bool:
    """Normalisation layers, including custom ones whose class name says so (LayerNorm2d, RMSNorm)."""
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


@dataclass
class ReinitConfig:
    """Re-initialisation ratios by depth: the paper's vector (for ResNet-18's stem/layer1-4/fc),
    multiplied by ``scale`` (bcu's default 4, from docs/method.md; the paper preset uses 1)."""

    stem: float = field(default=0.01, metadata={"help": "ratio for the first weight layer"})
    stages: Tuple[float, ...] = field(default=(0.01, 0.03, 0.09, 0.27), metadata={
        "help": "ratios of the first..last body stage, interpolated geometrically to the model's stage count"})
    head: float = field(default=0.10, metadata={"help": "ratio for the classifier (last weight layer)"})
    scale: float = field(default=4.0, metadata={
        "help": "multiply every ratio by this, capped at max_ratio (bcu default 4; paper 1)"})
    max_ratio: float = field(default=0.9, metadata={"help": "upper bound of any ratio after scaling (bcu 0.9; paper 1)"})
    profile: Literal["stages", "depth"] = field(default="stages", metadata={
        "help": "stages: one ratio per traced stage (the stage vector interpolated onto the model's stage count); "
                "depth: each body layer's ratio interpolated from the stage vector at its relative depth "
                "(execution order), so no stage takes only the vector's first value"})
    uniform: Optional[float] = field(default=None, metadata={
        "help": "one ratio for every weight layer, stem and head included (replaces the depth profile and scale)"})
    overrides: Dict[str, float] = field(default_factory=dict, metadata={
        "help": "layer-name glob -> ratio, applied last (e.g. {'classifier.*': 1.0})"})
    include_bias: bool = field(default=True, metadata={"help": "re-initialise biases too (paper: yes)"})
    seed: int = field(default=0, metadata={"help": "seed of the masks and the fresh initialisation"})

    def __post_init__(self) -> None:
        for name, v in [("stem", self.stem), ("head", self.head), ("max_ratio", self.max_ratio),
                        *((f"stages[{i}]", s) for i, s in enumerate(self.stages)),
                        *((f"overrides[{k}]", v) for k, v in self.overrides.items())]:
            check(0.0 <= v <= 1.0, f"reinit ratio {name} must be in [0, 1], got {v}")
        check(len(self.stages) >= 1, "reinit.stages needs at least one ratio")
        check(self.uniform is None or 0.0 <= self.uniform <= 1.0, f"reinit.uniform must be in [0, 1], got {self.uniform}")
        check(self.scale >= 0, f"reinit.scale must be >= 0, got {self.scale}")


@dataclass
class LayerInfo:
    name: str
    kind: str
    order: int
    out_shape: Tuple[int, ...]
    numel: int
    stage: str = ""
    ratio: float = 0.0
    dropped: int = 0

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / self.numel if self.numel else 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "stage": self.stage, "ratio": self.ratio,
                "out_shape": list(self.out_shape), "params": self.numel, "dropped": self.dropped,
                "dropped_fraction": self.dropped_fraction}


def weight_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Modules that own parameters directly and are not normalisation layers."""
    out = {}
    for name, m in model.named_modules():
        if is_norm(m):
            continue
        if any(True for _ in m.parameters(recurse=False)):
            out[name] = m
    return out


def trace_layers(model: nn.Module, input_shape: Sequence[int]) -> List[LayerInfo]:
    """Weight layers in execution order with their output shapes (one forward on zeros)."""
    layers = weight_layers(model)
    if not layers:
        raise ModelError("the model has no weight layers to re-initialise")
    seen: Dict[str, LayerInfo] = {}
    entered: Dict[str, int] = {}
    hooks = []

    # ordered by when a layer's forward *starts*: a container that owns parameters itself (a ViT's
    # class token and position embeddings) finishes after its children, and would otherwise be
    # taken for the head in place of the classifier
    def make_pre_hook(name: str):
        def pre(_m, _inp):
            entered.setdefault(name, len(entered))
        return pre

    def make_hook(name: str, mod: nn.Module):
        def hook(_m, _inp, out):
            if name not in seen:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
                seen[name] = LayerInfo(name, type(mod).__name__, entered[name], shape,
                                       sum(p.numel() for p in mod.parameters(recurse=False)))
        return hook

    for name, mod in layers.items():
        hooks.append(mod.register_forward_pre_hook(make_pre_hook(name)))
        hooks.append(mod.register_forward_hook(make_hook(name, mod)))
    dry_run(model, input_shape, hooks)
    out = sorted(seen.values(), key=lambda l: l.order)
    for i, l in enumerate(out):
        l.order = i
    return out


def dry_run(model: nn.Module, input_shape: Sequence[int], handles: List[Any]) -> None:
    """One eval-mode forward pass on zeros (for hooks to observe), then remove ``handles``."""
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=p.device, dtype=p.dtype))
    except StopIteration:
        raise ModelError("the model has no parameters") from None
    except Exception as e:
        raise ModelError(f"cannot run the model on inputs of shape {tuple(input_shape)}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def interpolate_ratios(ratios: Sequence[float], n: int) -> List[float]:
    """Map a ratio vector onto ``n`` stages: geometric interpolation by relative depth
    (linear where a ratio is 0). ``n == len(ratios)`` returns ``ratios`` unchanged."""
    r = list(ratios)
    if n <= 0:
        return []
    if n == len(r):
        return r
    if len(r) == 1:
        return r * n
    out = []
    for i in range(n):
        pos = (i / (n - 1)) * (len(r) - 1) if n > 1 else len(r) - 1
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(r) - 1)
        t = pos - lo
        a, b = r[lo], r[hi]
        out.append(a ** (1 - t) * b ** t if a > 0 and b > 0 else a * (1 - t) + b * t)
    return out


def assign_stages(layers: List[LayerInfo], cfg: ReinitConfig) -> List[LayerInfo]:
    """Fill ``stage`` and ``ratio`` of traced layers (see the module docstring)."""
    if not layers:
        return layers
    if len(layers) == 1:
        layers[0].stage, layers[0].ratio = "head", cfg.head
    else:
        layers[0].stage, layers[0].ratio = "stem", cfg.stem
        layers[-1].stage, layers[-1].ratio = "head", cfg.head
    body = layers[1:-1]
    groups: List[List[LayerInfo]] = []
    keys: List[Any] = []
    for l in body:
        key = l.out_shape[2] * l.out_shape[3] if len(l.out_shape) == 4 else None
        if key is None:  # flattened layers (hidden linears) belong to the deepest stage so far
            if not groups:
                groups.append([])
                keys.append(None)
            groups[-1].append(l)
            continue
        if key in keys:
            groups[keys.index(key)].append(l)
        else:
            groups.append([l])
            keys.append(key)
    if body and len(groups) < 2 and len(body) >= len(cfg.stages):
        # no downsampling to go by (e.g. isotropic nets): split by depth into equal parts
        k = len(cfg.stages)
        groups = [body[i * len(body) // k:(i + 1) * len(body) // k] for i in range(k)]
    ratios = interpolate_ratios(cfg.stages, len(groups))
    for i, (g, r) in enumerate(zip(groups, ratios)):
        for l in g:
            l.stage, l.ratio = f"stage{i + 1}", r
    if cfg.profile == "depth" and body:
        fine = interpolate_ratios(cfg.stages, len(body)) if len(body) > 1 else [cfg.stages[-1]]
        for l, r in zip(body, fine):
            l.ratio = r
    for l in layers:
        l.ratio = min(cfg.max_ratio, l.ratio * cfg.scale) if cfg.uniform is None else cfg.uniform
        for pattern, r in cfg.overrides.items():
            if fnmatch.fnmatchcase(l.name, pattern):
                l.ratio = r
    return layers


def plan(model: nn.Module, input_shape: Sequence[int], cfg: Optional[ReinitConfig] = None) -> List[LayerInfo]:
    """The layers bcu would re-initialise, with their stage and ratio (no change to the model)."""
    return assign_stages(trace_layers(model, input_shape), cfg or ReinitConfig())


def _fresh_copy(module: nn.Module, seed: int) -> nn.Module:
    fresh = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        seeding.manual_seed(seed)
        if hasattr(fresh, "reset_parameters"):
            fresh.reset_parameters()
        else:  # layers without their own initialiser: the nn.Linear/Conv default
            for p in fresh.parameters(recurse=False):
                if p.dim() >= 2:
                    nn.init.kaiming_uniform_(p.data, a=math.sqrt(5))
                else:
                    bound = 1 / math.sqrt(max(1, p.numel()))
                    nn.init.uniform_(p.data, -bound, bound)
    return fresh


@torch.no_grad()
def reinitialize(model: nn.Module, input_shape: Sequence[int], cfg: Optional[ReinitConfig] = None) -> List[LayerInfo]:
    """Re-initialise ``model`` in place; returns the per-layer plan with measured dropped counts."""
    cfg = cfg or ReinitConfig()
    layers = plan(model, input_shape, cfg)
    modules = dict(model.named_modules())
    gen = seeding.generator(cfg.seed)
    for i, info in enumerate(layers):
        mod = modules[info.name]
        if info.ratio <= 0:
            continue
        fresh = _fresh_copy(mod, cfg.seed * 100_003 + i)
        fresh_params = dict(fresh.named_parameters(recurse=False))
        for pname, p in mod.named_parameters(recurse=False):
            if pname == "bias" and not cfg.include_bias:
                continue
            mask = torch.rand(p.shape, generator=gen) < info.ratio
            info.dropped += int(mask.sum())
            new = fresh_params[pname].detach().to(p.device, p.dtype)
            p.copy_(torch.where(mask.to(p.device), new, p))
    return layers
