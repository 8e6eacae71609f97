"""Architectures of timm and torchvision, named ``timm:NAME`` and ``torchvision:NAME``.

Both are *sources* of the model registry (:data:`bcu.models.registry.SOURCES`): a spec whose
``arch`` is ``timm:vit_tiny_patch16_224`` with ``kwargs`` ``{img_size: 32, patch_size: 4}`` is built
by ``timm.create_model(name, pretrained=False, num_classes=..., in_chans=C, **kwargs)``, so the
sidecar rebuilds the same network for every command. The library is imported when a model is
built, never when bcu is imported (``pip install 'bcu[timm]'`` / ``'bcu[torchvision]'``).

Nothing is ever fetched: ``pretrained=False`` / ``weights=None`` always, and options that would
load or download something (``pretrained``, ``checkpoint_path``, ``weights``, ``cache_dir``, ...)
are refused, as are names with a source prefix of their own (``hf-hub:``, ``local-dir:``): the
user's file is the model.

Hub-style folders (``config.json`` + ``model.safetensors``, as ``timm.models.save_for_hf``
writes them) are read by :func:`spec_from_hub_config`, which validates every field of the
untrusted ``config.json``, and written by :func:`hub_config_bytes`, with timm's own exporter.
"""
from __future__ import annotations

import json
import math
import re
import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import nn

from .. import untrusted
from ..errors import ConfigError, ModelError, show
from .registry import SOURCES, register_source, split_arch

# option names that would make a library load or fetch weights, or change what it builds into
# something that is not a classifier
_FORBIDDEN = re.compile(r"pretrain|checkpoint|cache|file|url|weight|path|hub|download|features_only|"
                        r"scriptable|exportable|no_jit|progress", re.IGNORECASE)

HUB_CONFIG = "config.json"
# ImageNet's statistics: what torchvision's classification weights were trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_options(source: str, name: str, options: Mapping[str, Any]) -> None:
    for key in options:
        if _FORBIDDEN.search(key):
            raise ConfigError(f"{source}:{name}: option {show(key)} is refused: bcu never loads or downloads "
                              f"weights through the library (the model file is the model)")


def _fit_channels(values: Tuple[float, ...], channels: int) -> Tuple[float, ...]:
    """Per-channel statistics for ``channels`` inputs: as they are, or their mean for one channel (timm's rule)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return values * channels
    raise ConfigError(f"the library's normalisation has {len(values)} channels, the model takes {channels}")


# --------------------------------------------------------------------------------------------------
# timm


class TimmSource:
    """``timm:NAME``: any model of ``timm.list_models()``, built without pretrained weights."""

    prefix = "timm"

    @staticmethod
    def _timm():
        try:
            import timm
        except ImportError:
            raise ConfigError("timm:* architectures need timm: pip install 'bcu[timm]'") from None
        return timm

    def _check_name(self, name: str) -> None:
        timm = self._timm()
        if not timm.is_model(name.split(".")[0]):
            raise ConfigError(f"timm has no model {name!r} (see timm.list_models())")

    def factory(self, name: str) -> Callable[..., nn.Module]:
        self._check_name(name)

        def build(num_classes: int, input_shape: Tuple[int, int, int], **options: Any) -> nn.Module:
            _check_options("timm", name, options)
            channels = int(input_shape[0])
            if "in_chans" in options and options["in_chans"] != channels:
                raise ConfigError(f"timm:{name}: in_chans={options['in_chans']} but the input shape has "
                                  f"{channels} channels")
            options = {k: v for k, v in options.items() if k != "in_chans"}
            return self._timm().create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels,
                                             **options)

        return build

    def normalization(self, name: str, channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        self._check_name(name)
        cfg = self._timm().get_pretrained_cfg(name)
        if cfg is None or not cfg.mean or not cfg.std:
            raise ConfigError(f"timm records no normalisation for {name!r}; give --mean and --std")
        return _fit_channels(cfg.mean, channels), _fit_channels(cfg.std, channels)


# --------------------------------------------------------------------------------------------------
# torchvision


class TorchvisionSource:
    """``torchvision:NAME``: a classification model of ``torchvision.models``, built with ``weights=None``."""

    prefix = "torchvision"

    @staticmethod
    def _models():
        try:
            import torchvision.models as models
        except ImportError:
            raise ConfigError("torchvision:* architectures need torchvision: pip install 'bcu[torchvision]'") from None
        return models

    def _check_name(self, name: str) -> None:
        models = self._models()
        if name not in models.list_models(module=models):
            raise ConfigError(f"torchvision has no classification model {name!r} (see "
                              f"torchvision.models.list_models(module=torchvision.models))")

    def factory(self, name: str) -> Callable[..., nn.Module]:
        self._check_name(name)

        def build(num_classes: int, input_shape: Tuple[int, int, int], **options: Any) -> nn.Module:
            _check_options("torchvision", name, options)
            if int(input_shape[0]) != 3:
                raise ConfigError(f"torchvision:{name} takes 3-channel images, not {input_shape[0]} "
                                  f"(use a timm model with in_chans for other channel counts)")
            return self._models().get_model(name, weights=None, num_classes=num_classes, **options)

        return build

    def normalization(self, name: str, channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        self._check_name(name)
        return _fit_channels(IMAGENET_MEAN, channels), _fit_channels(IMAGENET_STD, channels)


register_source("timm", help="any timm model: timm:NAME (pip install 'bcu[timm]')")(TimmSource())
register_source("torchvision", help="a torchvision classifier: torchvision:NAME (pip install 'bcu[torchvision]')")(
    TorchvisionSource())


def library_normalization(arch: str, channels: int, library: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``--norm timm`` / ``--norm torchvision``: the mean/std the library's pretrained config of ``arch`` records."""
    prefix, name = split_arch(arch)
    if prefix != library:
        raise ConfigError(f"--norm {library} needs a {library}:NAME architecture, not {arch!r}")
    return SOURCES.get(prefix).normalization(name, channels)


