"""Finding a network's structure by running it: the helpers every method file shares.

Nothing here goes by module names or architecture names. One forward pass on zeros
(:func:`dry_run`) with hooks tells, for any ``nn.Module``:

* its weight layers in execution order with their output shapes (:func:`trace_layers`: what bcu's
  depth-aware re-initialisation maps its ratios onto);
* which normalisation layer consumes which convolution's output (:func:`pair_conv_norm`: CLP's
  channel Lipschitz bound, fine-pruning's last convolution, ANP's neuron masks), by tensor identity;
* the output of each resolution stage (:func:`stage_outputs`: NAD's attention maps), captured on
  later passes by a :class:`FeatureTap`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data.imageset import Images
from ..errors import DataError, ModelError
from ..models import check_images
from ..models import input_shape_of as spec_input_shape

NORM_TYPES: Tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_norm(module: nn.Module) -> bool:
    """Normalisation layers, including custom ones whose class name says so (LayerNorm2d, RMSNorm)."""
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


def input_shape_of(model: nn.Module, data: Optional[Images] = None,
                   fallback: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """(C, H, W) the model takes: from its spec (checked against the data's, when given), else the
    data's, else ``fallback``."""
    shape = spec_input_shape(model)
    if shape is not None:
        if data is not None:
            check_images(model, data.shape, data.name)
        return shape
    if data is not None:
        return data.shape
    if fallback is not None:
        return tuple(int(v) for v in fallback)  # type: ignore[return-value]
    raise DataError("cannot tell the model's input shape: give images or an input_shape option")


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


# --------------------------------------------------------------------------------------------------
# weight layers


@dataclass
class TracedLayer:
    """A module that owns parameters, as one forward pass met it."""

    name: str
    kind: str
    order: int
    out_shape: Tuple[int, ...]
    numel: int


def weight_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Modules that own parameters directly and are not normalisation layers."""
    out = {}
    for name, m in model.named_modules():
        if is_norm(m):
            continue
        if any(True for _ in m.parameters(recurse=False)):
            out[name] = m
    return out


def trace_layers(model: nn.Module, input_shape: Sequence[int]) -> List[TracedLayer]:
    """Weight layers in execution order with their output shapes (one forward on zeros)."""
    layers = weight_layers(model)
    if not layers:
        raise ModelError("the model has no weight layers to re-initialise")
    seen: Dict[str, TracedLayer] = {}
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
                seen[name] = TracedLayer(name, type(mod).__name__, entered[name], shape,
                                         sum(p.numel() for p in mod.parameters(recurse=False)))
        return hook

    for name, mod in layers.items():
        hooks.append(mod.register_forward_pre_hook(make_pre_hook(name)))
        hooks.append(mod.register_forward_hook(make_hook(name, mod)))
    dry_run(model, input_shape, hooks)
    out = sorted(seen.values(), key=lambda layer: layer.order)
    for i, layer in enumerate(out):
        layer.order = i
    return out


def repeated_blocks(model: nn.Module, names: Sequence[str]) -> Dict[str, int]:
    """Layer name -> index of the repeated block that holds it (a transformer's blocks, a stage's
    residual blocks), read from the module graph: the container (``nn.Sequential`` /
    ``nn.ModuleList``) with the most children that hold weight layers of ``names``. ``{}`` when no
    container holds two."""
    best: Optional[Tuple[str, List[str]]] = None
    for cname, mod in model.named_modules():
        if not isinstance(mod, (nn.Sequential, nn.ModuleList)):
            continue
        prefix = f"{cname}." if cname else ""
        holders = [c for c, _ in mod.named_children()
                   if any(n == prefix + c or n.startswith(f"{prefix}{c}.") for n in names)]
        if len(holders) >= 2 and (best is None or len(holders) > len(best[1])):
            best = (prefix, holders)
    if best is None:
        return {}
    prefix, holders = best
    return {n: i for i, c in enumerate(holders) for n in names if n == prefix + c or n.startswith(f"{prefix}{c}.")}


# --------------------------------------------------------------------------------------------------
# convolutions and the normalisation layers that consume them


@dataclass
class ConvPair:
    """A convolution and the normalisation layer consuming its output (``norm`` None if none)."""

    conv: str
    norm: Optional[str]
    channels: int
    order: int
    out_shape: Tuple[int, ...]


def pair_conv_norm(model: nn.Module, input_shape: Sequence[int]) -> List[ConvPair]:
    """All convolutions in execution order, each with the norm layer that consumes its output: a
    normalisation layer is paired with the convolution whose output tensor *is* its input (tensor
    identity in execution order) and whose channel count matches."""
    modules = dict(model.named_modules())
    conv_out: Dict[int, Tuple[str, torch.Tensor]] = {}
    pairs: Dict[str, ConvPair] = {}
    hooks = []

    def conv_hook(name):
        def hook(mod, _inp, out):
            if isinstance(out, torch.Tensor) and name not in pairs:
                conv_out[id(out)] = (name, out)  # keep the tensor alive so its id stays unique
                pairs[name] = ConvPair(name, None, int(mod.out_channels), len(pairs), tuple(out.shape))
        return hook

    def norm_pre_hook(name):
        def hook(mod, inp):
            x = inp[0] if inp else None
            if isinstance(x, torch.Tensor) and id(x) in conv_out:
                cname, t = conv_out[id(x)]
                if t is x and pairs[cname].norm is None:
                    w = getattr(mod, "weight", None)
                    if w is None or (w.dim() == 1 and w.numel() == pairs[cname].channels):
                        pairs[cname].norm = name
        return hook

    for name, mod in modules.items():
        if isinstance(mod, CONV_TYPES):
            hooks.append(mod.register_forward_hook(conv_hook(name)))
        elif is_norm(mod):
            hooks.append(mod.register_forward_pre_hook(norm_pre_hook(name)))
    dry_run(model, input_shape, hooks)
    return sorted(pairs.values(), key=lambda c: c.order)


# --------------------------------------------------------------------------------------------------
# stage outputs and feature taps


def stage_outputs(model: nn.Module, input_shape: Sequence[int]) -> List[Tuple[str, int, Tuple[int, ...]]]:
    """(module name, call index, output shape) of the last 4-d output at each resolution, shallow first."""
    events: List[Tuple[str, int, Tuple[int, ...]]] = []
    calls: Dict[str, int] = {}
    hooks = []

    def make(name):
        def hook(_m, _inp, out):
            i = calls.get(name, 0)
            calls[name] = i + 1
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                events.append((name, i, tuple(out.shape)))
        return hook

    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(make(name)))
    dry_run(model, input_shape, hooks)
    stages: Dict[Tuple[int, int], Tuple[str, int, Tuple[int, ...]]] = {}
    order: List[Tuple[int, int]] = []
    for name, i, shape in events:
        key = (shape[2], shape[3])
        if key not in stages:
            order.append(key)
        stages[key] = (name, i, shape)  # the last output at this resolution wins
    return [stages[k] for k in order]


class FeatureTap:
    """Captures (a clone of) chosen modules' outputs on every forward pass."""

    def __init__(self, model: nn.Module, points: List[Tuple[str, int, Tuple[int, ...]]]) -> None:
        modules = dict(model.named_modules())
        self.points = points
        self.feats: Dict[int, torch.Tensor] = {}
        self.calls: Dict[str, int] = {}
        self.handles = []
        names = sorted({n for n, _, _ in points})
        for n in names:
            self.handles.append(modules[n].register_forward_hook(self._hook(n)))
        self.handles.append(model.register_forward_pre_hook(lambda *_: self.calls.clear()))

    def _hook(self, name):
        def hook(_m, _inp, out):
            i = self.calls.get(name, 0)
            self.calls[name] = i + 1
            for j, (n, ci, _) in enumerate(self.points):
                if n == name and ci == i:
                    self.feats[j] = out.clone()  # clone: later in-place ops must not touch it
        return hook

    def take(self) -> List[torch.Tensor]:
        out = [self.feats[j] for j in range(len(self.points))]
        self.feats = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
