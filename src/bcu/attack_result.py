"""BackdoorBench's ``attack_result.pt``: the backdoored model and its poisoned test set, read safely.

BackdoorBench's attack scripts (and the BCU authors' fork of its v1) end with
``torch.save(dict, "attack_result.pt")``: a torch zip whose ``data.pkl`` is a protocol-2 pickle
holding the state dict, ``model_name``, ``num_classes``, ``img_size`` (H, W, C), the data set name,
and the poisoned sets as PIL images and numpy arrays. ``torch.load(weights_only=True)`` refuses
them (numpy and PIL globals), and a plain ``torch.load`` would run whatever a crafted file names.

:class:`AttackResultUnpickler` reads them without ever calling a global of the file's choosing:
every global the format uses is mapped to a function or stub class of this module that checks
its arguments and builds only plain values (tensors, numpy arrays of numeric dtypes, uint8 pixel
arrays, dicts, lists, strings, numbers). Anything else -- another global, ``OBJ``/``INST``,
``NEWOBJ`` of anything but the PIL stub, ``BUILD`` on anything but the stubs -- is refused with one
line. Every array, image and tensor must have its bytes in the file, and their total may not
exceed twice the file's size, so a file bounds what it makes bcu allocate. PIL is never imported.

Layouts read (docs/models.md):

* BackdoorBench v1.x and the BCU authors' code: ``bd_test = {'x': [PIL images], 'y': int64 array,
  'original_index': ..., 'original_targets': int64 array (optional), 'poison_indicator': (optional)}``;
* BackdoorBench v1.0: ``x`` a float tensor (N, C, H, W) of 0-255 values, ``y``/``original_targets``
  tensors;
* BackdoorBench v2.x: ``bd_test = {'bd_data_container': {'data_dict': {index: {'path': png,
  'other_info': [bd_label, original_label]}}, ...}, ...}``, the PNG files written beside
  ``attack_result.pt`` (``<folder>/bd_test_dataset/<label>/<index>.png``); or in-memory values
  ``(PIL image, bd_label, original_label)``.
"""
from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .errors import DataError, show
from .models import MODELS
from .models.infer import Inferred, infer_architecture
from .untrusted import (MAX_CLASSES, MAX_IMAGE_PIXELS, MAX_MODEL_BYTES, MAX_RESIDENT_BYTES, MAX_SIDE, GiB, MiB, human,
                        read_bounded)

MAX_ATTACK_RESULT_BYTES = 8 * GiB   # an attack_result.pt: weights + poisoned train and test images

# BackdoorBench's per-data-set input normalisation (utils/aggregate_block/dataset_and_transform_generate.py,
# get_dataset_normalization; the same in the authors' fork): the models expect normalised inputs
NORMALIZATION: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "celeba": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "mnist": ((0.5,), (0.5,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# the numeric dtypes an array of the file may have (no object, string, void or datetime arrays)
_DTYPES = {"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"}
_STORAGES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
             "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
             "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
             "BoolStorage": torch.bool}
_PIL_MODES = {"RGB": 3, "L": 1}


class Refused(pickle.UnpicklingError):
    """What the restricted unpickler raises for anything outside the allow-list."""


# --------------------------------------------------------------------------------------------------
# stubs the allowed globals resolve to


class _NDArrayType:
    """What ``numpy.ndarray`` resolves to: only an argument of ``_reconstruct``."""


class _DType:
    """``numpy.dtype(spec, align, copy)`` for the numeric specs of :data:`_DTYPES`."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str) or spec not in _DTYPES:
            raise Refused(f"refusing a numpy array of dtype {show(spec)} (only numeric arrays are read)")
        self.spec = spec
        self.order = "<"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise Refused("a malformed numpy dtype")
        self.order = state[1] if state[1] in "<>" else "<"

    @property
    def np(self) -> np.dtype:
        return np.dtype(self.spec).newbyteorder(self.order)


class _Array:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` followed by ``BUILD`` with
    ``(version, shape, dtype, is_fortran, raw bytes)``: the array of the raw bytes, checked."""

    def __init__(self, budget: "_Budget") -> None:
        self._budget = budget
        self.value: Optional[np.ndarray] = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DType)):
            raise Refused("a malformed numpy array")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and len(shape) <= 8 and all(_is_int(v) and v >= 0 for v in shape)):
            raise Refused(f"a numpy array of shape {show(shape)}")
        if not isinstance(raw, bytes):
            raise Refused("a numpy array whose data are not bytes (an object array?)")
        dt = dtype.np
        if math.prod(shape) * dt.itemsize != len(raw):
            raise Refused(f"a numpy array of shape {shape} whose data hold {len(raw)} bytes")
        self._budget.charge(len(raw))
        arr = np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C")
        self.value = arr.astype(arr.dtype.newbyteorder("="), copy=True)


