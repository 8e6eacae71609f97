"""Model files: loading and saving classifiers safely.

Native format: ``model.safetensors`` plus a JSON sidecar ``model.json`` holding the
:class:`~bcu.models.ModelSpec` and the SHA-256 of the weights. ``.pt``/``.pth``/``.ckpt``/``.bin``
state dicts load with ``torch.load(weights_only=True)`` only: nothing from an untrusted file is
ever unpickled into arbitrary objects. Files are written atomically (:mod:`bcu.output`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .attack_result import infer_model, is_attack_result, read_attack_result
from .config import from_dict, yaml_load
from .errors import ConfigError, DataError, ModelError, show
from .models import (HUB_CONFIG, Classifier, ModelSpec, build, hub_config_bytes, library_normalization,
                     spec_from_hub_config)
from .models.infer import infer_architecture
from .output import atomic_write_bytes, atomic_write_json
from . import untrusted
from .untrusted import human, open_regular, parse_json, read_bounded
from .version import __version__

WEIGHTS_NAME = "model.safetensors"
SIDECAR_NAME = "model.json"
TORCH_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")
FORMAT = "bcu-model/1"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open_regular(path, "files", ModelError) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# saving


OUT_FORMATS = ("bcu", "hub")


def save_model(model: Classifier, directory: Union[str, Path], extra: Optional[Mapping[str, Any]] = None,
               name: str = "model", out_format: str = "bcu") -> Dict[str, Any]:
    """Write ``<name>.safetensors`` and ``<name>.json`` (spec + SHA-256) into ``directory``.

    ``out_format="hub"`` (a ``timm:NAME`` model) also writes timm's ``config.json`` beside them: the
    folder is then a Hub-style folder that ``timm.create_model('local-dir:DIR', pretrained=True)``
    loads, with the same ``model.safetensors`` (its keys are the bare network's, as timm's)."""
    if out_format not in OUT_FORMATS:
        raise ConfigError(f"--out-format must be one of {', '.join(OUT_FORMATS)}, got {show(out_format)}")
    if not isinstance(model, Classifier):
        raise ModelError("save_model needs a bcu Classifier (use bcu.models.create_model, or bcu.models.Classifier(net, "
                         "spec) around a network of your own)")
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    data = save_safetensors(state, metadata={"format": FORMAT})
    digest = sha256_bytes(data)
    sidecar = {"format": FORMAT, "bcu_version": __version__, **dataclasses.asdict(model.spec),
               "sha256": digest, **dict(extra or {})}
    hub = None
    if out_format == "hub":
        spec = model.spec
        hub = hub_config_bytes(model.net, spec.arch, spec.input_shape, spec.mean, spec.std, spec.classes)
    atomic_write_bytes(directory / f"{name}.safetensors", data)
    atomic_write_json(directory / f"{name}.json", sidecar)
    if hub is not None:
        atomic_write_bytes(directory / HUB_CONFIG, hub)
    return sidecar


# --------------------------------------------------------------------------------------------------
# loading


def resolve_model_path(path: Union[str, Path]) -> Tuple[Path, Optional[Path]]:
    """(weights file, sidecar or None) for a model folder, a .safetensors file, or a torch file.

    A folder's sidecar is bcu's ``model.json``, else a Hub-style ``config.json`` (timm's layout)."""
    p = Path(path)
    if p.is_dir():
        w = p / WEIGHTS_NAME
        if not w.is_file():
            raise ModelError(f"{p} holds no {WEIGHTS_NAME}")
        if not (p / SIDECAR_NAME).exists() and (p / HUB_CONFIG).exists():
            return w, p / HUB_CONFIG
        return w, p / SIDECAR_NAME
    if not p.exists():
        raise ModelError(f"model {p} does not exist")
    side = p.with_suffix(".json")
    return p, side if side.is_file() else None


def read_sidecar(path: Path) -> Dict[str, Any]:
    if not path.exists():
        raise ModelError(f"sidecar {path} is missing (it records the architecture; or pass --arch)")
    data = parse_json(read_bounded(path, untrusted.MAX_SIDECAR_BYTES, "sidecars", ModelError), f"sidecar {path}", ModelError)
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
    return read_bounded(path, untrusted.MAX_MODEL_BYTES, "model weights", ModelError)


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    data = _read_bytes(path)
    try:
        state = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise ModelError(f"{path} is not a valid safetensors file (corrupt or truncated): "
                         f"{_first_line(str(e)) or type(e).__name__}") from None
    return state, sha256_bytes(data)


def _read_torch(path: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    data = _read_bytes(path)
    check_zip_members(data, path)
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


def check_zip_members(data: bytes, path: Path) -> None:
    """A torch zip whose records would expand past what the file holds (or past
    :data:`bcu.untrusted.MAX_DECOMPRESSED_BYTES`) is refused before torch allocates them."""
    if data[:2] != b"PK":
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError):
        return  # not a zip after all: torch says what it is
    total = 0
    for info in infos:
        total += info.file_size
        stored = info.compress_type == zipfile.ZIP_STORED
        if (stored and info.file_size > len(data)) or (not stored and info.file_size > 1032 * info.compress_size + 4096) \
                or total > untrusted.MAX_DECOMPRESSED_BYTES + len(data):
            raise ModelError(f"{path} is not a readable PyTorch state dict: record {show(info.filename)} declares "
                             f"{human(info.file_size)}, more than the file can hold")


def _first_line(text: str, limit: int = 160) -> str:
    """The first non-empty line of ``text`` without terminal escapes, at most ``limit`` characters."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line[:limit]


# paragraphs of torch's weights-only refusal that explain torch, not the file
_TORCH_BOILERPLATE = ("weights only load failed", "(1) ", "(2) ", "check the documentation", "please file an issue")


def _unpickling_reason(text: str) -> str:
    """The specific part of torch's weights-only refusal, whole: 'Unsupported global: GLOBAL io.open',
    'Trying to load unsupported GLOBAL os.system whose module os is blocked', 'Unsupported operand 149'.

    torch's message is paragraphs of advice around one line about the file; that line is kept (up
    to its end, never cut mid-sentence below 300 characters) and torch's advice is dropped.
    """
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    for line in (ln.strip() for ln in text.splitlines()):
        if not line or line.lower().startswith(_TORCH_BOILERPLATE):
            continue
        for cut in (" was not an allowed global", ". Please use", " Please use"):
            line = line.split(cut)[0]
        line = line.rstrip(". ")
        if len(line) > 300:
            line = line[:300].rsplit(" ", 1)[0] + " ..."
        if line:
            return line
    return "unsafe content"


def _strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in ("module.", "net.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# dtypes a weights file may hold (they are cast to the dtype of the model's tensor); anything else
# -- complex, float8, quantized, unsigned 16/32/64 -- is refused with one line
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
                    torch.int32, torch.int64, torch.uint8, torch.bool)


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """NaN/Inf in any floating tensor of ``state`` (complex and float8 are refused by :func:`cast_state`)."""
    for k, v in state.items():
        if v.layout != torch.strided:
            raise ModelError(f"{where}: weight {show(k)} is a {str(v.layout).replace('torch.', '')} tensor, "
                             f"which bcu does not load")
        if v.dtype not in SUPPORTED_DTYPES:
            raise ModelError(f"{where}: weight {show(k)} has dtype {str(v.dtype).replace('torch.', '')}, "
                             f"which bcu does not load")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ModelError(f"{where}: weight {show(k)} contains NaN or Inf")


def cast_state(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], where: str) -> Dict[str, torch.Tensor]:
    """``state``'s tensors cast to the dtypes of ``own`` (the model's), checked before and after the
    cast: an unsupported dtype is refused, and NaN/Inf is refused in the file's values and in the
    cast ones (a float64 of 1e300 becomes Inf as float32)."""
    check_finite(state, where)
    out = {}
    for k, v in state.items():
        target = own[k].dtype if k in own else v.dtype
        c = v.to(target)
        if c.is_floating_point() and not torch.isfinite(c).all():
            raise ModelError(f"{where}: weight {show(k)} overflows to Inf as {str(target).replace('torch.', '')}")
        out[k] = c
    return out


def match_state(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], spec: ModelSpec,
                where: str) -> None:
    """Keys and shapes of ``state`` against the model's ``own`` (real or meta), one line on a mismatch."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelError(f"{where} does not match architecture {spec.arch!r}: "
                         + (f"missing {show(missing[0])}" if missing else f"unexpected {show(unexpected[0])}")
                         + f" ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            if v.dim() >= 1 and state[k].dim() == v.dim() and v.shape[0] == spec.num_classes and \
                    state[k].shape[0] != v.shape[0] and k.endswith(("weight", "bias")) and _is_last(own, k):
                raise ModelError(f"{where} has {state[k].shape[0]} output classes, not num_classes="
                                 f"{spec.num_classes}")
            raise ModelError(f"{where}: {k!r} has shape {tuple(state[k].shape)}, architecture "
                             f"{spec.arch!r} expects {tuple(v.shape)}")


