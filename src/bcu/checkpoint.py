"""Loading and saving models safely, and writing outputs atomically.

Native format: ``model.safetensors`` plus a JSON sidecar ``model.json`` holding the
:class:`~bcu.models.ModelSpec` and the SHA-256 of the weights. ``.pt``/``.pth``/``.ckpt``/``.bin``
state dicts load with ``torch.load(weights_only=True)`` only: nothing from an untrusted file is
ever unpickled into arbitrary objects. Every output is written to a temporary name and renamed.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import __version__
from .config import from_dict, to_dict
from .errors import BcuError, ConfigError, ModelError, OutputError
from .models import Classifier, ModelSpec, build

WEIGHTS_NAME = "model.safetensors"
SIDECAR_NAME = "model.json"
TORCH_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")
FORMAT = "bcu-model/1"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# atomic output


def _os_error(e: OSError, path: Path) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {path}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: permission denied (read-only location?)")
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return OutputError(f"cannot write {path}: a file is in the way where a folder is needed")
    return OutputError(f"cannot write {path}: {e.strerror or e}")


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _os_error(e, path) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Union[str, Path], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return to_dict(o)
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class OutputDir:
    """Stage an output folder at ``<out>.partial`` and rename it into place on success.

    A failure removes the staging folder, so nothing partial is left behind; an interruption
    (Ctrl-C, kill) keeps it when it holds a resumable checkpoint, for ``--resume``.
    """

    def __init__(self, final: Union[str, Path], overwrite: bool = False, resume: bool = False) -> None:
        self.final = Path(final)
        self.staging = self.final.with_name(self.final.name + ".partial")
        self.overwrite = overwrite
        self.resume = resume

    def __enter__(self) -> "OutputDir":
        if self.final.exists() and not self.overwrite:
            raise OutputError(f"output {self.final} already exists (choose another --out or pass --overwrite)")
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(e, parent) from None
        if not os.access(parent, os.W_OK):
            raise OutputError(f"cannot write {self.final}: permission denied (read-only location?)")
        if self.staging.exists() and not self.resume:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.resume and not self.staging.exists():
            raise OutputError(f"nothing to resume: {self.staging} does not exist")
        try:
            self.staging.mkdir(exist_ok=True)
        except OSError as e:
            raise _os_error(e, self.staging) from None
        return self

    @property
    def path(self) -> Path:
        return self.staging

    def commit(self) -> Path:
        old = None
        try:
            if self.final.exists():
                old = self.final.with_name(self.final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.final, old)
            os.replace(self.staging, self.final)
        except OSError as e:
            raise _os_error(e, self.final) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def _has_checkpoint(self) -> bool:
        """A finished checkpoint file in ``resume/`` (temporary ``.name.tmp`` files do not count)."""
        d = self.staging / "resume"
        try:
            return d.is_dir() and any(p.is_file() and not p.name.startswith(".") for p in d.iterdir())
        except OSError:
            return False

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        interrupted = exc_type is KeyboardInterrupt or (
            isinstance(exc, BcuError) and exc.exit_code == 130)
        if interrupted and self._has_checkpoint():
            return  # keep the checkpoint for --resume
        shutil.rmtree(self.staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# saving


def _spec_dict(spec: ModelSpec) -> Dict[str, Any]:
    d = to_dict(spec)
    return d


def save_model(model: Classifier, directory: Union[str, Path], extra: Optional[Mapping[str, Any]] = None,
               name: str = "model") -> Dict[str, Any]:
    """Write ``<name>.safetensors`` and ``<name>.json`` (spec + SHA-256) into ``directory``."""
    from safetensors.torch import save

    if not isinstance(model, Classifier):
        raise ModelError("save_model needs a bcu Classifier (use bcu.models.create_model or wrap_model)")
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    data = save(state, metadata={"format": FORMAT})
    digest = sha256_bytes(data)
    sidecar = {"format": FORMAT, "bcu_version": __version__, **_spec_dict(model.spec),
               "sha256": digest, **dict(extra or {})}
    atomic_write_bytes(directory / f"{name}.safetensors", data)
    atomic_write_json(directory / f"{name}.json", sidecar)
    return sidecar


# --------------------------------------------------------------------------------------------------
# loading


def resolve_model_path(path: Union[str, Path]) -> Tuple[Path, Optional[Path]]:
    """(weights file, sidecar or None) for a model folder, a .safetensors file, or a torch file."""
    p = Path(path)
    if p.is_dir():
        w = p / WEIGHTS_NAME
        if not w.is_file():
            raise ModelError(f"{p} holds no {WEIGHTS_NAME}")
        return w, p / SIDECAR_NAME
    if not p.exists():
        raise ModelError(f"model {p} does not exist")
    side = p.with_suffix(".json")
    return p, side if side.is_file() else None


def read_sidecar(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"sidecar {path} is missing (it records the architecture; or pass --arch)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"sidecar {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"sidecar {path} must be a JSON object")
    return data


def spec_from_sidecar(data: Mapping[str, Any], where: str = "sidecar") -> ModelSpec:
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    if "arch" not in data:
        raise ModelError(f"{where} does not name an architecture ('arch')")
    try:
        return from_dict(ModelSpec, {k: v for k, v in data.items() if k in fields})
    except ConfigError as e:
        raise ModelError(f"{where}: {e}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = _read_bytes(path)
    try:
        state = load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise ModelError(f"{path} is not a valid safetensors file (corrupt or truncated): "
                         f"{_first_line(str(e)) or type(e).__name__}") from None
    return state, sha256_bytes(data)


def _read_torch(path: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    import pickle

    data = _read_bytes(path)
    import io

    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: not one line
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(f"{path} is not a plain state dict; refusing to unpickle it "
                         f"({_unpickling_reason(str(e))})") from None
    except Exception as e:  # truncated zip, bad magic, ...: all "not a loadable state dict"
        raise ModelError(f"{path} is not a readable PyTorch state dict "
                         f"({type(e).__name__}: {_first_line(str(e)).split('. ')[0]})") from None
    for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and obj[key] and all(
                isinstance(v, torch.Tensor) for v in obj[key].values()):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelError(f"{path} does not hold a state dict of named tensors")
    return dict(obj), sha256_bytes(data)


def _first_line(text: str, limit: int = 160) -> str:
    """The first non-empty line of ``text`` without terminal escapes, at most ``limit`` characters."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line[:limit]