class _PILImage:
    """``PIL.Image.Image`` as pickled (``NEWOBJ`` + ``BUILD [info, mode, size, palette, bytes]``):
    only the pixels of an RGB or L image are kept, as an (H, W, C) uint8 array."""

    _budget: Optional["_Budget"] = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, (list, tuple)) and len(state) >= 5):
            raise Refused("a malformed PIL image")
        _info, mode, size, _palette, data = state[:5]
        if mode not in _PIL_MODES:
            raise Refused(f"a PIL image of mode {show(mode)} (RGB and L are read)")
        if not (isinstance(size, tuple) and len(size) == 2 and all(_is_int(v) and 1 <= v <= MAX_SIDE for v in size)):
            raise Refused(f"a PIL image of size {show(size)}")
        w, h = size
        c = _PIL_MODES[mode]
        if w * h > MAX_IMAGE_PIXELS or not isinstance(data, bytes) or len(data) != w * h * c:
            raise Refused(f"a {w}x{h} {mode} PIL image whose data hold "
                          f"{len(data) if isinstance(data, bytes) else 'no'} bytes")
        if self._budget is not None:
            self._budget.charge(len(data))
        self.value = np.frombuffer(data, dtype=np.uint8).reshape(h, w, c).copy()


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Budget:
    """Bytes the stubs may allocate in all: twice the file's size."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise Refused(f"the file asks for more than {human(self.limit)} of arrays and images")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``: how protocol 2 writes every ``bytes`` (a latin-1 string)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused(f"_codecs.encode of {type(text).__name__} as {show(encoding)}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``builtins.bytes``: only ``bytes()`` (``bytes(10**12)`` would allocate a terabyte)."""
    if args:
        raise Refused("bytes() with arguments")
    return b""


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
        raise Refused("OrderedDict() with unexpected arguments")
    return collections.OrderedDict(*args)


# --------------------------------------------------------------------------------------------------
# the unpickler


class AttackResultUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler (its memo is a dict) with an explicit allow-list of globals, each
    resolved to a checking stub of this module, and storages read from the zip's records."""

    def __init__(self, file: io.BytesIO, records: Callable[[str], bytes], budget: _Budget) -> None:
        super().__init__(file, encoding="latin1")
        self.records = records
        self.budget = budget
        self.storages: Dict[str, torch.Tensor] = {}
        image = type("_PILImageOfFile", (_PILImage,), {"_budget": budget})
        self.image_type = image
        array = lambda cls, shape, typecode: self._reconstruct(cls, shape, typecode)  # noqa: E731
        self.allowed: Dict[Tuple[str, str], Any] = {
            ("collections", "OrderedDict"): _ordered_dict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("_codecs", "encode"): _encode,
            ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes,
            ("numpy", "ndarray"): _NDArrayType, ("numpy", "dtype"): _DType,
            ("numpy.core.multiarray", "_reconstruct"): array, ("numpy._core.multiarray", "_reconstruct"): array,
            ("numpy.core.multiarray", "scalar"): self._scalar, ("numpy._core.multiarray", "scalar"): self._scalar,
            ("PIL.Image", "Image"): image,
            **{("torch", name): _StorageType(dt) for name, dt in _STORAGES.items()},
        }
        self.callables = {id(v) for k, v in self.allowed.items() if k[0] != "torch" or k[1] not in _STORAGES}
        self.callables.discard(id(image))  # an image is made by NEWOBJ, never by a call
        self.callables.discard(id(_NDArrayType))
        self.dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
        for op in (pickle.OBJ, pickle.INST, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4):
            self.dispatch[op[0]] = type(self)._refuse_opcode
        self.dispatch[pickle.REDUCE[0]] = type(self)._load_reduce
        self.dispatch[pickle.NEWOBJ[0]] = type(self)._load_newobj
        self.dispatch[pickle.BUILD[0]] = type(self)._load_build

    # -- opcodes --------------------------------------------------------------------------------
    def _refuse_opcode(self) -> None:
        raise Refused("refusing to build objects (OBJ/INST/NEWOBJ_EX/EXT)")

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self.callables or not isinstance(args, tuple):
            raise Refused(f"refusing to call {show(getattr(func, '__name__', type(func).__name__))}")
        self.stack[-1] = func(*args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls is not self.image_type or args != ():
            raise Refused(f"refusing to create {show(getattr(cls, '__name__', type(cls).__name__))}")
        self.append(cls.__new__(cls))

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, (_Array, _DType, _PILImage)):
            inst.__setstate__(state)
        elif isinstance(inst, collections.OrderedDict) or isinstance(inst, torch.Tensor):
            pass  # a state dict's `_metadata` (versions of layers), a tensor's python attributes: not needed
        else:
            raise Refused(f"refusing to set the state of {type(inst).__name__}")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            raise Refused(f"refusing to load {module}.{name}") from None

    # -- torch ----------------------------------------------------------------------------------
    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and re.fullmatch(r"[0-9]{1,12}", pid[2]) and _is_int(pid[4])
                and pid[4] >= 0):
            raise Refused("a malformed tensor storage")
        _, stype, key, _location, numel = pid
        if key not in self.storages:
            raw = self.records(f"data/{key}")
            itemsize = torch.empty((), dtype=stype.dtype).element_size()
            if len(raw) != numel * itemsize:
                raise Refused(f"tensor storage {key} declares {numel} values but holds {len(raw)} bytes")
            self.budget.charge(len(raw))
            self.storages[key] = torch.frombuffer(bytearray(raw), dtype=stype.dtype) if raw else \
                torch.empty(0, dtype=stype.dtype)
        storage = self.storages[key]
        if storage.dtype != stype.dtype:
            raise Refused(f"tensor storage {key} is read as two dtypes")
        return storage

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                        hooks: Any = None, metadata: Any = None) -> torch.Tensor:
        if not isinstance(storage, torch.Tensor) or not any(storage is s for s in self.storages.values()):
            raise Refused("a tensor without a storage of the file")
        ok = (_is_int(offset) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
              and len(size) == len(stride) <= 8 and all(_is_int(v) and v >= 0 for v in size + stride))
        if not ok:
            raise Refused("a tensor of malformed shape")
        n = math.prod(size)
        last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if n else offset
        if n > storage.numel() or (n and last >= storage.numel()):
            raise Refused(f"a tensor of shape {size} beyond its storage of {storage.numel()} values")
        return torch.as_strided(storage, size, stride, offset)

    # -- numpy ----------------------------------------------------------------------------------
    def _reconstruct(self, cls: Any, shape: Any, typecode: Any) -> _Array:
        if cls is not _NDArrayType:
            raise Refused("numpy _reconstruct of something that is not an ndarray")
        return _Array(self.budget)

    def _scalar(self, dtype: Any, raw: Any = None) -> Union[int, float, bool]:
        if not isinstance(dtype, _DType) or not isinstance(raw, bytes) or len(raw) != dtype.np.itemsize:
            raise Refused("a malformed numpy scalar")
        return np.frombuffer(raw, dtype=dtype.np)[0].item()


def _plain(obj: Any) -> Any:
    """A stub as its value (arrays and images); anything else as it is."""
    return obj.value if isinstance(obj, (_Array, _PILImage)) else obj


