"""The image-set contract: what every stage of the pipeline reads.

All images are one ``uint8`` tensor of shape (N, C, H, W) -- or, for a set that does not fit in
memory, something that reads such tensors batch by batch (:class:`bcu.data.stream.StreamingImages`).
Both implement :class:`Images`, which is all :func:`bcu.train.fit` and the cleanse path need.
Labels, when present, are ``int64``; a label-free stage is handed ``without_labels()``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch

from .. import seeding
from ..errors import DataError

Batch = Tuple[torch.Tensor, Optional[torch.Tensor]]


def count_classes(classes: Optional[List[str]], labels: Optional[torch.Tensor]) -> Optional[int]:
    """Number of classes from the class names, else from the largest label, else None."""
    if classes:
        return len(classes)
    if labels is not None and len(labels):
        return int(labels.max()) + 1
    return None


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (float input passes through)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def pixel_stats(images: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units (the input normalisation a model is
    built with); a constant channel's std is taken as 1e-3 rather than 0."""
    pix = to_float(images)
    mean = tuple(float(v) for v in pix.mean((0, 2, 3)))
    std = tuple(float(v) for v in pix.std((0, 2, 3)).clamp_min(1e-3))
    return mean, std


@runtime_checkable
class Images(Protocol):
    """What the pipeline reads: ``len``, the (C, H, W) ``shape``, optional ``labels`` and
    ``classes``, ``images[index]`` (uint8), subsets, a label-free view, a content fingerprint, and
    batches of uint8 images for an epoch's index chunks."""

    labels: Optional[torch.Tensor]
    classes: Optional[List[str]]
    name: str

    def __len__(self) -> int: ...

    @property
    def shape(self) -> Tuple[int, int, int]: ...

    @property
    def images(self): ...

    @property
    def num_classes(self) -> Optional[int]: ...

    def subset(self, index: Union[torch.Tensor, Sequence[int]], name: Optional[str] = None) -> "Images": ...

    def without_labels(self) -> "Images": ...

    def fingerprint(self) -> str: ...

    def on(self, device: torch.device, with_labels: bool) -> "Images":
        """The set as training reads it on ``device`` (resident sets move there once; labels dropped
        unless ``with_labels``)."""

    def iter_batches(self, chunks: List[torch.Tensor], *, with_labels: bool = False,
                     device: Optional[torch.device] = None) -> Iterator[Batch]:
        """(uint8 images, labels or None) for each index chunk, in order, on ``device``."""


@dataclass
class ImageSet:
    """A set of images as one uint8 tensor (N, C, H, W), with optional int64 labels."""

    images: torch.Tensor
    labels: Optional[torch.Tensor] = None
    classes: Optional[List[str]] = None
    name: str = "images"

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{self.name}: images must be a uint8 tensor of shape (N, C, H, W)")
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
            if self.labels.shape != (self.images.shape[0],):
                raise DataError(f"{self.name}: {len(self.labels)} labels for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> Optional[int]:
        return count_classes(self.classes, self.labels)

    def subset(self, index: Union[torch.Tensor, Sequence[int]], name: Optional[str] = None) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], None if self.labels is None else self.labels[index],
                        self.classes, name or self.name)

    def without_labels(self) -> "ImageSet":
        """The same images with no labels: what the cleanse path receives."""
        return ImageSet(self.images, None, None, self.name)

    def fingerprint(self) -> str:
        """SHA-256 over shape and pixel bytes (a manifest hash for reports)."""
        h = hashlib.sha256(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        return h.hexdigest()

    def on(self, device: torch.device, with_labels: bool) -> "ImageSet":
        labels = self.labels.to(device) if (with_labels and self.labels is not None) else None
        return ImageSet(self.images.to(device), labels, None, self.name)

    def iter_batches(self, chunks: List[torch.Tensor], *, with_labels: bool = False,
                     device: Optional[torch.device] = None) -> Iterator[Batch]:
        images = self.images if device is None else self.images.to(device)
        labels = None
        if with_labels and self.labels is not None:
            labels = self.labels if device is None else self.labels.to(device)
        for idx in chunks:
            idx = idx.to(images.device)
            yield images[idx], (labels[idx] if labels is not None else None)


def split(data: ImageSet, n_holdout: int, seed: int = 0) -> Tuple[ImageSet, ImageSet]:
    """Deterministically split off ``n_holdout`` random images: returns (rest, holdout)."""
    if not 0 < n_holdout < len(data):
        raise DataError(f"cannot hold out {n_holdout} of {len(data)} images")
    g = seeding.generator(seed)
    perm = torch.randperm(len(data), generator=g)
    return data.subset(perm[n_holdout:].sort().values), data.subset(perm[:n_holdout].sort().values)


def take(data: Images, n: int, seed: int = 0) -> Images:
    """A deterministic random subset of ``n`` images (all of them if n >= len)."""
    if n >= len(data):
        return data
    g = seeding.generator(seed)
    return data.subset(torch.randperm(len(data), generator=g)[:n].sort().values)


def batches(data: ImageSet, batch_size: int, *, shuffle: bool, generator: Optional[torch.Generator] = None,
            drop_last: bool = False, device: Union[str, torch.device] = "cpu",
            with_labels: bool = True) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield (float images in [0, 1] on ``device``, labels or None) batches from resident data."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    chunks = [order[s:s + batch_size] for s in range(0, stop, batch_size)]
    for x, y in data.iter_batches(chunks, with_labels=with_labels, device=torch.device(device)):
        yield to_float(x), y
