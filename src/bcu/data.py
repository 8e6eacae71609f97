"""Images in, batches out: loaders for every on-disk format bcu accepts, and batched augmentation.

All data lives as one ``uint8`` tensor of shape (N, C, H, W); labels, when present, as ``int64``.
Loaders never unpickle arbitrary objects (CIFAR's python pickles go through an allow-list) and
never write to their input. Augmentation (random crop with zero padding, horizontal flip, mixup)
works on whole batches as tensor ops on any device, so the training loop runs no per-sample Python.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError
from . import seeding

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def count_classes(classes: Optional[List[str]], labels: Optional[torch.Tensor]) -> Optional[int]:
    """Number of classes from the class names, else from the largest label, else None."""
    if classes:
        return len(classes)
    if labels is not None and len(labels):
        return int(labels.max()) + 1
    return None


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


# --------------------------------------------------------------------------------------------------
# splitting


def split(data: ImageSet, n_holdout: int, seed: int = 0) -> Tuple[ImageSet, ImageSet]:
    """Deterministically split off ``n_holdout`` random images: returns (rest, holdout)."""
    if not 0 < n_holdout < len(data):
        raise DataError(f"cannot hold out {n_holdout} of {len(data)} images")
    g = seeding.generator(seed)
    perm = torch.randperm(len(data), generator=g)
    return data.subset(perm[n_holdout:].sort().values), data.subset(perm[:n_holdout].sort().values)


def take(data: ImageSet, n: int, seed: int = 0) -> ImageSet:
    """A deterministic random subset of ``n`` images (all of them if n >= len)."""
    if n >= len(data):
        return data
    g = seeding.generator(seed)
    return data.subset(torch.randperm(len(data), generator=g)[:n].sort().values)


# --------------------------------------------------------------------------------------------------
# on-disk formats


def _one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line (its first non-empty line, else its type)."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return line[:limit] or type(e).__name__


def _read_exact(stream, n: int, path: Path) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise DataError(f"{path} has a truncated IDX header")
    return data


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Parse an IDX file (MNIST/Fashion-MNIST format, optionally gzipped) into a uint8 array.

    The header's dimensions are multiplied as Python integers (no overflow) and checked against
    what the file can hold -- its size, or for gzip at most 1032 bytes per compressed byte (deflate's
    limit) and :data:`bcu.untrusted.MAX_DECOMPRESSED_BYTES` -- before the body is read.
    """
    from .untrusted import MAX_DECOMPRESSED_BYTES, human, open_regular

    path = Path(path)
    with open_regular(path, "data files", DataError) as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            gz = fh.read(2) == b"\x1f\x8b"
            fh.seek(0)
            stream = gzip.GzipFile(fileobj=fh, mode="rb") if gz else fh
            capacity = min(MAX_DECOMPRESSED_BYTES, 1032 * size + 1024) if gz else size
            head = stream.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise DataError(f"{path} is not an unsigned-byte IDX file")
            ndim = head[3]
            if ndim < 1:
                raise DataError(f"{path} has a truncated IDX header")
            dims = struct.unpack(">" + "I" * ndim, _read_exact(stream, 4 * ndim, path))
            count = math.prod(dims)  # a Python int: cannot overflow
            if count > capacity - 4 - 4 * ndim:
                raise DataError(f"{path} is truncated or corrupt: header promises {count} bytes "
                                f"({'x'.join(map(str, dims))}), more than the file can hold ({human(capacity)})")
            body = stream.read(count)
            extra = stream.read(1)
        except DataError:
            raise
        except (OSError, EOFError, zlib.error, ValueError, struct.error) as e:  # BadGzipFile is an OSError
            raise DataError(f"cannot read {path}: {e}") from None
    if len(body) != count or extra:
        raise DataError(f"{path} is truncated or corrupt: header promises {count} bytes, found "
                        f"{len(body) if len(body) != count else 'more'}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def _find(directory: Path, stems: Sequence[str]) -> Optional[Path]:
    for stem in stems:
        for cand in (directory / stem, directory / (stem + ".gz")):
            if cand.is_file():
                return cand
    return None


def load_idx_dir(directory: Union[str, Path], split: str = "train", labels: bool = True,
                 classes: Optional[List[str]] = None, name: str = "idx") -> ImageSet:
    d = Path(directory)
    prefix = "train" if split == "train" else "t10k"
    img = _find(d, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
    if img is None:
        raise DataError(f"no {prefix}-images-idx3-ubyte[.gz] in {d}")
    x = read_idx(img)
    if x.ndim != 3:
        raise DataError(f"{img} holds {x.ndim}-d data, expected (N, H, W) images")
    y = None
    if labels:
        lab = _find(d, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
        if lab is None:
            raise DataError(f"no {prefix}-labels-idx1-ubyte[.gz] in {d}")
        y = read_idx(lab)
        if y.shape != (x.shape[0],):
            raise DataError(f"{lab} has {y.shape[0]} labels for {x.shape[0]} images")
        y = torch.from_numpy(y.astype(np.int64))
    return ImageSet(torch.from_numpy(x).unsqueeze(1).contiguous(), y, classes, f"{name}:{split}")


def _array_bytes(shape, dtype) -> int:
    """Bytes an array of ``shape`` and ``dtype`` (as a pickle names them) would take."""
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in shape):
        raise pickle.UnpicklingError("an array with a malformed shape")
    return math.prod(shape) * np.dtype(dtype).itemsize


class _NumpyOnlyUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Unpickles dicts/lists of numpy arrays and nothing else (CIFAR's python batches).

    The pure-Python unpickler (its memo is a dict: a crafted ``LONG_BINPUT 2**31`` cannot make it
    allocate gigabytes), with only numpy's array-reconstruction globals allowed, no ``OBJ``/``INST``/
    ``NEWOBJ``, and every array it is asked to create checked against the size of the file first: an
    array bcu accepts has its bytes in the file.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def __init__(self, file, limit: int, **kw) -> None:
        super().__init__(file, **kw)
        self.limit = limit
        self.dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
        for op in (pickle.OBJ, pickle.INST, pickle.NEWOBJ, pickle.NEWOBJ_EX):
            self.dispatch[op[0]] = type(self)._refuse_opcode
        self.dispatch[pickle.REDUCE[0]] = type(self)._load_reduce

    def _refuse_opcode(self) -> None:
        raise pickle.UnpicklingError("refusing to build objects (OBJ/INST/NEWOBJ)")

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError("REDUCE without an argument tuple")
        name = getattr(func, "__name__", "")
        if func is np.ndarray or name == "_reconstruct":  # both allocate an array of the given shape
            shape, dtype = (args[0], args[1] if len(args) > 1 else float) if func is np.ndarray else (
                (args[1], args[2]) if len(args) >= 3 else (None, None))
            try:
                n = _array_bytes(shape, dtype)
            except (TypeError, ValueError) as e:
                raise pickle.UnpicklingError(f"an array of an invalid type ({e})") from None
            if n > self.limit:
                raise pickle.UnpicklingError(f"an array of {n} bytes in a file of {self.limit}")
        self.stack[-1] = func(*args)

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def safe_unpickle_arrays(path: Path) -> dict:
    from .untrusted import MAX_PICKLE_BYTES, read_bounded

    raw = read_bounded(path, MAX_PICKLE_BYTES, "CIFAR batches", DataError)
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), len(raw), encoding="latin1").load()
    except RecursionError:
        raise DataError(f"{path} is not a CIFAR python batch: nested too deeply") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OSError, struct.error, MemoryError, OverflowError, UnicodeError) as e:
        raise DataError(f"{path} is not a CIFAR python batch: {_one_line(e)}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python batch (no dict inside)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_labels(value, n: int, where: str) -> np.ndarray:
    """CIFAR labels: a flat list (or 1-D integer array) of ``n`` integers, checked before numpy sees it."""
    if isinstance(value, np.ndarray):
        ok = value.ndim == 1 and np.issubdtype(value.dtype, np.integer) and len(value) == n
    else:
        ok = isinstance(value, list) and len(value) == n and all(
            type(v) is int or isinstance(v, np.integer) for v in value)
    if not ok:
        raise DataError(f"{where}: labels must be a list of {n} integers")
    y = np.asarray(value, dtype=np.int64)
    if len(y) and (y.min() < 0 or y.max() >= 100_000):
        raise DataError(f"{where}: labels must be class numbers in [0, 100000)")
    return y


def _cifar_names(value, where: str) -> List[str]:
    if not isinstance(value, (list, tuple)) or len(value) > 100_000 or not all(
            isinstance(n, (bytes, str)) and len(n) <= 256 for n in value):
        raise DataError(f"{where}: label names must be a list of short texts")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in value]