def unpickle_torch_zip(data: bytes, where: str) -> Any:
    """The object of a torch zip file (``torch.save``), read with :class:`AttackResultUnpickler`."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError):
        raise DataError(f"{where} is not a torch zip file (BackdoorBench writes attack_result.pt with torch.save; "
                        f"the legacy pre-1.6 torch format is not read)") from None
    pkl = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if len(pkl) != 1:
        raise DataError(f"{where} is not a torch zip file: {len(pkl)} data.pkl records")
    prefix = pkl[0].filename[: -len("data.pkl")]
    by_name = {i.filename: i for i in infos}
    for i in infos:
        stored = i.compress_type == zipfile.ZIP_STORED
        if (stored and i.file_size > len(data)) or (not stored and i.file_size > 1032 * i.compress_size + 4096):
            raise DataError(f"{where}: record {show(i.filename)} declares {human(i.file_size)}, more than the file "
                            f"can hold")
    order = by_name.get(prefix + "byteorder")
    if order is not None and zf.read(order).strip() not in (b"little", b""):
        raise DataError(f"{where} was written on a big-endian machine, which bcu does not read")

    def records(name: str) -> bytes:
        info = by_name.get(prefix + name)
        if info is None:
            raise Refused(f"no record {name}")
        return zf.read(info)

    try:
        up = AttackResultUnpickler(io.BytesIO(zf.read(pkl[0])), records, _Budget(2 * len(data) + MiB))
        return up.load()
    except RecursionError:
        raise DataError(f"{where} is not a readable attack result: nested too deeply") from None
    except Refused as e:
        raise DataError(f"{where} is not a plain BackdoorBench attack result; refusing it: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OSError, struct.error, MemoryError, OverflowError, UnicodeError, RuntimeError, zipfile.BadZipFile) as e:
        raise DataError(f"{where} is not a readable attack result ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:160]})") from None


# --------------------------------------------------------------------------------------------------
# the layouts


@dataclass
class PoisonedSet:
    """The stored poisoned test set: uint8 images (N, C, H, W), the labels the backdoor aims at, and
    (where stored) the images' true labels."""

    images: torch.Tensor
    targets: torch.Tensor
    original_targets: Optional[torch.Tensor]


@dataclass
class AttackResult:
    """What bcu takes from an ``attack_result.pt``."""

    path: Path
    model_name: str
    num_classes: int
    img_size: Tuple[int, int, int]          # (H, W, C) as BackdoorBench stores it
    state: Dict[str, torch.Tensor]
    clean_data: Optional[str]
    layout: str                             # which BackdoorBench layout the poisoned sets use
    bd_test: Optional[PoisonedSet] = None
    notes: List[str] = field(default_factory=list)
    sha256: str = ""

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        h, w, c = self.img_size
        return c, h, w

    @property
    def normalization(self) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
        """BackdoorBench's mean/std for the data set (None for an unknown data set)."""
        norm = NORMALIZATION.get((self.clean_data or "").lower())
        if norm is None:
            return None
        mean, std = norm
        c = self.input_shape[0]
        return (mean, std) if len(mean) == c else ((mean[0],) * c, (std[0],) * c) if len(mean) == 1 else None


def is_attack_result(path: Union[str, Path]) -> bool:
    """Whether ``path`` names an attack result (by its name: BackdoorBench always writes this one)."""
    return Path(path).name == "attack_result.pt"


def _need(d: Dict[str, Any], key: str, kind: Union[type, Tuple[type, ...]], where: str) -> Any:
    if key not in d:
        raise DataError(f"{where} has no {key!r}")
    v = _plain(d[key])
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise DataError(f"{where}: {key!r} is {type(v).__name__}, not {getattr(kind, '__name__', kind)}")
    return v


def _labels(v: Any, n: int, what: str, where: str, classes: int) -> torch.Tensor:
    v = _plain(v)
    if isinstance(v, torch.Tensor):
        v = v.numpy()
    if isinstance(v, list) and all(_is_int(x) for x in v):
        v = np.asarray(v, dtype=np.int64)
    if not (isinstance(v, np.ndarray) and v.shape == (n,) and (np.issubdtype(v.dtype, np.integer) or
                                                               np.issubdtype(v.dtype, np.floating))):
        raise DataError(f"{where}: {what} must be {n} integer labels")
    if n and (not np.all(np.isfinite(v)) or v.min() < 0 or v.max() >= classes or np.any(v != np.round(v))):
        raise DataError(f"{where}: {what} holds labels outside 0..{classes - 1}")
    return torch.from_numpy(v.astype(np.int64))


