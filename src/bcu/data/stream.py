"""Images that do not fit in memory: read batch by batch by DataLoader workers.

:class:`StreamingImages` implements the :class:`~bcu.data.imageset.Images` contract that
:func:`bcu.train.fit` and :class:`bcu.defenses.bcu.Cleanser` read: ``len``, ``shape``, ``name``,
``subset``, optional ``labels`` and a lazy ``images[index]``. The images themselves stay on disk -- a
list of image files (a folder) or a memory-mapped array (a ``.npy`` file or an *uncompressed*
``.npz``) -- and are read by worker processes one whole batch at a time, as ``uint8`` (B, C, H, W)
tensors. The training loop then applies exactly the same batch-level tensor augmentation as on
resident data, with the same per-epoch generator, so a streamed run sees the same pixels in the same
order as a resident one. ``load_dataset(..., stream=True)`` builds one where the format allows.

Memory: the main process holds the model, the file list (~100 bytes a file) and at most
``workers * prefetch`` batches in flight; nothing grows with the number of images.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import DataError
from .formats import read_image, same_size, to_nchw_uint8
from .imageset import ImageSet, count_classes


def default_workers() -> int:
    """Reader processes: BCU_STREAM_WORKERS, else min(4, cores)."""
    env = os.environ.get("BCU_STREAM_WORKERS")
    if env:
        try:
            return min(64, max(0, int(env)))
        except ValueError:
            raise DataError(f"BCU_STREAM_WORKERS must be a number of processes, got {env[:20]!r}") from None
    return min(4, os.cpu_count() or 1)


class _BatchReader(torch.utils.data.Dataset):
    """A map-style dataset whose item ``i`` is the whole ``i``-th batch of an epoch (read in a worker)."""

    def __init__(self, source: "StreamingImages", chunks: List[torch.Tensor], with_labels: bool) -> None:
        self.source = source
        self.chunks = chunks
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int):
        idx = self.chunks[i]
        try:
            x = self.source.read(idx)
        except DataError as e:  # handed to the main process as a value: one clean line, not a worker traceback
            return None, str(e)
        if self.with_labels and self.source.labels is not None:
            return x, self.source.labels[idx]
        return x, torch.empty(0, dtype=torch.int64)


class LazyImages:
    """``stream.images[index]`` reads just those images (a uint8 tensor); nothing is kept."""

    def __init__(self, source: "StreamingImages") -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (len(self.source),) + self.source.shape

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = torch.arange(len(self.source))[index]
        elif isinstance(index, int):
            return self.source.read(torch.tensor([index]))[0]
        return self.source.read(torch.as_tensor(index, dtype=torch.long))


class StreamingImages:
    """A data set read from disk batch by batch; see the module docstring.

    Build one with ``load_dataset(..., stream=True)``, the constructor (image files) or
    :meth:`from_array`.
    """

    def __init__(self, files: Optional[Sequence[Union[str, Path]]] = None, array: Optional[np.ndarray] = None, *,
                 labels: Optional[torch.Tensor] = None, classes: Optional[List[str]] = None,
                 name: str = "images", channels: Optional[int] = None, size: Optional[Tuple[int, int]] = None,
                 workers: Optional[int] = None, prefetch: int = 2, index: Optional[torch.Tensor] = None,
                 root: Optional[Union[str, Path]] = None) -> None:
        if (files is None) == (array is None):
            raise DataError("StreamingImages needs either image files or an array")
        # file names as one fixed-width bytes array (relative to ``root``): no Python object per image,
        # so the list costs ~its characters and is not copied page by page into forked workers
        self.root = os.fsencode(str(root)) if root is not None else b""
        self.files = (files if isinstance(files, np.ndarray) else np.array([os.fsencode(str(f)) for f in files])
                      ) if files is not None else None
        if array is not None and (not hasattr(array, "shape") or len(array.shape) not in (3, 4)):
            raise DataError(f"{name}: expected images of shape (N, H, W), (N, C, H, W) or (N, H, W, C), got "
                            f"{tuple(getattr(array, 'shape', ()))}")
        self.array = array
        total = len(self.files) if self.files is not None else int(array.shape[0])
        self.index = torch.arange(total) if index is None else torch.as_tensor(index, dtype=torch.long)
        if len(self.index) == 0:
            raise DataError(f"{name}: no images")
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        if self.labels is not None and self.labels.shape != (len(self.index),):
            raise DataError(f"{name}: {len(self.labels)} labels for {len(self.index)} images")
        self.classes = classes
        self.name = name
        self.size = size
        self.workers = default_workers() if workers is None else int(workers)
        self.prefetch = int(prefetch)
        self.channels = channels
        if self.files is not None and channels is None:
            self.channels = read_image(self._path(int(self.index[0]))).shape[0]
        first = self._read_raw(self.index[:1])
        self._shape = tuple(int(v) for v in first.shape[1:])

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_array(cls, array: np.ndarray, **kw) -> "StreamingImages":
        """Over an (N, H, W), (N, C, H, W) or (N, H, W, C) array, typically a ``np.memmap``."""
        return cls(array=array, **kw)

    def _like(self, index: torch.Tensor, labels: Optional[torch.Tensor], name: str) -> "StreamingImages":
        new = object.__new__(StreamingImages)
        new.__dict__.update(self.__dict__)
        new.index, new.labels, new.name = index, labels, name
        return new

    # ---- the ImageSet-like surface ------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def images(self) -> LazyImages:
        return LazyImages(self)

    @property
    def num_classes(self) -> Optional[int]:
        return count_classes(self.classes, self.labels)

    def subset(self, index: Union[torch.Tensor, Sequence[int]], name: Optional[str] = None) -> "StreamingImages":
        index = torch.as_tensor(index, dtype=torch.long)
        return self._like(self.index[index], None if self.labels is None else self.labels[index], name or self.name)

    def without_labels(self) -> "StreamingImages":
        new = self._like(self.index, None, self.name)
        new.classes = None
        return new

    def load(self) -> ImageSet:
        """Everything in memory (for data that does fit after all)."""
        return ImageSet(self.read(torch.arange(len(self))), self.labels, self.classes, self.name)

    # ---- reading -------------------------------------------------------------------------------

    def _path(self, row: int) -> Path:
        return Path(os.fsdecode(os.path.join(self.root, self.files[row]) if self.root else self.files[row]))

    def _read_raw(self, rows: torch.Tensor) -> torch.Tensor:
        """Images at absolute rows of the underlying files/array, in the order given."""
        if self.files is not None:
            arrs: List[np.ndarray] = []
            for r in rows.tolist():
                a = read_image(self._path(r), self.channels, self.size)
                if arrs:
                    same_size(a, arrs[0], self._path(r))
                arrs.append(a)
            x = torch.from_numpy(np.stack(arrs))
        else:
            r = rows.numpy()
            x = to_nchw_uint8(np.asarray(self.array[r]), self.name)
        return x

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        """Images ``idx`` (positions in this set) as a uint8 (B, C, H, W) tensor, in that order."""
        x = self._read_raw(self.index[torch.as_tensor(idx, dtype=torch.long)])
        if tuple(x.shape[1:]) != self._shape:
            raise DataError(f"{self.name}: an image is {tuple(x.shape[1:])} (C, H, W), the first is {self._shape}: "
                            f"all images must have the same size (resize them first)")
        return x

    def on(self, device: torch.device, with_labels: bool) -> "StreamingImages":
        """Itself: the images stay on disk and each batch is moved to the device as it is read."""
        return self

    def iter_batches(self, chunks: List[torch.Tensor], *, with_labels: bool = False,
                     device: Optional[torch.device] = None) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Yield (uint8 images, labels or None) for each index chunk, in order, read ahead by workers
        (and moved to ``device``)."""
        if not chunks:
            return
        reader = _BatchReader(self, chunks, with_labels)
        workers = min(self.workers, len(chunks))
        cuda = device is not None and torch.device(device).type == "cuda"
        loader = torch.utils.data.DataLoader(
            reader, batch_size=None, shuffle=False, num_workers=workers, pin_memory=cuda,
            prefetch_factor=self.prefetch if workers > 0 else None, persistent_workers=False)
        for x, y in loader:
            if x is None:
                raise DataError(y)
            y = y if (with_labels and self.labels is not None) else None
            if device is not None:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True) if y is not None else None
            yield x, y

    def fingerprint(self, batch_size: int = 1024) -> str:
        """The same SHA-256 as ``ImageSet.fingerprint`` of the same images, computed chunk by chunk."""
        h = hashlib.sha256(str((len(self),) + self.shape).encode())
        chunks = list(torch.arange(len(self)).split(batch_size))
        for x, _ in self.iter_batches(chunks):
            h.update(x.contiguous().numpy().tobytes())
        return h.hexdigest()