def load_state_into(model: Classifier, state: Dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model.net`` strictly, with one clear line on any mismatch."""
    own = model.net.state_dict()
    match_state(own, state, model.spec, where)
    model.net.load_state_dict(cast_state(state, own, where), strict=True)


def _is_last(state: Mapping[str, torch.Tensor], key: str) -> bool:
    keys = [k for k in state if k.endswith(("weight", "bias"))]
    return key in keys[-2:]


def read_hub_config(path: Path) -> Dict[str, Any]:
    """The sidecar fields of a Hub-style folder's ``config.json`` (untrusted: bounded, every field checked)."""
    data = parse_json(read_bounded(path, untrusted.MAX_SIDECAR_BYTES, "model configs", ModelError), f"{path}",
                      ModelError)
    return spec_from_hub_config(data, str(path))


def load_model(path: Union[str, Path], arch: Optional[str] = None, num_classes: Optional[int] = None,
               input_shape: Optional[Tuple[int, int, int]] = None, mean: Optional[Tuple[float, ...]] = None,
               std: Optional[Tuple[float, ...]] = None, norm: Optional[str] = None,
               **kwargs: Any) -> Tuple[Classifier, Dict[str, Any]]:
    """Load a model safely. Returns (model in eval mode, info with 'sha256', 'sidecar', 'path', 'format',
    and 'inferred' when the architecture was inferred).

    A safetensors file needs its sidecar (or ``arch`` and friends). A torch state dict without a
    sidecar or ``arch`` has its architecture inferred from its keys and shapes
    (:mod:`bcu.models.infer`); a BackdoorBench ``attack_result.pt`` supplies the state dict,
    architecture, classes, input shape and its data set's normalisation (:mod:`bcu.attack_result`);
    a Hub-style folder (``config.json`` + ``model.safetensors``, as timm writes it) describes
    itself. Explicit arguments override all of these (``kwargs`` are constructor options,
    ``--arch-opt``), ``norm`` (``"timm"``, ``"torchvision"``) takes mean/std from the library's
    pretrained config, and any disagreement between the weights and the architecture is a ModelError.

    >>> model, info = load_model("resnet18.pt", arch="torchvision:resnet18", num_classes=10,
    ...                          input_shape=(3, 32, 32), norm="torchvision")       # doctest: +SKIP
    """
    weights, side = resolve_model_path(path)
    suffix = weights.suffix.lower()
    defaults: Dict[str, Any] = {}
    note: Optional[str] = None
    if suffix in TORCH_EXTENSIONS and is_attack_result(weights):
        state, digest, defaults, note = _read_attack_result(weights, arch)
        side = None
    elif suffix == ".safetensors":
        state, digest = _read_safetensors(weights)
    elif suffix in TORCH_EXTENSIONS:
        state, digest = _read_torch(weights)
    else:
        raise ModelError(f"{weights}: unsupported model file (use .safetensors with a sidecar, or "
                         f"{'/'.join(TORCH_EXTENSIONS)} with --arch)")
    state = _strip_prefixes(state)
    sidecar: Dict[str, Any] = {}
    hub = side is not None and side.name == HUB_CONFIG
    if hub:
        sidecar = read_hub_config(side)
    elif side is not None and side.is_file():
        sidecar = read_sidecar(side)
    elif arch is None and not defaults:
        if suffix == ".safetensors":
            raise ModelError(f"{weights} has no sidecar {weights.with_suffix('.json').name}; pass --arch "
                             f"(and --num-classes, --input-shape) to say what it is")
        found = infer_architecture(state, str(weights), num_classes=num_classes, input_shape=input_shape)
        defaults = {"arch": found.arch, "num_classes": found.num_classes, "input_shape": found.input_shape,
                    "kwargs": dict(found.kwargs)}
        note = found.describe()
    if sidecar.get("sha256") and sidecar["sha256"] != digest:
        raise ModelError(f"{weights} does not match the SHA-256 in its sidecar (modified or corrupt)")
    merged = {**defaults, **sidecar}
    for key, val in (("arch", arch), ("num_classes", num_classes), ("input_shape", input_shape),
                     ("mean", mean), ("std", std)):
        if val is not None:
            merged[key] = val
    if not isinstance(merged.get("kwargs", {}), dict):
        raise ModelError(f"{side or 'model options'}: kwargs: expected a table, got {show(merged['kwargs'])}")
    if kwargs:
        merged["kwargs"] = {**merged.get("kwargs", {}), **kwargs}
    if norm is not None:
        if mean is not None or std is not None:
            raise ModelError("give --norm or --mean/--std, not both")
        if not isinstance(merged.get("arch"), str):
            raise ModelError(f"--norm {norm} needs an architecture (--arch)")
        shape = merged.get("input_shape") or (1,)
        try:
            merged["mean"], merged["std"] = library_normalization(merged["arch"], int(shape[0]), norm)
        except ConfigError as e:
            raise ModelError(str(e)) from None
    if "mean" in merged and "std" not in merged or "std" in merged and "mean" not in merged:
        raise ModelError("give both mean and std for the input normalisation")
    if hub:
        for key, flag in (("input_shape", "--input-shape"), ("mean", "--mean/--std or --norm timm")):
            if key not in merged:
                raise ModelError(f"{side} records no {key} (pretrained_cfg); pass {flag}")
    spec = spec_from_sidecar(merged, str(side) if side else "model options")
    check_finite(state, str(weights))  # dtypes and NaN/Inf before anything is built
    try:  # built on the meta device first: the weights file bounds what is allocated
        model = build(spec, check_state=lambda own: match_state(own, state, spec, str(weights)))
    except ConfigError as e:
        raise ModelError(str(e)) from None
    load_state_into(model, state, str(weights))
    model.eval()
    info: Dict[str, Any] = {"sha256": digest, "sidecar": {} if hub else sidecar, "path": str(weights),
                            "format": "hub" if hub else ("bcu" if sidecar else "state dict")}
    if note:
        info["inferred"] = note
    return model, info


# --------------------------------------------------------------------------------------------------
# verifying a model folder: the card and timm's config.json against the weights

CARD_NAME = "README.md"


def card_metadata(path: Path) -> Optional[Dict[str, Any]]:
    """The YAML front matter of a model card (``README.md``), or None when the file has none."""
    text = read_bounded(path, untrusted.MAX_SIDECAR_BYTES, "model cards", ModelError).decode("utf-8", "replace")
    if not text.startswith("---\n"):
        return None
    end = text.find("\n---", 4)
    if end < 0:
        raise ModelError(f"model card {path}: the front matter (--- ... ---) is not closed")
    try:
        meta = yaml_load(text[4:end], f"model card {path}")
    except ConfigError as e:
        raise ModelError(str(e)) from None
    return meta if isinstance(meta, dict) else None


def verify_folder(model: Classifier, info: Mapping[str, Any]) -> list:
    """What ``bcu verify`` checks beyond the sidecar: the model card's SHA-256 and, in a folder that
    also holds timm's ``config.json``, that it describes the same network. Returns what was checked;
    a disagreement is a ModelError."""
    folder = Path(info["path"]).parent
    checked = []
    card = folder / CARD_NAME
    if card.is_file():
        meta = card_metadata(card)
        recorded = (meta or {}).get("bcu", {}).get("model_sha256") if isinstance((meta or {}).get("bcu"), dict) else None
        if recorded is not None:
            if recorded != info["sha256"]:
                raise ModelError(f"model card {card} records sha256 {show(recorded)}, but the weights are "
                                 f"{info['sha256']}: the card describes other weights")
            checked.append("model card")
    hub = folder / HUB_CONFIG
    if info.get("format") == "bcu" and hub.is_file():
        cfg = read_hub_config(hub)
        spec = model.spec
        for key, want in (("arch", spec.arch), ("num_classes", spec.num_classes),
                          ("input_shape", tuple(spec.input_shape))):
            if key in cfg and cfg[key] != want:
                raise ModelError(f"{hub} says {key} {show(cfg[key])}, the sidecar {show(want)}")
        checked.append("config.json")
    return checked


def _read_attack_result(path: Path, arch: Optional[str]) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, Any], str]:
    """(state, sha256, spec defaults, what was inferred) of a BackdoorBench ``attack_result.pt``."""
    try:
        res = read_attack_result(path, with_test=False)
    except DataError as e:
        raise ModelError(str(e)) from None
    defaults: Dict[str, Any] = {"num_classes": res.num_classes, "input_shape": res.input_shape}
    norm = res.normalization
    if norm is not None:
        defaults["mean"], defaults["std"] = norm
    where = f"BackdoorBench attack result (model_name {res.model_name!r}, data {res.clean_data or 'unknown'!r}"
    if arch is None:
        found = infer_model(res)
        defaults.update(arch=found.arch, kwargs=dict(found.kwargs))
        note = f"{where}): {found.describe()}"
    else:
        note = f"{where}): architecture {arch} as given"
    if norm is None:
        note += "; no known normalisation for its data set (pass --mean/--std)"
    return res.state, res.sha256, defaults, note
