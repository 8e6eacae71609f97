"""The on-disk formats bcu reads, each read once and bounded before anything is allocated.

* IDX (MNIST / Fashion-MNIST, optionally gzipped): :func:`read_idx`, :func:`read_idx_dir`;
* CIFAR-10/100 python batches, through an unpickler that builds numpy arrays and nothing else;
* ``.npz`` (through :class:`NpzArchive`, every member's declared size checked) and ``.npy``,
  memory-mapped where stored uncompressed (:func:`npz_memmap`);
* image files (PIL, bounded pixel count) and folders of them (:func:`scan_image_folder`, flat or
  one sub-folder per class);
* :func:`sniff`: which of these a path is.

Readers never unpickle arbitrary objects and never write to their input. Only
:class:`~bcu.errors.DataError` escapes.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, clean
from ..progress import progress_bar
from .. import untrusted
from ..untrusted import human, open_regular, read_bounded, require_regular
from .imageset import ImageSet

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")
IDX_IMAGES = {"train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte")}
IDX_LABELS = {"train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
              "test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte")}
Format = Literal["idx", "cifar", "npz", "npy", "folder"]


def _one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line (its first non-empty line, else its type)."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return line[:limit] or type(e).__name__


# --------------------------------------------------------------------------------------------------
# what a path is


def find_file(directory: Path, stems: Sequence[str]) -> Optional[Path]:
    """The first of ``stems`` (or ``stem.gz``) that is a file in ``directory``."""
    for stem in stems:
        for cand in (directory / stem, directory / (stem + ".gz")):
            if cand.is_file():
                return cand
    return None


def sniff(path: Path, split: str = "train") -> Tuple[Format, Path]:
    """(format, path to read) of an existing data path: a ``.npz`` or ``.npy`` file, an IDX folder,
    a CIFAR python folder, or a folder of images (``path/split`` when that sub-folder exists)."""
    if not path.is_dir():
        require_regular(path, "data files", DataError)  # a FIFO or a device is neither a folder nor a file
        suffix = path.suffix.lower()
        if suffix in (".npz", ".npy"):
            return suffix[1:], path  # type: ignore[return-value]
        raise DataError(f"{path}: unsupported data file (use a folder or a .npz)")
    if find_file(path, [IDX_IMAGES["train"][0], IDX_IMAGES["test"][0]]) is not None:
        return "idx", path
    if any((path / f).is_file() for f in ("data_batch_1", "test_batch", "train", "test")) and not any(
            (path / f).is_dir() for f in ("train", "test")):
        return "cifar", path
    if (path / split).is_dir():  # folder/train/<class>/..., folder/test/<class>/...
        return "folder", path / split
    return "folder", path


# --------------------------------------------------------------------------------------------------
# IDX

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
    path = Path(path)
    with open_regular(path, "data files", DataError) as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            gz = fh.read(2) == b"\x1f\x8b"
            fh.seek(0)
            stream = gzip.GzipFile(fileobj=fh, mode="rb") if gz else fh
            capacity = min(untrusted.MAX_DECOMPRESSED_BYTES, 1032 * size + 1024) if gz else size
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


def read_idx_dir(directory: Union[str, Path], split: str = "train", labels: bool = True,
                 classes: Optional[List[str]] = None, name: str = "idx") -> ImageSet:
    """An IDX folder (``train-images-idx3-ubyte[.gz]`` ...); ``labels=False`` never opens a label file."""
    d = Path(directory)
    prefix = "train" if split == "train" else "t10k"
    img = find_file(d, IDX_IMAGES["train" if split == "train" else "test"])
    if img is None:
        raise DataError(f"no {prefix}-images-idx3-ubyte[.gz] in {d}")
    x = read_idx(img)
    if x.ndim != 3:
        raise DataError(f"{img} holds {x.ndim}-d data, expected (N, H, W) images")
    y = None
    if labels:
        lab = find_file(d, IDX_LABELS["train" if split == "train" else "test"])
        if lab is None:
            raise DataError(f"no {prefix}-labels-idx1-ubyte[.gz] in {d}")
        y = read_idx(lab)
        if y.shape != (x.shape[0],):
            raise DataError(f"{lab} has {y.shape[0]} labels for {x.shape[0]} images")
        y = torch.from_numpy(y.astype(np.int64))
    return ImageSet(torch.from_numpy(x).unsqueeze(1).contiguous(), y, classes, f"{name}:{split}")


# --------------------------------------------------------------------------------------------------
# CIFAR python batches

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
    raw = read_bounded(path, untrusted.MAX_PICKLE_BYTES, "CIFAR batches", DataError)
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


def read_cifar_dir(directory: Union[str, Path], split: str = "train", labels: bool = True) -> ImageSet:
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
    check_resident(sum(x.nbytes for x in xs), str(d))
    x = torch.from_numpy(np.concatenate(xs)).contiguous()
    y = torch.from_numpy(np.concatenate(ys)) if labels else None
    return ImageSet(x, y, classes, f"cifar:{split}")



# --------------------------------------------------------------------------------------------------
# arrays: .npz and .npy

def to_nchw_uint8(x: np.ndarray, where: str) -> torch.Tensor:
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


def check_resident(nbytes: int, where: str) -> None:
    if nbytes > untrusted.MAX_RESIDENT_BYTES:
        raise DataError(f"{where}: the images take {human(nbytes)}, more than the {human(untrusted.MAX_RESIDENT_BYTES)} bcu "
                        f"loads into memory (use --stream for folders, .npy and uncompressed .npz)")

def npy_header(f, version):
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
        info = self.zip.getinfo(self.members[key])
        stored = info.compress_type == zipfile.ZIP_STORED
        capacity = self.size if stored else min(untrusted.MAX_DECOMPRESSED_BYTES, 1032 * info.compress_size + 4096)
        if info.file_size > capacity:
            raise DataError(f"{self.path}: member {key} declares {human(info.file_size)}, more than the file can hold")
        with self.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = npy_header(f, version)
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


NPZ_KEYS = (("x_{split}", "y_{split}"), ("x", "y"), ("images", "labels"))


def npz_keys(keys: Sequence[str], split: str, path: Path, labels: bool) -> Tuple[str, Optional[str]]:
    """(image key, label key or None) of an archive's members: ``x_<split>``/``y_<split>``, ``x``/``y``
    or ``images``/``labels``; the label key only when ``labels`` (and then it must exist)."""
    have = set(keys)
    for xk, yk in ((a.format(split=split), b.format(split=split)) for a, b in NPZ_KEYS):
        if xk in have:
            if labels and yk not in have:
                raise DataError(f"{path}: no labels ('y', 'labels' or 'y_{split}')")
            return xk, (yk if labels else None)
    raise DataError(f"{path}: no 'x', 'images' or 'x_{split}' array (found {sorted(have)[:20]})")


def check_labels(y: np.ndarray, n: Optional[int], path: Path) -> torch.Tensor:
    """Labels read from ``path`` as int64: one integer per image (``n`` images; None: not known yet)."""
    y = np.asarray(y)
    if y.ndim != 1 or (n is not None and len(y) != n) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: labels must be {'a list of' if n is None else n} integers")
    return torch.from_numpy(y.astype(np.int64))


def read_npz(path: Union[str, Path], split: str = "train", labels: bool = True) -> ImageSet:
    """A .npz with ``x``/``images`` (and ``y``/``labels``), or ``x_train``/``x_test`` pairs, in memory."""
    p = Path(path)
    try:
        with NpzArchive(p) as z:
            xk, yk = npz_keys(z.files, split, p, labels)
            shape, _, dtype, _ = z.header(xk)
            check_resident(math.prod(shape) * dtype.itemsize, str(p))
            x = z.read(xk)
            y = z.read(yk) if yk is not None else None
    except DataError:
        raise
    except Exception as e:  # numpy's header parser can raise SyntaxError, tokenize.TokenError, ...: all "unreadable"
        raise DataError(f"{p} is not a readable .npz file: {_one_line(e)}") from None
    if not isinstance(x, np.ndarray) or (y is not None and not isinstance(y, np.ndarray)):
        raise DataError(f"{p}: a member is not a .npy array")
    imgs = to_nchw_uint8(x, str(p))
    return ImageSet(imgs, None if y is None else check_labels(y, imgs.shape[0], p), None, f"{p.name}:{split}")


def npz_memmap(path: Union[str, Path], key: str) -> Optional[np.memmap]:
    """A read-only memory map of member ``key``.npy of an uncompressed .npz (None if compressed).

    The member's declared shape is checked against its size first (:class:`NpzArchive`).
    """
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
        npy_header(fh, version)
        offset = fh.tell()
    if offset + int(np.prod(shape, dtype=object)) * dtype.itemsize > z.size:
        raise DataError(f"{p}: {key} declares more bytes than the file holds")
    return np.memmap(p, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def map_npz(path: Path, split: str, labels: bool) -> Optional[Tuple[np.memmap, Optional[torch.Tensor]]]:
    """(memory-mapped images, labels or None) of an uncompressed .npz; None when the images are
    compressed (they cannot be mapped: read them with :func:`read_npz`)."""
    try:
        with NpzArchive(path) as z:
            xk, yk = npz_keys(z.files, split, path, labels)
            shape = z.header(xk)[0]
            n = int(shape[0]) if len(shape) in (3, 4) else None  # another shape: StreamingImages says why
            y = check_labels(z.read(yk), n, path) if yk is not None else None
        arr = npz_memmap(path, xk)
    except DataError:
        raise
    except Exception as e:  # any parse failure of a damaged member is "unreadable", never a traceback
        raise DataError(f"{path} is not a readable .npz file: {_one_line(e)}") from None
    return None if arr is None else (arr, y)


def map_npy(path: Path) -> np.ndarray:
    """A ``.npy`` file memory-mapped read-only (no pickles)."""
    require_regular(path, "data files", DataError)  # a FIFO or a device is refused, never opened by numpy
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # numpy's header parser raises SyntaxError, TokenError, ...: all "unreadable"
        raise DataError(f"{path} is not a readable .npy file: {_one_line(e)}") from None


# --------------------------------------------------------------------------------------------------
# image files

def read_image(path: Union[str, Path], channels: Optional[int] = None,
               size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """One image file as a uint8 (C, H, W) array; 16-bit is scaled, alpha is dropped.

    Only regular files are opened; an image whose header declares more than
    :data:`bcu.untrusted.MAX_IMAGE_PIXELS` pixels is refused before it is decoded.
    """
    def too_big(w: int, h: int) -> DataError:
        return DataError(f"cannot read image {path}: it is {w}x{h} pixels, more than the {untrusted.MAX_IMAGE_PIXELS} "
                         f"bcu decodes (docs/security.md)")

    try:
        with open_regular(path, "images", DataError) as fh, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh) as im:
                w, h = im.size
                if w * h > untrusted.MAX_IMAGE_PIXELS:
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
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise DataError(f"cannot read image {path}: {m.group(1) if m else 'too many'} pixels, more than the "
                        f"{untrusted.MAX_IMAGE_PIXELS} bcu decodes (docs/security.md)") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: cannot identify image file {str(path)!r}") from None
    except Exception as e:  # a decoder failing on untrusted bytes, whatever it raises: "cannot read"
        raise DataError(f"cannot read image {path}: {_one_line(e)}") from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _suffix(name: str) -> str:
    """``Path(name).suffix``, lower-cased."""
    i = name.rfind(".")
    return name[i:].lower() if 0 < i < len(name) - 1 else ""


def scan_image_folder(folder: Path) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """The image files of a flat folder, or of one level of class sub-folders then the loose ones
    (sorted, deterministic), as compact arrays: names relative to ``folder`` (bytes), labels (int32,
    -1 for loose files), class names (the sub-folders)."""
    def images_in(d: str) -> List[bytes]:
        with os.scandir(d) as it:
            return sorted(os.fsencode(e.name) for e in it if _suffix(e.name) in IMAGE_EXTENSIONS and e.is_file())

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


def folder_labels(folder: Path, labs: np.ndarray) -> torch.Tensor:
    """The class of each file of :func:`scan_image_folder` (every file must be in a class sub-folder)."""
    if (labs < 0).any():
        raise DataError(f"{folder}: labels need one sub-folder per class; found loose image files")
    return torch.from_numpy(labs.astype(np.int64))


def no_images(folder: Path) -> DataError:
    return DataError(f"{folder} contains no image files ({', '.join(IMAGE_EXTENSIONS)})")


def same_size(a: np.ndarray, first: np.ndarray, path: Path, first_name: Optional[str] = None) -> None:
    """Images of one set must have one size: ``a`` (read from ``path``) against the first one."""
    if a.shape != first.shape:
        size = f"{first.shape[2]}x{first.shape[1]}x{first.shape[0]}"
        theirs = f"{first_name} is {size}: all images in a folder" if first_name else \
            f"other images are {size}: all images"
        raise DataError(f"{path} is {a.shape[2]}x{a.shape[1]}x{a.shape[0]} but {theirs} must have the same size "
                        f"(resize them first)")


def read_image_folder(directory: Union[str, Path], labels: bool = True, channels: Optional[int] = None,
                      size: Optional[Tuple[int, int]] = None, progress: bool = False) -> ImageSet:
    """A folder of images in memory, flat (unlabeled) or with one sub-folder per class."""
    d = Path(directory)
    names, labs, classes = scan_image_folder(d)
    if not len(names):
        raise no_images(d)
    files = [d / os.fsdecode(n) for n in names]
    if channels is None:
        channels = read_image(files[0]).shape[0]
    arrays: List[np.ndarray] = []
    for f in progress_bar(files, desc=f"reading {clean(d.name, 60)}", disable=not progress, unit="img"):
        a = read_image(f, channels, size)
        if arrays:
            same_size(a, arrays[0], f, files[0].name)
        else:
            check_resident(len(files) * a.nbytes, str(d))
        arrays.append(a)
    y = folder_labels(d, labs) if labels else None
    return ImageSet(torch.from_numpy(np.stack(arrays)), y, classes or None, d.name)