def load_cifar_dir(directory: Union[str, Path], split: str = "train", labels: bool = True) -> ImageSet:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) python-pickle folder."""
    d = Path(directory)
    if (d / "data_batch_1").is_file() or (d / "test_batch").is_file():
        files = sorted(d.glob("data_batch_*")) if split == "train" else [d / "test_batch"]
        label_key, meta_file, names_key = "labels", d / "batches.meta", "label_names"
    else:
        files = [d / ("train" if split == "train" else "test")]
        label_key, meta_file, names_key = "fine_labels", d / "meta", "fine_label_names"
    xs, ys = [], []
    for f in files:
        if not f.is_file():
            raise DataError(f"missing CIFAR batch {f}")
        batch = safe_unpickle_arrays(f)
        data = batch.get("data")  # an array whose bytes were in the file; never a list numpy would expand
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{f}: 'data' must be a uint8 array of shape (N, 3072)")
        xs.append(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
        if labels:
            if label_key not in batch:
                raise DataError(f"{f}: no '{label_key}' entry")
            ys.append(_cifar_labels(batch[label_key], len(data), str(f)))
    classes = None
    if meta_file.is_file():
        meta = safe_unpickle_arrays(meta_file)
        names = meta.get(names_key)
        if names is not None:
            classes = _cifar_names(names, str(meta_file))
    _check_resident(sum(x.nbytes for x in xs), str(d))
    x = torch.from_numpy(np.concatenate(xs)).contiguous()
    y = torch.from_numpy(np.concatenate(ys)) if labels else None
    return ImageSet(x, y, classes, f"cifar:{split}")




def _to_nchw_uint8(x: np.ndarray, where: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{where}: expected images of shape (N, H, W), (N, C, H, W) or (N, H, W, C), got {x.shape}")
    if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{where}: images contain NaN or Inf")
        if x.min() < 0 or x.max() > 1:
            raise DataError(f"{where}: float images must be in [0, 1]")
        x = np.round(x * 255).astype(np.uint8)
    elif x.dtype == np.uint16:
        x = (x >> 8).astype(np.uint8)
    else:
        raise DataError(f"{where}: unsupported image dtype {x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x))


def _check_resident(nbytes: int, where: str) -> None:
    from .untrusted import MAX_RESIDENT_BYTES, human

    if nbytes > MAX_RESIDENT_BYTES:
        raise DataError(f"{where}: the images take {human(nbytes)}, more than the {human(MAX_RESIDENT_BYTES)} bcu "
                        f"loads into memory (use --stream for folders, .npy and uncompressed .npz)")


def _npy_header(f, version):
    """(shape, fortran_order, dtype) of a .npy stream positioned after its magic (any format version)."""
    try:
        from numpy.lib._format_impl import _read_array_header  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.lib.format import _read_array_header  # type: ignore[attr-defined,no-redef]
    return _read_array_header(f, version)


class NpzArchive:
    """An ``.npz`` read member by member with every declared size checked before it is allocated:
    a member's ``.npy`` header (shape x dtype) must fit in the member, and the member in the file
    (stored) or in :data:`bcu.untrusted.MAX_DECOMPRESSED_BYTES` and deflate's 1032:1 (compressed).
    Object arrays are refused (they would need unpickling). Only a regular file is opened."""

    def __init__(self, path: Union[str, Path]) -> None:
        import zipfile

        from .untrusted import open_regular

        self.path = Path(path)
        self.fh = open_regular(self.path, "data files", DataError)
        self.size = os.fstat(self.fh.fileno()).st_size
        try:
            self.zip = zipfile.ZipFile(self.fh)
        except BaseException:
            self.fh.close()
            raise
        names = self.zip.namelist()
        self.members = {n[:-4] if n.endswith(".npy") else n: n for n in names}
        self.files = list(self.members)

    def __enter__(self) -> "NpzArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.zip.close()
        self.fh.close()

    def header(self, key: str):
        """(shape, fortran_order, dtype, info) of member ``key`` after the size checks."""
        import zipfile

        from .untrusted import MAX_DECOMPRESSED_BYTES, human

        info = self.zip.getinfo(self.members[key])
        stored = info.compress_type == zipfile.ZIP_STORED
        capacity = self.size if stored else min(MAX_DECOMPRESSED_BYTES, 1032 * info.compress_size + 4096)
        if info.file_size > capacity:
            raise DataError(f"{self.path}: member {key} declares {human(info.file_size)}, more than the file can hold")
        with self.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = _npy_header(f, version)
            offset = f.tell()
        if dtype.hasobject:
            raise DataError(f"{self.path} is not a readable .npz file: Object arrays cannot be loaded when "
                            f"allow_pickle=False")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > info.file_size - offset:
            raise DataError(f"{self.path}: {key} declares shape {tuple(shape)} ({human(nbytes)}), more than the "
                            f"file holds")
        return shape, fortran, dtype, info

    def read(self, key: str) -> np.ndarray:
        self.header(key)
        with self.zip.open(self.members[key]) as f:
            return np.lib.format.read_array(f, allow_pickle=False)


def load_npz(path: Union[str, Path], split: str = "train", labels: bool = True) -> ImageSet:
    """A .npz with ``x``/``images`` (and ``y``/``labels``), or ``x_train``/``x_test`` pairs."""
    p = Path(path)
    try:
        with NpzArchive(p) as z:
            keys = set(z.files)
            for xk, yk in ((f"x_{split}", f"y_{split}"), ("x", "y"), ("images", "labels")):
                if xk in keys:
                    shape, _, dtype, _ = z.header(xk)
                    _check_resident(math.prod(shape) * dtype.itemsize, str(p))
                    x = z.read(xk)
                    y = z.read(yk) if (labels and yk in keys) else None
                    break
            else:
                raise DataError(f"{p}: no 'x', 'images' or 'x_{split}' array (found {sorted(keys)[:20]})")
    except DataError:
        raise
    except Exception as e:  # numpy's header parser can raise SyntaxError, tokenize.TokenError, ...: all "unreadable"
        raise DataError(f"{p} is not a readable .npz file: {_one_line(e)}") from None
    if labels and y is None:
        raise DataError(f"{p}: no labels ('y', 'labels' or 'y_{split}')")
    if not isinstance(x, np.ndarray) or (y is not None and not isinstance(y, np.ndarray)):
        raise DataError(f"{p}: a member is not a .npy array")
    imgs = _to_nchw_uint8(x, str(p))
    yt = None
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != imgs.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{p}: labels must be {imgs.shape[0]} integers")
        yt = torch.from_numpy(y.astype(np.int64))
    return ImageSet(imgs, yt, None, f"{p.name}:{split}")


def list_image_files(directory: Path) -> Tuple[List[Path], List[int], List[str]]:
    """Image files in a flat folder or one level of class sub-folders (sorted, deterministic)."""
    subdirs = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: List[Path] = []
    labels: List[int] = []
    if subdirs:
        classes = [p.name for p in subdirs]
        for i, sd in enumerate(subdirs):
            for f in sorted(sd.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(f)
                    labels.append(i)
    else:
        classes = []
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(f)
            labels.append(-1)
    return files, labels, classes


def read_image(path: Path, channels: Optional[int] = None,
               size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """One image file as a uint8 (C, H, W) array; 16-bit is scaled, alpha is dropped.

    Only regular files are opened; an image whose header declares more than
    :data:`bcu.untrusted.MAX_IMAGE_PIXELS` pixels is refused before it is decoded.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    from .untrusted import MAX_IMAGE_PIXELS, open_regular

    def too_big(w: int, h: int) -> DataError:
        return DataError(f"cannot read image {path}: it is {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS} "
                         f"bcu decodes (docs/security.md)")

    try:
        with open_regular(path, "images", DataError) as fh, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise too_big(w, h)
                im.load()
                mode = im.mode
                if mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im, dtype=np.int64)
                    arr = np.clip(arr >> 8 if arr.max() > 255 else arr, 0, 255).astype(np.uint8)
                    im = Image.fromarray(arr, mode="L")
                want = channels or (1 if im.mode in ("L", "1", "P") and im.mode != "P" else 3)
                im = im.convert("L" if want == 1 else "RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # PIL's own, larger limit
        import re

        m = re.search(r"\((\d+) pixels\)", str(e))
        raise DataError(f"cannot read image {path}: {m.group(1) if m else 'too many'} pixels, more than the "
                        f"{MAX_IMAGE_PIXELS} bcu decodes (docs/security.md)") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: cannot identify image file {str(path)!r}") from None
    except Exception as e:  # a decoder failing on untrusted bytes, whatever it raises: "cannot read"
        raise DataError(f"cannot read image {path}: {_one_line(e)}") from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def load_image_folder(directory: Union[str, Path], labels: bool = True, channels: Optional[int] = None,
                      size: Optional[Tuple[int, int]] = None, progress: bool = False) -> ImageSet:
    """A folder of images, flat (unlabeled) or with one sub-folder per class."""
    d = Path(directory)
    files, labs, classes = list_image_files(d)
    if not files:
        raise DataError(f"{d} contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if channels is None:
        channels = read_image(files[0]).shape[0]
    from .progress import progress_bar

    from .errors import clean

    arrays = []
    for f in progress_bar(files, desc=f"reading {clean(d.name, 60)}", disable=not progress, unit="img"):
        a = read_image(f, channels, size)
        if arrays and a.shape != arrays[0].shape:
            raise DataError(f"{f} is {a.shape[2]}x{a.shape[1]}x{a.shape[0]} but {files[0].name} is "
                            f"{arrays[0].shape[2]}x{arrays[0].shape[1]}x{arrays[0].shape[0]}: all images in a folder "
                            f"must have the same size (resize them first)")
        if not arrays:
            _check_resident(len(files) * a.nbytes, str(d))
        arrays.append(a)
    x = torch.from_numpy(np.stack(arrays))
    y = None
    if labels:
        if any(l < 0 for l in labs):
            raise DataError(f"{d}: labels need one sub-folder per class; found loose image files")
        y = torch.tensor(labs, dtype=torch.int64)
    return ImageSet(x, y, classes or None, d.name)


def fashion_mnist_dir() -> Path:
    env = os.environ.get("BCU_FASHION_MNIST")
    for cand in ([env] if env else []) + list(FASHION_MNIST_DIRS):
        p = Path(cand)
        if _find(p, ["train-images-idx3-ubyte"]) is not None:
            return p
    raise DataError("Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
                    "(apt-get install dataset-fashion-mnist) or set BCU_FASHION_MNIST to its folder")


def load_dataset(spec: Union[str, Path], split: str = "train", labels: bool = True,
                 channels: Optional[int] = None, size: Optional[Tuple[int, int]] = None,
                 progress: bool = False, stream: bool = False) -> ImageSet:
    """Load images from a name (``fashion-mnist``, ``synthetic``) or a path in any supported format.

    ``labels=False`` never opens a label file: that is how the cleanse path loads its data.
    ``stream=True`` leaves image folders, .npy and uncompressed .npz files on disk and returns a
    :class:`bcu.stream.StreamingImages` (read batch by batch while training; see bcu.stream).
    """
    if stream:
        from .stream import load_stream

        return load_stream(spec, split, labels, channels=channels, size=size)  # type: ignore[return-value]
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', not {split!r}")
    s = str(spec)
    if s.lower() in ("fashion-mnist", "fmnist", "fashion_mnist"):
        return load_idx_dir(fashion_mnist_dir(), split, labels, FASHION_MNIST_CLASSES, "fashion-mnist")
    if s.lower().startswith("synthetic"):
        return synthetic_from_spec(s, split, labels)
    p = Path(s)
    if not p.exists():
        raise DataError(f"data {s!r} does not exist (give a folder, a .npz file, or 'fashion-mnist')")
    if not p.is_dir():
        from .untrusted import require_regular

        require_regular(p, "data files", DataError)  # a FIFO or a device is neither a folder nor a file
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return load_npz(p, split, labels)
        raise DataError(f"{p}: unsupported data file (use a folder or a .npz)")
    if _find(p, ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"]) is not None:
        return load_idx_dir(p, split, labels, None, p.name)
    if any((p / f).is_file() for f in ("data_batch_1", "test_batch", "train", "test")) and not any(
            (p / f).is_dir() for f in ("train", "test")):
        return load_cifar_dir(p, split, labels)
    if (p / split).is_dir():  # folder/train/<class>/..., folder/test/<class>/...
        return load_image_folder(p / split, labels, channels, size, progress)
    return load_image_folder(p, labels, channels, size, progress)


# --------------------------------------------------------------------------------------------------
# a synthetic task for tests and examples (no download, learnable in seconds)


def make_synthetic(n: int, shape: Tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                   seed: int = 0, template_seed: int = 1234) -> ImageSet:
    """Class-conditional smooth templates plus noise: a small CNN learns it in a few epochs.

    ``template_seed`` fixes the task (same templates for train and test); ``seed`` the samples.
    """
    c, h, w = shape
    tg = seeding.generator(template_seed)
    coarse = torch.rand(num_classes, c, max(2, h // 7), max(2, w // 7), generator=tg)
    templates = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    g = seeding.generator(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    shift = torch.rand(n, 1, 1, 1, generator=g) * 0.3 - 0.15
    noise = torch.randn(n, c, h, w, generator=g) * 0.12
    x = (templates[y] * 0.8 + shift + noise).clamp(0, 1)
    return ImageSet((x * 255).round().to(torch.uint8), y, [str(i) for i in range(num_classes)], "synthetic")


def synthetic_from_spec(spec: str, split: str, labels: bool) -> ImageSet:
    """``synthetic`` or ``synthetic:N`` or ``synthetic:N:CxHxW``."""
    parts = spec.split(":")
    try:
        n = int(parts[1]) if len(parts) > 1 and parts[1] else 6000
        shape = tuple(int(v) for v in parts[2].lower().split("x")) if len(parts) > 2 else (1, 28, 28)
        if len(shape) != 3 or n <= 0:
            raise ValueError
    except ValueError:
        raise DataError(f"bad synthetic spec {spec!r}: use synthetic[:N[:CxHxW]]") from None
    from .errors import ConfigError
    from .untrusted import check_image_shape

    try:
        check_image_shape(shape, f"synthetic spec {spec!r}: the image shape")
    except ConfigError as e:
        raise DataError(str(e)) from None
    if n * math.prod(shape) > 1 << 30:
        raise DataError(f"bad synthetic spec {spec!r}: at most 2^30 pixel values in all")
    ds = make_synthetic(n if split == "train" else max(n // 5, 100), shape, 10, seed=0 if split == "train" else 1)
    return ds if labels else ds.without_labels()


# --------------------------------------------------------------------------------------------------
# batches and augmentation (pure tensor ops)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (float input passes through)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def random_crop(x: torch.Tensor, pad: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop of the original size from a zero-padded batch (one offset per image)."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def random_hflip(x: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def sample_beta(n: int, alpha: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` draws from Beta(alpha, alpha), reproducible through ``generator``."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        seeding.manual_seed(seed)
        a = torch._standard_gamma(torch.full((n,), float(alpha)))
        b = torch._standard_gamma(torch.full((n,), float(alpha)))
    return a / (a + b).clamp_min(1e-12)


def mixup(x: torch.Tensor, alpha: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mix every image with a random partner, weight ~ Beta(alpha, alpha) per image (no labels)."""
    if alpha <= 0:
        return x
    n = x.shape[0]
    lam = sample_beta(n, alpha, generator).to(x.device, x.dtype)[:, None, None, None]
    perm = torch.randperm(n, generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm]


def noise_blend(x: torch.Tensor, max_weight: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x + a (u - x)``: each image blended with its own uniform-noise image, ``a ~ U(0, max_weight)``."""
    if max_weight <= 0:
        return x
    n = x.shape[0]
    a = torch.rand(n, generator=generator).to(x.device, x.dtype).mul_(max_weight).view(n, 1, 1, 1)
    u = torch.rand(x.shape, generator=generator).to(x.device, x.dtype)
    return x + a * (u - x)


def identity_grid(h: int, w: int) -> torch.Tensor:
    """(1, H, W, 2) sampling grid in grid_sample's (x, y) order, align_corners=True convention."""
    ys = torch.linspace(-1, 1, h)
    xs = torch.linspace(-1, 1, w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx, yy), dim=2)[None]


def smooth_field(n: int, k: int, h: int, w: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(n, H, W, 2) smooth random displacement fields, WaNet's construction (Nguyen & Tran 2021):
    a ``k x k`` grid of control offsets uniform in [-1, 1], each field normalised to mean magnitude 1,
    upsampled bicubically to H x W."""
    ctrl = torch.rand(n, 2, k, k, generator=generator) * 2 - 1
    ctrl = ctrl / ctrl.abs().mean((1, 2, 3), keepdim=True)
    return F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def random_warp(x: torch.Tensor, max_strength: float, grid: int = 4,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each image resampled through its own smooth random warp (:func:`smooth_field` with a
    ``grid x grid`` control grid) scaled by ``s / size`` with ``s ~ U(0, max_strength)`` per image
    (the displacement convention of WaNet's trigger: s = 1 moves pixels by about half a pixel on
    average). ``max_strength`` 0 returns ``x`` unchanged."""
    if max_strength <= 0:
        return x
    n, _, h, w = x.shape
    flow = smooth_field(n, max(2, min(grid, h, w)), h, w, generator)
    s = torch.rand(n, 1, 1, 1, generator=generator) * max_strength
    coords = (identity_grid(h, w) + flow * s * torch.tensor([1.0 / w, 1.0 / h])).clamp(-1, 1)
    return F.grid_sample(x, coords.to(x.device, x.dtype), align_corners=True).clamp(0, 1)


@dataclass
class AugmentConfig:
    """Batch augmentation used while training or distilling (paper: crop pad 4 + flip)."""

    crop_pad: int = field(default=4, metadata={"help": "random-crop zero padding in pixels (0 = off)"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flip"})

    def __post_init__(self) -> None:
        from .errors import ConfigError
        from .untrusted import MAX_SIDE

        if not 0 <= self.crop_pad <= MAX_SIDE:
            raise ConfigError(f"crop_pad must be in [0, {MAX_SIDE}], got {self.crop_pad}")

    def check_images(self, shape: Sequence[int]) -> None:
        """Padding beyond the image size only allocates: it is refused for the images at hand."""
        from .errors import ConfigError

        h, w = int(shape[-2]), int(shape[-1])
        if self.crop_pad > max(h, w):
            raise ConfigError(f"augment.crop_pad {self.crop_pad} is larger than the {h}x{w} images")


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    x = random_crop(x, cfg.crop_pad, generator)
    if cfg.hflip:
        x = random_hflip(x, generator)
    return x


def batches(data: ImageSet, batch_size: int, *, shuffle: bool, generator: Optional[torch.Generator] = None,
            drop_last: bool = False, device: Union[str, torch.device] = "cpu",
            with_labels: bool = True) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield (float images in [0, 1] on ``device``, labels or None) batches from resident data."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    images = data.images if data.images.device == torch.device(device) else data.images.to(device)
    labels = None
    if with_labels and data.labels is not None:
        labels = data.labels.to(device)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size].to(images.device)
        yield to_float(images[idx]), (labels[idx] if labels is not None else None)