def _unpickling_reason(text: str) -> str:
    """The useful part of torch's weights-only refusal, e.g. 'Unsupported global: GLOBAL io.open'."""
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = _first_line(text.split(marker, 1)[1]).split(" was not an allowed global")[0]
        if reason:
            return reason
    return _first_line(text) or "unsafe content"


def _strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in ("module.", "net.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ModelError(f"{where}: weight {k!r} contains NaN or Inf")


def load_state_into(model: Classifier, state: Dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model.net`` strictly, with one clear line on any mismatch."""
    own = model.net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelError(f"{where} does not match architecture {model.spec.arch!r}: "
                         + (f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}")
                         + f" ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            if v.dim() >= 1 and state[k].dim() == v.dim() and v.shape[0] == model.spec.num_classes and \
                    state[k].shape[0] != v.shape[0] and k.endswith(("weight", "bias")) and _is_last(own, k):
                raise ModelError(f"{where} has {state[k].shape[0]} output classes, not num_classes="
                                 f"{model.spec.num_classes}")
            raise ModelError(f"{where}: {k!r} has shape {tuple(state[k].shape)}, architecture "
                             f"{model.spec.arch!r} expects {tuple(v.shape)}")
    check_finite(state, where)
    model.net.load_state_dict(state, strict=True)


def _is_last(state: Mapping[str, torch.Tensor], key: str) -> bool:
    keys = [k for k in state if k.endswith(("weight", "bias"))]
    return key in keys[-2:]


def load_model(path: Union[str, Path], arch: Optional[str] = None, num_classes: Optional[int] = None,
               input_shape: Optional[Tuple[int, int, int]] = None, mean: Optional[Tuple[float, ...]] = None,
               std: Optional[Tuple[float, ...]] = None, **kwargs: Any) -> Tuple[Classifier, Dict[str, Any]]:
    """Load a model safely. Returns (model in eval mode, info with 'sha256' and 'sidecar').

    A safetensors file needs its sidecar (or ``arch`` and friends); a torch state dict needs
    ``arch`` unless a sidecar with the same stem sits beside it. Explicit arguments override the
    sidecar, and any disagreement between the weights and the architecture is a ModelError.
    """
    weights, side = resolve_model_path(path)
    suffix = weights.suffix.lower()
    if suffix == ".safetensors":
        state, digest = _read_safetensors(weights)
    elif suffix in TORCH_EXTENSIONS:
        state, digest = _read_torch(weights)
    else:
        raise ModelError(f"{weights}: unsupported model file (use .safetensors with a sidecar, or "
                         f"{'/'.join(TORCH_EXTENSIONS)} with --arch)")
    sidecar: Dict[str, Any] = {}
    if side is not None and side.is_file():
        sidecar = read_sidecar(side)
    elif arch is None:
        raise ModelError(f"{weights} has no sidecar {weights.with_suffix('.json').name}; pass --arch "
                         f"(and --num-classes, --input-shape) to say what it is")
    if sidecar.get("sha256") and sidecar["sha256"] != digest:
        raise ModelError(f"{weights} does not match the SHA-256 in its sidecar (modified or corrupt)")
    merged = dict(sidecar)
    for key, val in (("arch", arch), ("num_classes", num_classes), ("input_shape", input_shape),
                     ("mean", mean), ("std", std)):
        if val is not None:
            merged[key] = val
    if kwargs:
        merged["kwargs"] = {**merged.get("kwargs", {}), **kwargs}
    if "mean" in merged and "std" not in merged or "std" in merged and "mean" not in merged:
        raise ModelError("give both mean and std for the input normalisation")
    spec = spec_from_sidecar(merged, str(side) if side else "model options")
    try:
        model = build(spec)
    except ConfigError as e:
        raise ModelError(str(e)) from None
    load_state_into(model, _strip_prefixes(state), str(weights))
    model.eval()
    return model, {"sha256": digest, "sidecar": sidecar, "path": str(weights)}


def wrap_model(net: nn.Module, spec: ModelSpec) -> Classifier:
    """Wrap an existing network (already built) as a Classifier with ``spec``'s normalisation."""
    return Classifier(net, spec)