# --------------------------------------------------------------------------------------------------
# Hub-style folders: config.json (untrusted) <-> a spec


def _number_list(v: Any, where: str, length: Optional[Tuple[int, ...]] = None) -> Tuple[float, ...]:
    if not isinstance(v, list) or not v or len(v) > untrusted.MAX_CHANNELS or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        raise ModelError(f"{where}: expected a list of 1 to {untrusted.MAX_CHANNELS} finite numbers, got {show(v)}")
    if length is not None and len(v) not in length:
        raise ModelError(f"{where}: expected {' or '.join(map(str, length))} values, got {len(v)}")
    return tuple(float(x) for x in v)


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ModelError(f"{where}: expected an integer in [{lo}, {hi}], got {show(v)}")
    return v


def spec_from_hub_config(data: Any, where: str) -> Dict[str, Any]:
    """The sidecar fields (arch, num_classes, input_shape, mean, std, kwargs, classes) of a timm
    ``config.json``; every field is checked and each failure is one ModelError line.

    ``architecture`` names the timm model; ``num_classes`` the classes; ``model_args`` the
    constructor options (``in_chans``, ``img_size``, ``patch_size``, ...); ``pretrained_cfg``'s
    ``input_size``, ``mean`` and ``std`` the input. Missing input facts are left out, so that
    flags can supply them (load_model then says what is still missing)."""
    if not isinstance(data, dict):
        raise ModelError(f"{where} must be a JSON object")
    arch = data.get("architecture")
    if not isinstance(arch, str) or not re.match(r"^[a-z0-9][a-z0-9_]{0,99}(\.[a-z0-9_]{1,100})?$", arch):
        raise ModelError(f"{where}: 'architecture' must name a timm model (lower-case letters, digits, '_'), "
                         f"got {show(arch)}")
    out: Dict[str, Any] = {"arch": f"timm:{arch}",
                           "num_classes": _int(data.get("num_classes"), f"{where}: num_classes", 2,
                                               untrusted.MAX_CLASSES)}
    args = data.get("model_args", {})
    if not isinstance(args, dict) or len(args) > 32:
        raise ModelError(f"{where}: 'model_args' must be a table of at most 32 options, got {show(args)}")
    if "num_classes" in args and args["num_classes"] != out["num_classes"]:
        raise ModelError(f"{where}: model_args.num_classes {show(args['num_classes'])} disagrees with num_classes "
                         f"{out['num_classes']}")
    kwargs = {k: v for k, v in args.items() if k != "num_classes"}
    cfg = data.get("pretrained_cfg", {})
    if not isinstance(cfg, dict):
        raise ModelError(f"{where}: 'pretrained_cfg' must be a table, got {show(cfg)}")
    if cfg.get("input_size") is not None:
        size = cfg["input_size"]
        if not isinstance(size, list) or len(size) != 3:
            raise ModelError(f"{where}: pretrained_cfg.input_size must be [C, H, W], got {show(size)}")
        out["input_shape"] = (_int(size[0], f"{where}: pretrained_cfg.input_size C", 1, untrusted.MAX_CHANNELS),
                              _int(size[1], f"{where}: pretrained_cfg.input_size H", 1, untrusted.MAX_SIDE),
                              _int(size[2], f"{where}: pretrained_cfg.input_size W", 1, untrusted.MAX_SIDE))
    if "in_chans" in kwargs:
        chans = _int(kwargs["in_chans"], f"{where}: model_args.in_chans", 1, untrusted.MAX_CHANNELS)
        if "input_shape" in out and out["input_shape"][0] != chans:
            raise ModelError(f"{where}: model_args.in_chans {chans} disagrees with pretrained_cfg.input_size "
                             f"{list(out['input_shape'])}")
    for key in ("mean", "std"):
        if cfg.get(key) is not None:
            out[key] = _number_list(cfg[key], f"{where}: pretrained_cfg.{key}")
    names = data.get("label_names")
    if names is not None:
        if not isinstance(names, list) or len(names) != out["num_classes"] or not all(
                isinstance(n, str) and len(n) <= 256 for n in names):
            raise ModelError(f"{where}: label_names must be {out['num_classes']} short texts")
        out["classes"] = list(names)
    out["kwargs"] = kwargs
    return out


