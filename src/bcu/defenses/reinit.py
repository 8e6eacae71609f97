"""Depth-aware partial re-initialisation, for any ``nn.Module``.

The weight-bearing layers are found by tracing one forward pass (execution order and output
shapes), never by names. The first is the *stem*, the last the *head*; the layers between are
grouped into *stages* by the spatial resolution of their output (a new stage starts where the
network downsamples; flattened layers join the last stage). The paper's ratios
(stem 0.01; stages 0.01, 0.03, 0.09, 0.27; head 0.10 for ResNet-18's stem/layer1-4/fc) are mapped
onto however many stages a network has by geometric interpolation, which reproduces them exactly
for four stages. Each parameter element is then replaced, with probability equal to its layer's
ratio, by the value from a fresh default initialisation of that layer (``fresh: layer``) or from
a freshly constructed model of the same architecture (``fresh: family``: the constructor's own
init, as the authors' code draws it). Normalisation layers and their running statistics are never
touched, and kept weights are not rescaled.

``rule: names`` instead reproduces the authors' code (``defense/ft/distillation_dropout_increase.py``
of luluppang/BCU): every parameter whose state-dict key ends in ``.weight``/``.bias`` and contains
none of the ``skip`` substrings gets the ratio of the first ``prefixes`` entry its key starts with,
else ``stem`` -- so a head not named ``fc`` (BackdoorBench's PreActResNet18 ``linear``) gets the
stem's 0.01, and BatchNorm parameters whose keys hold no ``bn`` (torchvision ``downsample.1``,
VGG/MobileNet ``features.N``) are mixed like weights. See docs/method.md ("authors").
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
from ..models import Classifier, build
from .. import seeding
from .tracing import TracedLayer, repeated_blocks, trace_layers


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
    rule: Literal["depth", "names"] = field(default="depth", metadata={
        "help": "depth: ratios by traced depth (bcu, paper); names: by state-dict key prefix, as the authors' "
                "code does (prefixes, skip; unmatched keys get the stem ratio)"})
    prefixes: Dict[str, float] = field(default_factory=dict, metadata={
        "help": "rule=names: key prefix -> ratio, first match wins (authors: layer1..4 0.01/0.03/0.09/0.27, fc 0.10)"})
    skip: Tuple[str, ...] = field(default=(), metadata={
        "help": "rule=names: keys containing any of these are never mixed (authors: bn, shortcut.1)"})
    fresh: Literal["layer", "family"] = field(default="layer", metadata={
        "help": "where replaced values come from: layer: each layer's PyTorch default init; family: a fresh model "
                "from the architecture's constructor (its own init, e.g. kaiming fan-out; the authors' code)"})
    seed: int = field(default=0, metadata={"help": "seed of the masks and the fresh initialisation"})

    def __post_init__(self) -> None:
        for name, v in [("stem", self.stem), ("head", self.head), ("max_ratio", self.max_ratio),
                        *((f"stages[{i}]", s) for i, s in enumerate(self.stages)),
                        *((f"overrides[{k}]", v) for k, v in self.overrides.items())]:
            check(0.0 <= v <= 1.0, f"reinit ratio {name} must be in [0, 1], got {v}")
        for k, v in self.prefixes.items():
            check(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, f"reinit ratio prefixes[{k}] must be in [0, 1], got {v}")
        check(len(self.stages) >= 1, "reinit.stages needs at least one ratio")
        check(self.uniform is None or 0.0 <= self.uniform <= 1.0, f"reinit.uniform must be in [0, 1], got {self.uniform}")
        check(self.scale >= 0, f"reinit.scale must be >= 0, got {self.scale}")


@dataclass
class LayerInfo(TracedLayer):
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


def assign_stages(layers: List[LayerInfo], cfg: ReinitConfig, blocks: Optional[Dict[str, int]] = None) -> List[LayerInfo]:
    """Fill ``stage`` and ``ratio`` of traced layers (see the module docstring). ``blocks`` (layer name ->
    repeated-block index, :func:`~bcu.defenses.tracing.repeated_blocks`) splits a network that never
    downsamples (a ViT) into stages of whole blocks."""
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
        # no downsampling to go by (isotropic nets, ViTs): split by depth into equal parts, of whole
        # repeated blocks where the module graph has them (a layer outside the blocks -- a patch
        # embedding before them, a pre-logits layer after them -- joins the block that ran before it)
        k = len(cfg.stages)
        if blocks and any(l.name in blocks for l in body):
            index, current = [], 0
            for l in body:
                current = blocks.get(l.name, current)
                index.append(current)
            n_blocks = max(index) + 1
            parts = min(k, n_blocks)
            groups = [[l for l, b in zip(body, index) if b * parts // n_blocks == g] for g in range(parts)]
        else:
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
    traced = trace_layers(model, input_shape)
    blocks = repeated_blocks(model, [t.name for t in traced])
    return assign_stages([LayerInfo(**vars(t)) for t in traced], cfg or ReinitConfig(), blocks)


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


def fresh_network(model: nn.Module, seed: int) -> nn.Module:
    """A new model of ``model``'s architecture from its constructor (``fresh: family``): a bcu
    :class:`~bcu.models.Classifier` is rebuilt from its spec, under ``seed``."""
    if not isinstance(model, Classifier):
        raise ModelError("reinit.fresh=family needs a bcu model (it builds a fresh one from the architecture's "
                         "constructor); use fresh=layer for other modules")
    with torch.random.fork_rng(devices=[]):
        seeding.manual_seed(seed)
        return build(model.spec)


@torch.no_grad()
def reinitialize(model: nn.Module, input_shape: Sequence[int], cfg: Optional[ReinitConfig] = None) -> List[LayerInfo]:
    """Re-initialise ``model`` in place; returns the per-layer plan with measured dropped counts."""
    cfg = cfg or ReinitConfig()
    fresh_model = fresh_network(model, cfg.seed * 100_003 + 17) if cfg.fresh == "family" else None
    if cfg.rule == "names":
        return reinitialize_by_names(model, cfg, fresh_model)
    layers = plan(model, input_shape, cfg)
    modules = dict(model.named_modules())
    fresh_modules = dict(fresh_model.named_modules()) if fresh_model is not None else {}
    gen = seeding.generator(cfg.seed)
    for i, info in enumerate(layers):
        mod = modules[info.name]
        if info.ratio <= 0:
            continue
        fresh = fresh_modules[info.name] if fresh_model is not None else _fresh_copy(mod, cfg.seed * 100_003 + i)
        fresh_params = dict(fresh.named_parameters(recurse=False))
        for pname, p in mod.named_parameters(recurse=False):
            if pname == "bias" and not cfg.include_bias:
                continue
            mask = torch.rand(p.shape, generator=gen) < info.ratio
            info.dropped += int(mask.sum())
            new = fresh_params[pname].detach().to(p.device, p.dtype)
            p.copy_(torch.where(mask.to(p.device), new, p))
    return layers


def name_ratio(key: str, cfg: ReinitConfig) -> Tuple[Optional[str], float]:
    """(matched prefix or None, ratio) of a state-dict key under ``rule: names``; ratio -1 = never mixed."""
    if not key.endswith((".weight", ".bias")) or any(s in key for s in cfg.skip):
        return None, -1.0
    if key.endswith(".bias") and not cfg.include_bias:
        return None, -1.0
    hit = next(((prefix, float(r)) for prefix, r in cfg.prefixes.items() if key.startswith(prefix)), (None, cfg.stem))
    return hit[0], min(cfg.max_ratio, hit[1] * cfg.scale)


@torch.no_grad()
def reinitialize_by_names(model: nn.Module, cfg: ReinitConfig, fresh_model: Optional[nn.Module] = None) -> List[LayerInfo]:
    """``rule: names`` (the authors' code): each parameter entry of a matched key is replaced with
    probability equal to its ratio by the same entry of a fresh model. Keys are those of the bare
    network (a bcu Classifier's ``net``), as in the checkpoint the authors load."""
    net = getattr(model, "net", model)
    if fresh_model is None:
        fresh_model = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            seeding.manual_seed(cfg.seed * 100_003 + 17)
            for m in fresh_model.modules():
                if m is not fresh_model and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    fresh = dict(getattr(fresh_model, "net", fresh_model).named_parameters())
    gen = seeding.generator(cfg.seed)
    out: List[LayerInfo] = []
    for i, (key, p) in enumerate(net.named_parameters()):
        prefix, ratio = name_ratio(key, cfg)
        if ratio < 0:
            continue
        info = LayerInfo(key, "parameter", i, tuple(p.shape), p.numel(), prefix or "default", ratio)
        if ratio > 0:
            mask = torch.rand(p.shape, generator=gen) < ratio
            info.dropped = int(mask.sum())
            p.copy_(torch.where(mask.to(p.device), fresh[key].detach().to(p.device, p.dtype), p))
        out.append(info)
    return out
