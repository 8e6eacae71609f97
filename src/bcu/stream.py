"""Images that do not fit in memory: read batch by batch by DataLoader workers.

:class:`StreamingImages` stands where an :class:`~bcu.data.ImageSet` stands for :func:`bcu.train.fit`
and :class:`bcu.defenses.bcu.Cleanser`: it has ``len``, ``shape``, ``name``, ``subset``, optional
``labels`` and a lazy ``images[index]``. The images themselves stay on disk -- a list of image files
(a folder) or a memory-mapped array (a ``.npy`` file or an *uncompressed* ``.npz``) -- and are read
by worker processes one whole batch at a time, as ``uint8`` (B, C, H, W) tensors. The training loop
then applies exactly the same batch-level tensor augmentation as on resident data, with the same
per-epoch generator, so a streamed run sees the same pixels in the same order as a resident one.

Memory: the main process holds the model, the file list (~100 bytes a file) and at most
``workers * prefetch`` batches in flight; nothing grows with the number of images.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .data import IMAGE_EXTENSIONS, ImageSet, _to_nchw_uint8, count_classes, read_image
from .errors import DataError


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

    Build one with :func:`load_stream`, :meth:`from_files` or :meth:`from_array`.
    """

    streaming = True

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
    def from_files(cls, files: Sequence[Union[str, Path]], **kw) -> "StreamingImages":
        return cls(files=files, **kw)

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
            arrs = []
            for r in rows.tolist():
                a = read_image(self._path(r), self.channels, self.size)
                if arrs and a.shape != arrs[0].shape:
                    raise DataError(f"{self._path(r)} is {a.shape[2]}x{a.shape[1]}x{a.shape[0]} but other images are "
                                    f"{arrs[0].shape[2]}x{arrs[0].shape[1]}x{arrs[0].shape[0]}: all images must have "
                                    f"the same size (resize them first)")
                arrs.append(a)
            x = torch.from_numpy(np.stack(arrs))
        else:
            r = rows.numpy()
            x = _to_nchw_uint8(np.asarray(self.array[r]), self.name)
        return x

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        """Images ``idx`` (positions in this set) as a uint8 (B, C, H, W) tensor, in that order."""
        x = self._read_raw(self.index[torch.as_tensor(idx, dtype=torch.long)])
        if tuple(x.shape[1:]) != self._shape:
            raise DataError(f"{self.name}: an image is {tuple(x.shape[1:])} (C, H, W), the first is {self._shape}: "
                            f"all images must have the same size (resize them first)")
        return x

    def iter_batches(self, chunks: List[torch.Tensor], *, with_labels: bool = False,
                     pin_memory: bool = False) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Yield (uint8 images, labels or None) for each index chunk, in order, read ahead by workers."""
        if not chunks:
            return
        reader = _BatchReader(self, chunks, with_labels)
        workers = min(self.workers, len(chunks))
        loader = torch.utils.data.DataLoader(
            reader, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
            prefetch_factor=self.prefetch if workers > 0 else None, persistent_workers=False)
        for x, y in loader:
            if x is None:
                raise DataError(y)
            yield x, (y if (with_labels and self.labels is not None) else None)

    def fingerprint(self, batch_size: int = 1024) -> str:
        """The same SHA-256 as ``ImageSet.fingerprint`` of the same images, computed chunk by chunk."""
        h = hashlib.sha256(str((len(self),) + self.shape).encode())
        chunks = list(torch.arange(len(self)).split(batch_size))
        for x, _ in self.iter_batches(chunks):
            h.update(x.contiguous().numpy().tobytes())
        return h.hexdigest()


def is_streaming(data) -> bool:
    return bool(getattr(data, "streaming", False))


# --------------------------------------------------------------------------------------------------
# memory-mapping arrays inside .npz files


def npz_memmap(path: Union[str, Path], key: str) -> Optional[np.memmap]:
    """A read-only memory map of member ``key``.npy of an uncompressed .npz (None if compressed).

    The member's declared shape is checked against its size first (:class:`bcu.data.NpzArchive`).
    """
    import zipfile

    from .data import NpzArchive

    p = Path(path)
    with NpzArchive(p) as z:
        shape, fortran, dtype, info = z.header(key)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        fh = z.fh
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            raise DataError(f"{p}: damaged zip header for {key}")
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        fh.seek(start)
        version = np.lib.format.read_magic(fh)
        from .data import _npy_header

        _npy_header(fh, version)
        offset = fh.tell()
    if offset + int(np.prod(shape, dtype=object)) * dtype.itemsize > z.size:
        raise DataError(f"{p}: {key} declares more bytes than the file holds")
    return np.memmap(p, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def _npz_stream(p: Path, split: str, labels: bool, **kw) -> Optional[StreamingImages]:
    from .data import NpzArchive

    try:
        with NpzArchive(p) as z:
            keys = set(z.files)
            for xk, yk in ((f"x_{split}", f"y_{split}"), ("x", "y"), ("images", "labels")):
                if xk in keys:
                    break
            else:
                raise DataError(f"{p}: no 'x', 'images' or 'x_{split}' array (found {sorted(keys)[:20]})")
            y = None
            if labels:
                if yk not in keys:
                    raise DataError(f"{p}: no labels ('y', 'labels' or 'y_{split}')")
                yy = z.read(yk)
                if yy.ndim != 1 or not np.issubdtype(yy.dtype, np.integer):
                    raise DataError(f"{p}: labels must be a list of integers")
                y = torch.from_numpy(yy.astype(np.int64))
        arr = npz_memmap(p, xk)
    except DataError:
        raise
    except Exception as e:  # any parse failure of a damaged member is "unreadable", never a traceback
        raise DataError(f"{p} is not a readable .npz file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    if arr is None:
        return None  # compressed: cannot be mapped, load it instead
    return StreamingImages.from_array(arr, labels=y, name=f"{p.name}:{split}", **kw)


def scan_image_folder(folder: Path) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Like :func:`bcu.data.list_image_files` (same files, same order) but as compact arrays:
    names relative to ``folder`` (bytes), labels (int32, -1 for loose files), class names."""
    exts = set(IMAGE_EXTENSIONS)

    def images_in(d: str) -> List[bytes]:
        with os.scandir(d) as it:
            return sorted(os.fsencode(e.name) for e in it
                          if os.path.splitext(e.name)[1].lower() in exts and e.is_file())

    root = str(folder)
    with os.scandir(root) as it:
        subdirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    names: List[np.ndarray] = []
    labs: List[np.ndarray] = []
    for i, sd in enumerate(subdirs):
        got = images_in(os.path.join(root, sd))
        prefix = os.fsencode(sd) + b"/"
        names.append(np.array([prefix + g for g in got], dtype=bytes) if got else np.zeros(0, dtype="S1"))
        labs.append(np.full(len(got), i, dtype=np.int32))
    loose = images_in(root)
    names.append(np.array(loose, dtype=bytes) if loose else np.zeros(0, dtype="S1"))
    labs.append(np.full(len(loose), -1, dtype=np.int32))
    width = max(a.dtype.itemsize for a in names)
    return np.concatenate([a.astype(f"S{width}") for a in names]), np.concatenate(labs), subdirs


