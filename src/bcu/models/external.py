"""torchvision's classifiers as ``torchvision:<name>``, registered only where torchvision is installed.

bcu does not depend on torchvision. When it is installed, a short list of its classification
constructors is registered (without importing torchvision until one is built), so that
``--arch torchvision:resnet50`` works and :mod:`bcu.models.infer` can recognise their bare state
dicts. Names that build the same network as a BackdoorBench family are recorded in
:data:`SAME_AS`, so inference reports those once (the BackdoorBench name, which needs no
torchvision). timm is not searched.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from .registry import MODELS

#: torchvision classification constructors registered when torchvision is installed
TORCHVISION_NAMES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "wide_resnet50_2",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "densenet121", "efficientnet_b0",
    "shufflenet_v2_x1_0", "squeezenet1_0", "convnext_tiny", "regnet_y_400mf", "alexnet",
)

#: torchvision names whose network is a BackdoorBench family's (same keys, forward and init)
SAME_AS: Dict[str, str] = {f"torchvision:{n}": f"backdoorbench:{n}" for n in (
    "resnet18", "vgg11", "vgg16", "vgg19", "vgg16_bn", "vgg19_bn", "mobilenet_v2")}


def _factory(models: Any, name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, input_shape: Tuple[int, int, int] = (3, 224, 224)) -> nn.Module:
        if int(input_shape[0]) != 3:
            raise ValueError(f"torchvision's {name} takes 3 input channels, not {input_shape[0]}")
        return models.get_model(name, weights=None, num_classes=num_classes)

    build.__doc__ = f"torchvision.models.{name} (torchvision is installed; no pretrained weights)"
    return build


def register_torchvision(models: Optional[Any] = None) -> int:
    """Register :data:`TORCHVISION_NAMES` that ``models`` (default: ``torchvision.models``, imported
    only when a model is built) has; returns how many were registered. Does nothing when
    torchvision is not installed."""
    if models is None:
        if importlib.util.find_spec("torchvision") is None:
            return 0
        models = _LazyModule("torchvision.models")
    n = 0
    for name in TORCHVISION_NAMES:
        key = f"torchvision:{name}"
        if key not in MODELS:
            MODELS.register(key)(_factory(models, name))
            n += 1
    return n


class _LazyModule:
    """``torchvision.models``, imported at the first attribute access (bcu's import stays fast)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


register_torchvision()
