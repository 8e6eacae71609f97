"""Where a defense's images come from: named *unlabeled sources*, shared by ``bcu bench`` and
``bcu cleanse`` (write a source to an .npz with :func:`export_npz`, then ``bcu cleanse --data
that.npz``).

Built-in sources (a bench config's ``sources`` table may add or override any):

* ``in-dist``       -- the 5,000 training images held out from the attacker's training set
                       (the paper's setting);
* ``in-dist-1000``, ``in-dist-500`` -- fewer of them;
* ``half-classes``  -- held-out images of only the first half of the classes (class-imbalanced).
  Selecting classes reads the held-out *labels*: that is the experimenter building the
  scenario, not the defense -- label-free defenses still receive the images without labels;
* ``synthetic``     -- out-of-distribution images from a different synthetic task
  (:func:`bcu.data.synthetic.make_synthetic` with other templates), no labels;
* ``kind: data``    -- any other data set or a user folder/.npz (``path``: anything
  :func:`bcu.data.load_dataset` reads), converted to the model's channels and size.

Sources without labels that match the model's classes (other data sets, synthetic) can only be
used by label-free defenses; label-using baselines are reported as skipped on them.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..config import check, from_dict
from ..errors import ConfigError, DataError
from ..output import atomic_write_bytes
from .imageset import ImageSet, take
from .load import load_dataset
from .synthetic import make_synthetic


@dataclass
class SourceConfig:
    """One unlabeled source."""

    kind: Literal["holdout", "data", "synthetic", "none"] = field(default="holdout", metadata={
        "help": "holdout: the held-out training images; data: a data set/folder/.npz; synthetic: another task; "
                "none: no images at all (defenses that can synthesize them do; the others are skipped)"})
    n: Optional[int] = field(default=None, metadata={"help": "use this many images (random, seeded; None: all)"})
    classes: Optional[List[int]] = field(default=None, metadata={
        "help": "holdout: keep only these classes (experimenter's selection with the held-out labels)"})
    half_classes: bool = field(default=False, metadata={"help": "holdout: keep only the first half of the classes"})
    imbalance: Optional[float] = field(default=None, metadata={
        "help": "holdout: a long-tailed set, class k keeping imbalance^(-k/(K-1)) of its images (the first class "
                "all of them, the last 1/imbalance; Cui et al. 2019's exponential profile)"})
    path: Optional[str] = field(default=None, metadata={"help": "data: any spec load_dataset reads"})
    split: Literal["train", "test"] = field(default="train", metadata={"help": "data: which split"})
    labels: bool = field(default=False, metadata={
        "help": "data: hand the source's labels to label-using defenses (only if they are the model's classes)"})

    def __post_init__(self) -> None:
        check(self.n is None or self.n >= 1, f"source n must be >= 1, got {self.n}")
        check(self.kind != "data" or bool(self.path), "a source of kind 'data' needs a path")
        check(self.kind == "holdout" or (self.classes is None and not self.half_classes and self.imbalance is None),
              "classes/half_classes/imbalance select from the held-out images (kind: holdout)")
        check(self.imbalance is None or self.imbalance >= 1, f"imbalance must be >= 1, got {self.imbalance}")


BUILTIN: Dict[str, Dict[str, object]] = {
    "in-dist": {"kind": "holdout", "n": 5000},
    "in-dist-1000": {"kind": "holdout", "n": 1000},
    "in-dist-500": {"kind": "holdout", "n": 500},
    "half-classes": {"kind": "holdout", "half_classes": True},
    "synthetic": {"kind": "synthetic", "n": 5000},
}


def resolve(name: str, sources: Optional[Mapping[str, Union[SourceConfig, Mapping]]] = None) -> SourceConfig:
    """The config of source ``name``: the bench config's table first, then the built-ins."""
    sources = sources or {}
    if name in sources:
        s = sources[name]
        return s if isinstance(s, SourceConfig) else from_dict(SourceConfig, dict(s), f"sources.{name}")
    if name in BUILTIN:
        return from_dict(SourceConfig, dict(BUILTIN[name]))
    raise ConfigError(f"unknown unlabeled source {name!r} (built-in: {', '.join(BUILTIN)}; or define it under sources)")


def conform(images: torch.Tensor, shape: Tuple[int, int, int]) -> torch.Tensor:
    """uint8 images converted to ``shape`` (C, H, W): grey <-> RGB and bilinear resizing."""
    c, h, w = shape
    x = images
    if x.shape[1] != c:
        xf = x.float()
        if c == 1:
            xf = xf[:, :3].mean(1, keepdim=True) if xf.shape[1] >= 3 else xf[:, :1]
        elif x.shape[1] == 1:
            xf = xf.repeat(1, c, 1, 1)
        else:
            raise DataError(f"cannot convert {x.shape[1]}-channel images to {c} channels")
        x = xf.round().clamp(0, 255).to(torch.uint8)
    if tuple(x.shape[2:]) != (h, w):
        xf = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = xf.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def build(src: SourceConfig, holdout: Optional[ImageSet], shape: Tuple[int, int, int], seed: int = 0,
          num_classes: int = 10, name: str = "unlabeled") -> Optional[ImageSet]:
    """The images of ``src`` (with labels when the source has meaningful ones), for one seed; None for
    a source of kind ``none``."""
    if src.kind == "none":
        return None
    if src.kind == "holdout":
        if holdout is None:
            raise DataError(f"source {name!r} needs the held-out training images")
        data = holdout
        if src.classes is not None or src.half_classes:
            if data.labels is None:
                raise DataError(f"source {name!r} selects classes, which needs the held-out labels")
            keep = src.classes if src.classes is not None else list(range((data.num_classes or num_classes) // 2))
            idx = torch.nonzero(torch.isin(data.labels, torch.tensor(keep))).flatten()
            if len(idx) == 0:
                raise DataError(f"source {name!r}: no held-out image of classes {keep}")
            data = data.subset(idx)
        if src.imbalance is not None:
            if data.labels is None:
                raise DataError(f"source {name!r} is class-imbalanced, which needs the held-out labels")
            k = data.num_classes or num_classes
            g = torch.Generator().manual_seed(20_000 + seed)
            keep_idx = []
            for c in range(k):
                members = torch.nonzero(data.labels == c).flatten()
                m = max(1, int(round(len(members) * src.imbalance ** (-c / max(1, k - 1)))))
                keep_idx.append(members[torch.randperm(len(members), generator=g)[:m]])
            data = data.subset(torch.cat(keep_idx).sort().values)
        if src.n is not None:
            if src.n > len(data):
                raise DataError(f"source {name!r} asks for {src.n} images; only {len(data)} are held out")
            data = take(data, src.n, seed=seed)
        return ImageSet(data.images, data.labels, data.classes, name)
    if src.kind == "synthetic":
        n = src.n or 5000
        syn = make_synthetic(n, shape, num_classes, seed=10_000 + seed, template_seed=987_654)
        return ImageSet(syn.images, None, None, name)
    data = load_dataset(src.path, split=src.split, labels=src.labels)
    if src.n is not None:
        data = take(data, src.n, seed=seed)
    return ImageSet(conform(data.images, shape), data.labels if src.labels else None, None, name)


def export_npz(data: ImageSet, path: Union[str, Path]) -> Path:
    """Write the images (never the labels) as ``x`` in an .npz that ``bcu cleanse --data`` reads."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, x=data.images.numpy())
    atomic_write_bytes(p, buf.getvalue())
    return p