def _stack(images: List[np.ndarray], c: int, h: int, w: int, where: str, first: int = 0) -> torch.Tensor:
    for i, im in enumerate(images, first):
        if im.shape != (h, w, c):
            raise DataError(f"{where}: poisoned image {i} is {im.shape[1]}x{im.shape[0]} with {im.shape[2]} channels, "
                            f"not the {w}x{h}x{c} of img_size")
    if not images:
        return torch.zeros((0, c, h, w), dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _read_png(path: Path, where: str) -> np.ndarray:
    from PIL import Image

    raw = read_bounded(path, MAX_MODEL_BYTES, "images", DataError)
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{path} is {im.width}x{im.height}, more than {MAX_IMAGE_PIXELS} pixels")
            arr = np.asarray(im.convert("RGB" if im.mode not in ("L",) else "L"))
    except DataError:
        raise
    except Exception as e:  # a corrupt image is one line, whatever PIL raises
        raise DataError(f"{where}: cannot read {path}: {type(e).__name__}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _v2_image_path(root: Path, stored: Any, where: str) -> Path:
    """Where a v2 PNG is now: BackdoorBench stores paths relative to the attack's working folder
    (``./record/<run>/bd_test_dataset/<label>/<index>.png``); bcu looks for the last three parts
    beside ``attack_result.pt`` and never outside that folder."""
    if not isinstance(stored, str) or len(stored) > 4096:
        raise DataError(f"{where}: a poisoned image path is not a short text")
    parts = [p for p in re.split(r"[\\/]+", stored) if p not in ("", ".")]
    tail = parts[-3:]
    if len(tail) < 3 or any(p == ".." for p in tail) or not tail[-1].lower().endswith(".png"):
        raise DataError(f"{where}: poisoned image path {show(stored)} is not <folder>/<label>/<index>.png")
    return root.joinpath(*tail)


def _bd_test(d: Any, res: AttackResult, where: str) -> Tuple[Optional[PoisonedSet], str]:
    c, h, w = res.input_shape
    n_cls = res.num_classes
    if d is None:
        return None, "none"
    if not isinstance(d, dict):
        raise DataError(f"{where}: bd_test is {type(d).__name__}, not a dict")
    if "bd_data_container" in d:  # v2.x: retrieve_state() of prepro_cls_DatasetBD_v2
        box = d["bd_data_container"]
        if not isinstance(box, dict) or not isinstance(box.get("data_dict"), dict):
            raise DataError(f"{where}: bd_test.bd_data_container has no data_dict")
        items = sorted(box["data_dict"].items(), key=lambda kv: kv[0] if _is_int(kv[0]) else -1)
        if any(not _is_int(k) for k, _ in items):
            raise DataError(f"{where}: bd_test.data_dict keys must be integer indices")
        if len(items) * c * h * w > MAX_RESIDENT_BYTES:
            raise DataError(f"{where}: {len(items)} poisoned images of {w}x{h}x{c} take more than the "
                            f"{human(MAX_RESIDENT_BYTES)} bcu loads into memory")
        images, bd, orig = [], [], []
        kind = "v2-folder"
        for k, v in items:
            if isinstance(v, dict):  # PNG on disk, checked against img_size as it is read
                info = v.get("other_info")
                if not (isinstance(info, (list, tuple)) and len(info) >= 2 and all(_is_int(x) for x in info[:2])):
                    raise DataError(f"{where}: bd_test entry {k} has no [bd_label, label] other_info")
                images.append(_read_png(_v2_image_path(res.path.parent, v.get("path"), where), where))
                _stack(images[-1:], c, h, w, where, len(images) - 1)
                bd.append(info[0])
                orig.append(info[1])
            elif isinstance(v, tuple) and len(v) >= 3 and isinstance(v[0], _PILImage):  # in-memory mode
                kind = "v2-memory"
                images.append(v[0].value)
                bd.append(v[1])
                orig.append(v[2])
            else:
                raise DataError(f"{where}: bd_test entry {k} is neither a PNG record nor (image, label, label)")
        n = len(images)
        return PoisonedSet(_stack(images, c, h, w, where), _labels(bd, n, "bd_test labels", where, n_cls),
                           _labels(orig, n, "bd_test original labels", where, n_cls)), kind
    x = _plain(d.get("x"))
    if isinstance(x, torch.Tensor):  # v1.0: float (N, C, H, W) holding 0-255
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w) or not x.is_floating_point():
            raise DataError(f"{where}: bd_test.x is a tensor of shape {tuple(x.shape)}, not (N, {c}, {h}, {w})")
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 255):
            raise DataError(f"{where}: bd_test.x holds values outside 0..255")
        images = x.round().to(torch.uint8).contiguous()
        kind = "v1.0-tensor"
    elif isinstance(x, list):  # v1.x / the BCU authors: PIL images (or arrays)
        arrays = []
        for i, im in enumerate(x):
            im = _plain(im)
            if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim in (2, 3)):
                raise DataError(f"{where}: bd_test.x[{i}] is not an image")
            arrays.append(im[:, :, None] if im.ndim == 2 else im)
        images = _stack(arrays, c, h, w, where)
        kind = "v1-pil"
    else:
        raise DataError(f"{where}: bd_test has neither images ('x') nor a v2 bd_data_container")
    n = images.shape[0]
    targets = _labels(d.get("y"), n, "bd_test.y", where, n_cls)
    orig = d.get("original_targets")
    original = None if orig is None else _labels(orig, n, "bd_test.original_targets", where, n_cls)
    if original is None:
        res.notes.append("bd_test stores no original labels: RA is not measured")
    return PoisonedSet(images, targets, original), kind