def hub_config_bytes(net: nn.Module, arch: str, input_shape: Tuple[int, int, int], mean: Tuple[float, ...],
                     std: Tuple[float, ...], classes: Optional[list] = None) -> bytes:
    """``config.json`` for ``net`` (a timm model) as ``timm.models.save_config_for_hf`` writes it, with
    the spec's input size and normalisation as its preprocessing, so that
    ``timm.create_model('local-dir:DIR', pretrained=True)`` rebuilds and loads the folder."""
    prefix, _ = split_arch(arch)
    if prefix != "timm":
        raise ConfigError(f"--out-format hub writes timm's layout: it needs a timm:NAME architecture, not {arch!r}")
    from timm.models._hub import save_config_for_hf  # timm 1.0.x: the exporter save_for_hf uses
    data_config = {"input_size": tuple(int(v) for v in input_shape), "mean": tuple(mean), "std": tuple(std),
                   "crop_pct": 1.0, "interpolation": "bilinear"}
    model_config = {"label_names": list(classes)} if classes else None
    with tempfile.TemporaryDirectory(prefix="bcu-hub-") as tmp:
        path = Path(tmp) / HUB_CONFIG
        save_config_for_hf(net, str(path), model_config=model_config, data_config=data_config)
        raw = path.read_bytes()
    json.loads(raw)  # timm's own output: a JSON object
    return raw


# --------------------------------------------------------------------------------------------------
# candidates for recognising a bare state dict (bcu.models.infer)

#: torchvision classifiers that architecture inference tries, where torchvision is installed
TORCHVISION_NAMES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "wide_resnet50_2",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "densenet121", "efficientnet_b0",
    "shufflenet_v2_x1_0", "squeezenet1_0", "convnext_tiny", "regnet_y_400mf", "alexnet",
)

#: torchvision names whose network is a BackdoorBench family's (same keys, forward and init):
#: inference reports those once, by the BackdoorBench name (which needs no torchvision)
SAME_AS: Dict[str, str] = {f"torchvision:{n}": f"backdoorbench:{n}" for n in (
    "resnet18", "vgg11", "vgg16", "vgg19", "vgg16_bn", "vgg19_bn", "mobilenet_v2")}


def inference_candidates() -> List[str]:
    """The library architectures :mod:`bcu.models.infer` tries besides bcu's registry: torchvision's
    :data:`TORCHVISION_NAMES` where torchvision is installed (timm's thousands are not searched)."""
    if importlib.util.find_spec("torchvision") is None:
        return []
    return [f"torchvision:{n}" for n in TORCHVISION_NAMES]
