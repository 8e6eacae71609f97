"""The one way in: :func:`load_dataset` reads any supported data spec, into memory or streamed.

A spec is a name (``fashion-mnist``, ``synthetic[:N[:CxHxW]]``) or a path; the path's format is
found once (:func:`bcu.data.formats.sniff`) and the same reader serves both the resident set
(:class:`~bcu.data.imageset.ImageSet`) and, with ``stream=True``, the streaming one
(:class:`~bcu.data.stream.StreamingImages`) where the format can stay on disk (image folders,
``.npy``, uncompressed ``.npz``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from ..errors import DataError
from . import formats
from .imageset import Images
from .stream import StreamingImages
from .synthetic import synthetic_from_spec

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_NAMES = ("fashion-mnist", "fmnist", "fashion_mnist")
FASHION_MNIST_CLASSES: List[str] = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def is_fashion_mnist(spec: Union[str, Path]) -> bool:
    return str(spec).lower() in FASHION_MNIST_NAMES


def fashion_mnist_dir() -> Path:
    env = os.environ.get("BCU_FASHION_MNIST")
    for cand in ([env] if env else []) + list(FASHION_MNIST_DIRS):
        p = Path(cand)
        if formats.find_file(p, [formats.IDX_IMAGES["train"][0]]) is not None:
            return p
    raise DataError("Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
                    "(apt-get install dataset-fashion-mnist) or set BCU_FASHION_MNIST to its folder")


def load_dataset(spec: Union[str, Path], split: str = "train", labels: bool = True,
                 channels: Optional[int] = None, size: Optional[Tuple[int, int]] = None,
                 progress: bool = False, stream: bool = False, workers: Optional[int] = None) -> Images:
    """Load images from a name (``fashion-mnist``, ``synthetic``) or a path in any supported format.

    ``labels=False`` never opens a label file: that is how the cleanse path loads its data.
    ``stream=True`` leaves image folders, .npy and uncompressed .npz files on disk and returns a
    :class:`~bcu.data.stream.StreamingImages` (read batch by batch while training, by ``workers``
    reader processes); the other formats are single arrays and load as usual.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', not {split!r}")
    s = str(spec)
    if is_fashion_mnist(s):
        return formats.read_idx_dir(fashion_mnist_dir(), split, labels, FASHION_MNIST_CLASSES, "fashion-mnist")
    if s.lower().startswith("synthetic"):
        return synthetic_from_spec(s, split, labels)
    p = Path(s)
    if not p.exists():
        raise DataError(f"data {s!r} does not exist (give a folder, a .npz file, or 'fashion-mnist')")
    fmt, where = formats.sniff(p, split)
    if fmt == "idx":
        return formats.read_idx_dir(where, split, labels, None, where.name)
    if fmt == "cifar":
        return formats.read_cifar_dir(where, split, labels)
    if fmt == "npy":
        if labels:
            raise DataError(f"{where}: a .npy file holds no labels")
        arr = formats.map_npy(where)
        images = StreamingImages.from_array(arr, name=where.name, workers=workers)
        if stream:
            return images
        formats.check_resident(int(np.prod(arr.shape, dtype=object)) * arr.dtype.itemsize, str(where))
        return images.load()
    if fmt == "npz":
        mapped = formats.map_npz(where, split, labels) if stream else None
        if mapped is None:  # resident, or compressed: cannot be mapped
            return formats.read_npz(where, split, labels)
        arr, y = mapped
        return StreamingImages.from_array(arr, labels=y, name=f"{where.name}:{split}", workers=workers)
    if not stream:
        return formats.read_image_folder(where, labels, channels, size, progress)
    names, labs, classes = formats.scan_image_folder(where)
    if not len(names):
        raise formats.no_images(where)
    y = formats.folder_labels(where, labs) if labels else None
    return StreamingImages(files=names, root=where, labels=y, classes=(classes or None) if labels else None,
                           name=where.name, channels=channels, size=size, workers=workers)