def load_stream(spec: Union[str, Path], split: str = "train", labels: bool = True, channels: Optional[int] = None,
                size: Optional[Tuple[int, int]] = None, workers: Optional[int] = None
                ) -> Union[StreamingImages, ImageSet]:
    """Like :func:`bcu.data.load_dataset` but leaves the images on disk where the format allows it.

    Folders of image files and ``.npy``/uncompressed ``.npz`` files stream; the other formats
    (idx, CIFAR, compressed .npz, synthetic) are single arrays that are loaded as usual.
    """
    from .data import load_dataset

    s = str(spec)
    p = Path(s)
    kw = {"workers": workers}
    if p.is_file() and p.suffix.lower() == ".npy":
        from .untrusted import require_regular

        require_regular(p, "data files", DataError)
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # numpy's header parser raises SyntaxError, TokenError, ...: all "unreadable"
            raise DataError(f"{p} is not a readable .npy file: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
        if labels:
            raise DataError(f"{p}: a .npy file holds no labels")
        return StreamingImages.from_array(arr, name=p.name, **kw)
    if p.is_file() and p.suffix.lower() == ".npz":
        got = _npz_stream(p, split, labels, **kw)
        return got if got is not None else load_dataset(p, split, labels)
    if p.is_dir():
        folder = p / split if (p / split).is_dir() else p
        is_folder = any((f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS) or f.is_dir() for f in folder.iterdir())
        special = any((p / f).exists() for f in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz",
                                                  "t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz",
                                                  "data_batch_1", "test_batch"))
        if is_folder and not special:
            names, labs, classes = scan_image_folder(folder)
            if not len(names):
                raise DataError(f"{folder} contains no image files")
            y = None
            if labels:
                if (labs < 0).any():
                    raise DataError(f"{folder}: labels need one sub-folder per class; found loose image files")
                y = torch.from_numpy(labs.astype(np.int64))
            return StreamingImages(files=names, root=folder, labels=y, classes=(classes or None) if labels else None,
                                   name=folder.name, channels=channels, size=size, **kw)
    return load_dataset(spec, split, labels, channels=channels, size=size)