def read_attack_result(path: Union[str, Path], with_test: bool = True) -> AttackResult:
    """Read ``attack_result.pt`` (see the module docstring); every problem is one DataError line."""
    path = Path(path)
    data = read_bounded(path, MAX_ATTACK_RESULT_BYTES, "attack results", DataError)
    obj = unpickle_torch_zip(data, str(path))
    where = str(path)
    if not isinstance(obj, dict):
        raise DataError(f"{where} does not hold a dict (BackdoorBench writes model, model_name, num_classes, "
                        f"img_size, bd_test)")
    model_name = _need(obj, "model_name", str, where)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", model_name):
        raise DataError(f"{where}: model_name {show(model_name)} is not a model name")
    num_classes = _need(obj, "num_classes", int, where)
    if not 2 <= num_classes <= MAX_CLASSES:
        raise DataError(f"{where}: num_classes {num_classes} is not in [2, {MAX_CLASSES}]")
    img = _need(obj, "img_size", (tuple, list), where)
    if not (len(img) == 3 and all(_is_int(v) for v in img) and 1 <= img[0] <= MAX_SIDE and 1 <= img[1] <= MAX_SIDE
            and img[2] in (1, 3)):
        raise DataError(f"{where}: img_size {show(img)} is not (H, W, C)")
    state = _need(obj, "model", dict, where)
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DataError(f"{where}: 'model' is not a state dict of named tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}  # DataParallel
    clean = obj.get("clean_data")
    clean = clean if isinstance(clean, str) and len(clean) <= 64 else None
    res = AttackResult(path, model_name, num_classes, (int(img[0]), int(img[1]), int(img[2])), state, clean, "none",
                       sha256=hashlib.sha256(data).hexdigest())
    bd_test, res.layout = _bd_test(obj.get("bd_test"), res, where) if with_test else (None, "not read")
    res.bd_test = bd_test
    return res


def model_candidates(model_name: str) -> List[str]:
    """Registered architectures whose name (after the ``family:`` prefix, ignoring ``_``) is
    ``model_name``: BackdoorBench's ``resnet18`` is torchvision's, the authors' is resnet18_DBD,
    so the keys decide among them (:func:`bcu.models.infer.infer_architecture`)."""
    want = model_name.lower().replace("_", "").replace("-", "")
    return [n for n in MODELS.names() if n.split(":")[-1].replace("_", "").replace("-", "") == want]


def infer_model(res: AttackResult) -> Inferred:
    """The registered architecture of ``res``'s state dict: among those named like ``model_name``
    (:func:`model_candidates`) when there are any, else among all, by keys and shapes, with the
    file's ``num_classes`` and ``img_size``."""
    names = model_candidates(res.model_name)
    where = f"{res.path} (model_name {res.model_name!r})"
    return infer_architecture(res.state, where, num_classes=res.num_classes, input_shape=res.input_shape,
                              names=names or None)


@torch.inference_mode()
def stored_attack_scores(model: torch.nn.Module, poisoned: PoisonedSet, device: str = "cpu",
                         batch_size: int = 512) -> Dict[str, Optional[float]]:
    """ASR (percent of the stored poisoned images classified as the backdoor's target) and RA
    (percent classified as their original label, where stored) of ``model``, which takes [0, 1] images."""
    if len(poisoned.images) == 0:
        raise DataError("the attack result's bd_test holds no poisoned images")
    model = model.to(device).eval()
    preds = []
    for s in range(0, len(poisoned.images), batch_size):
        x = poisoned.images[s:s + batch_size].to(device).float() / 255
        preds.append(model(x).argmax(1).cpu())
    pred = torch.cat(preds)
    asr = float((pred == poisoned.targets).float().mean()) * 100
    ra = None if poisoned.original_targets is None else float((pred == poisoned.original_targets).float().mean()) * 100
    return {"asr": asr, "ra": ra, "poisoned_images": len(pred)}
