"""The one training loop that attacks and defenses share.

``fit`` runs SGD epochs over resident uint8 data with batch-level augmentation, calls an
*objective* for the loss of each batch (cross-entropy for attacks and label-using defenses,
distillation for bcu), schedules the learning rate, shows progress, checkpoints every epoch for
``--resume`` and keeps a per-epoch history. Randomness comes from one generator per epoch seeded
from ``(seed, epoch)``, so a resumed run is bit-identical to an uninterrupted one on CPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import check
from .data import AugmentConfig, ImageSet, augment, batches, to_float
from .errors import BcuError, DataError, Interrupted, show
from .progress import progress_bar
from . import seeding


@dataclass
class OptimConfig:
    """An optimiser with a learning-rate schedule (defaults: the BCU paper's distillation settings, SGD)."""

    epochs: int = field(default=100, metadata={"help": "training epochs"})
    batch_size: int = field(default=256, metadata={"help": "images per step"})
    optimizer: Literal["sgd", "adam", "adamw"] = field(default="sgd", metadata={
        "help": "sgd (momentum, nesterov), adam (L2 weight decay added to the gradient) or adamw (decoupled "
                "weight decay, Loshchilov & Hutter)"})
    lr: float = field(default=0.01, metadata={"help": "initial learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    betas: Tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam/AdamW betas"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay"})
    nesterov: bool = False
    schedule: Literal["cosine", "step", "constant"] = field(default="cosine", metadata={"help": "lr schedule"})
    milestones: Tuple[float, ...] = field(default=(0.5, 0.75), metadata={"help": "step schedule: fractions of epochs"})
    gamma: float = 0.1
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the model being trained (not in the paper; pays on CUDA, rarely on CPU)"})

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1), got {self.betas}")

    def build(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The configured optimiser over ``params``."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   nesterov=self.nesterov and self.momentum > 0)
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)

    def lr_at(self, epoch: int) -> float:
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(epoch >= m * self.epochs for m in self.milestones)
        return self.lr


class Objective(Protocol):
    """Loss of one batch: ``(model, x, y_or_None, step) -> (loss, {metric: value})``."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor],
                 step: "Step") -> Tuple[torch.Tensor, Dict[str, float]]: ...


@dataclass
class Step:
    """What an objective may know about where training is."""

    epoch: int
    epochs: int
    generator: torch.Generator


EpochHook = Callable[[int, nn.Module], Optional[Dict[str, Any]]]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return seeding.generator(int(seed) * 1_000_003 + int(epoch) * 7919 + 17)


def cross_entropy_objective(model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor],
                            step: Step) -> Tuple[torch.Tensor, Dict[str, float]]:
    if y is None:
        raise DataError("this training objective needs labels")
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    return loss, {"loss": float(loss.detach()), "acc": float((logits.argmax(1) == y).float().mean()) * 100}


def _uses_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def memory_format_for(model: nn.Module, channels_last: Optional[bool]) -> torch.memory_format:
    """channels_last where it pays (conv nets; measured +9-19% training on CPU here)."""
    use = _uses_conv2d(model) if channels_last is None else channels_last
    return torch.channels_last if use else torch.contiguous_format


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -------------------------------------------------------------------------------------------------
# resume checkpoints: what they record, and everything checked before one is used

_FINGERPRINT: "contextvars.ContextVar[Optional[Dict[str, Any]]]" = contextvars.ContextVar(
    "bcu_resume_fingerprint", default=None)
MAX_HISTORY_KEYS = 64


@contextlib.contextmanager
def resume_fingerprint(fingerprint: Dict[str, Any]):
    """Inside this block every resume checkpoint records ``fingerprint`` (the hashes of the inputs
    and the full config of the run), and a checkpoint read back must record the same, or
    :class:`~bcu.errors.ResumeMismatch` names the first difference. The CLI wraps each command."""
    token = _FINGERPRINT.set(json.loads(json.dumps(fingerprint, default=str)))  # plain JSON values
    try:
        yield
    finally:
        _FINGERPRINT.reset(token)


def _first_difference(saved: Any, now: Any, where: str = "") -> Optional[Tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in list(now) + [k for k in saved if k not in now]:
            d = _first_difference(saved.get(k, "<missing>"), now.get(k, "<missing>"), f"{where}{k}.")
            if d:
                return d
        return None
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        for i, (a, b) in enumerate(zip(saved, now)):
            d = _first_difference(a, b, f"{where}{i}.")
            if d:
                return d
        return None
    return None if saved == now and type(saved) is type(now) else (where.rstrip("."), saved, now)


def _save_resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int,
                 history: List[Dict[str, Any]], extra: Dict[str, Any]) -> None:
    from .checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                "history": history, "extra": extra, "fingerprint": _FINGERPRINT.get()}, buf)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / "state.pt", buf.getvalue())


def read_checkpoint(f: Path) -> Optional[Dict[str, Any]]:
    """A resume checkpoint file as a dict (None when there is none): a regular file of at most
    :data:`bcu.untrusted.MAX_CHECKPOINT_BYTES`, read with ``weights_only=True``, recording the
    inputs and settings of this run (see :func:`resume_fingerprint`)."""
    from .checkpoint import _check_zip_members
    from .errors import ModelError, ResumeMismatch
    from .untrusted import MAX_CHECKPOINT_BYTES, read_bounded

    if not os.path.lexists(f):
        return None
    raw = read_bounded(f, MAX_CHECKPOINT_BYTES, "resume checkpoints", BcuError)
    try:
        _check_zip_members(raw, f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # a checkpoint cut short by a kill: say so, never guess
        kind = "ModelError" if isinstance(e, ModelError) else type(e).__name__
        raise BcuError(f"resume checkpoint {f} is unreadable ({kind}); start again without --resume") from None
    if not isinstance(obj, dict):
        raise BcuError(f"resume checkpoint {f} is malformed (not a table of fields); start again without --resume")
    expected = _FINGERPRINT.get()
    if expected is not None:
        saved = obj.get("fingerprint")
        if not isinstance(saved, dict):
            raise ResumeMismatch(f"resume checkpoint {f} does not record its inputs and settings (an older bcu?): "
                                 f"start again without --resume")
        d = _first_difference(saved, expected)
        if d:
            key, was, now = d
            raise ResumeMismatch(f"resume checkpoint {f} was written for other inputs or settings: {key} is "
                                 f"{show(was)} there, {show(now)} now; run the command it was started with, or start "
                                 f"again without --resume")
    return obj


def load_resume(path: Path) -> Optional[Dict[str, Any]]:
    """The checkpoint in ``path/state.pt`` (see :func:`read_checkpoint`); fields are checked by fit."""
    return read_checkpoint(path / "state.pt")


def _malformed(f: Path, field: str, why: str) -> BcuError:
    return BcuError(f"resume checkpoint {f} is malformed ({field}: {why}); start again without --resume")


def _plain_number(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, int) and abs(v) < 2 ** 63) or (isinstance(v, float) and math.isfinite(v))


def check_state_dict(state: Any, own: Dict[str, torch.Tensor], f: Path, field: str = "model") -> Dict[str, torch.Tensor]:
    """A saved state dict against the module's own: same keys, shapes, castable dtypes, finite values."""
    from .checkpoint import SUPPORTED_DTYPES

    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise _malformed(f, field, "not a table of named tensors")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise _malformed(f, field, f"it does not match this architecture: {'missing' if missing else 'unexpected'} "
                                   f"{show((missing or unexpected)[0])} (was the model or its options changed?)")
    out = {}
    for k, v in own.items():
        s = state[k]
        if s.layout != torch.strided or s.dtype not in SUPPORTED_DTYPES:
            raise _malformed(f, field, f"{show(k)} has an unsupported dtype {s.dtype}")
        if tuple(s.shape) != tuple(v.shape):
            raise _malformed(f, field, f"{show(k)} has shape {tuple(s.shape)}, this architecture expects "
                                       f"{tuple(v.shape)} (was the model or its options changed?)")
        c = s.to(v.dtype)
        if c.is_floating_point() and not torch.isfinite(c).all():
            raise _malformed(f, field, f"{show(k)} holds NaN or Inf")
        out[k] = c
    return out


def _restore(state: Dict[str, Any], f: Path, model: nn.Module, opt: torch.optim.Optimizer,
             optim: "OptimConfig") -> Tuple[int, List[Dict[str, Any]], Dict[str, Any]]:
    """Check every field of a resume checkpoint, then load it: (first epoch to run, history, extra)."""
    epoch = state.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < optim.epochs:
        raise _malformed(f, "epoch", f"expected a finished epoch in [0, {optim.epochs - 1}], got "
                                     f"{show(epoch)}")
    history = state.get("history")
    if not isinstance(history, list) or len(history) != epoch + 1:
        raise _malformed(f, "history", f"expected one row for each of the {epoch + 1} finished epochs")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or len(row) > MAX_HISTORY_KEYS or row.get("epoch") != i + 1 or not all(
                isinstance(k, str) and len(k) <= 64 and (_plain_number(v) or (isinstance(v, str) and len(v) <= 256))
                for k, v in row.items()):
            raise _malformed(f, "history", f"row {i + 1} is not a table of numbers for epoch {i + 1}")
    extra = state.get("extra", {})
    if not isinstance(extra, dict) or not isinstance(extra.get("stopped", False), bool):
        raise _malformed(f, "extra", "expected a table with a true/false 'stopped'")
    model_state = check_state_dict(state.get("model"), model.state_dict(), f)
    saved_opt = state.get("optimizer")
    if not isinstance(saved_opt, dict) or not isinstance(saved_opt.get("state"), dict) or not isinstance(
            saved_opt.get("param_groups"), list):
        raise _malformed(f, "optimizer", "not an optimizer state")
    from .checkpoint import SUPPORTED_DTYPES

    for entry in saved_opt["state"].values():
        if not isinstance(entry, dict) or not all(
                not isinstance(v, torch.Tensor) or (v.layout == torch.strided and v.dtype in SUPPORTED_DTYPES)
                for v in entry.values()):
            raise _malformed(f, "optimizer", "its state holds something else than tensors of a supported dtype")
    current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        model.load_state_dict(model_state)
        opt.load_state_dict(saved_opt)
    except Exception as e:  # group sizes, missing keys, wrong types: torch names it
        raise _malformed(f, "optimizer", _first_line_of(e)) from None
    for group, settings in zip(opt.param_groups, current):  # hyper-parameters come from this run's config
        group.update(settings)
    for group in opt.param_groups:
        for p in group["params"]:
            for name, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and (tuple(v.shape) != tuple(p.shape) or (
                        v.is_floating_point() and not torch.isfinite(v).all())):
                    raise _malformed(f, "optimizer", f"{name} does not match its parameter")
                if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point() and not torch.isfinite(v):
                    raise _malformed(f, "optimizer", f"{name} is not finite")
    return epoch + 1, list(history), extra


def _first_line_of(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _check_batch_norm(model: nn.Module, shape: Tuple[int, ...], batch: int, dev: torch.device,
                      fmt: torch.memory_format) -> None:
    """A batch of ``batch`` images must give every BatchNorm layer more than one value per channel
    (else training fails inside torch); tried once, in eval mode, on an all-zero batch."""
    from .errors import ConfigError

    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch > 1 or not norms:
        return
    seen: List[Tuple[str, Tuple[int, ...]]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=n: seen.append((name, tuple(inp[0].shape))))
             for n, m in norms]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((batch, *shape), device=dev).contiguous(memory_format=fmt))
    except Exception:  # the model cannot run this input at all: training will say why
        return
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    for name, s in seen:
        if s and s[0] * math.prod(s[2:]) <= 1:
            raise ConfigError(f"batch_size {batch} is too small for this model: its BatchNorm layer {name} would see "
                              f"one value per channel on {'x'.join(map(str, shape))} images (use a batch size >= 2)")


def _chunks(order: torch.Tensor, batch_size: int, drop_last: bool) -> List[torch.Tensor]:
    n = len(order)
    stop = n - (n % batch_size) if drop_last and n > batch_size else n
    return [order[s:s + batch_size] for s in range(0, stop, batch_size)]


def _epoch_batches(data: Any, resident: Optional[ImageSet], chunks: List[torch.Tensor], dev: torch.device,
                   with_labels: bool) -> Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(uint8 images on ``dev``, labels or None) for each index chunk, in order."""
    if resident is not None:
        images, labels = resident.images, resident.labels
        for idx in chunks:
            idx = idx.to(images.device)
            yield images[idx], (labels[idx] if labels is not None else None)
        return
    for x, y in data.iter_batches(chunks, with_labels=with_labels, pin_memory=dev.type == "cuda"):
        yield x.to(dev, non_blocking=True), (y.to(dev, non_blocking=True) if y is not None else None)


def _compiled(model: nn.Module, enabled: bool) -> nn.Module:
    if not enabled:
        return model
    try:
        return torch.compile(model, dynamic=False)  # type: ignore[return-value]
    except Exception as e:  # no compiler toolchain on this machine: run eagerly, say so
        import warnings

        warnings.warn(f"torch.compile unavailable ({type(e).__name__}); running eagerly")
        return model


def fit(model: nn.Module, data: Any, objective: Objective, optim: OptimConfig, *,
        augment_cfg: Optional[AugmentConfig] = None, seed: int = 0, device: str = "cpu",
        with_labels: bool = True, params: Optional[Iterable[nn.Parameter]] = None,
        epoch_hook: Optional[EpochHook] = None, resume_dir: Optional[Path] = None,
        channels_last: Optional[bool] = None, desc: str = "train",
        progress: Optional[bool] = None, drop_last: bool = True) -> List[Dict[str, Any]]:
    """Train ``model`` in place; returns the per-epoch history.

    ``data`` is an :class:`~bcu.data.ImageSet` (moved to the device once, batches gathered by
    index) or a :class:`~bcu.stream.StreamingImages` (batches read from disk by DataLoader
    workers); either way each batch gets the same tensor augmentation from the same per-epoch
    generator, so both sources give identical batches for the same seed.
    ``with_labels=False`` hands the objective ``y=None`` and never touches ``data.labels``.
    ``epoch_hook(epoch, model)`` may return metrics to log and ``{"stop": True}`` to end early.
    With ``resume_dir``, state is saved after every epoch and restored from there when present.

    Under ``torchrun`` (see :mod:`bcu.dist`) the model is wrapped in DistributedDataParallel, each
    rank trains on a disjoint slice of every epoch's permutation with ``batch_size / world`` images
    a step (the global batch stays ``batch_size``), and only rank 0 writes the resume state.
    """
    from . import dist as bdist
    from .stream import is_streaming

    if len(data) == 0:
        raise DataError("no training images")
    streaming = is_streaming(data)
    dev = torch.device(bdist.device_for(str(device)))
    distributed = bdist.init(dev)
    rank, world = (bdist.rank(), bdist.world_size()) if distributed else (0, 1)
    main = rank == 0
    fmt = memory_format_for(model, channels_last)
    model.to(dev, memory_format=fmt)
    _ordinary_tensors(model)
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = optim.build(params)
    history: List[Dict[str, Any]] = []
    start = 0
    state = load_resume(resume_dir) if (resume_dir is not None and main) else None
    if distributed:
        state = bdist.broadcast_state(state)
    if state is not None:
        start, history, extra = _restore(state, Path(resume_dir) / "state.pt", model, opt, optim)
        if extra.get("stopped"):
            start = optim.epochs
        if hasattr(epoch_hook, "restore"):  # stateful hooks (early stopping) replay the saved history
            epoch_hook.restore(history)
    if augment_cfg is not None:
        augment_cfg.check_images(data.shape)
    batch_size = optim.batch_size
    run_model: nn.Module = model
    if distributed:
        if batch_size < world:
            raise DataError(f"batch_size {batch_size} is smaller than the {world} processes")
        batch_size //= world
        if len(data) // world < 1:
            raise DataError(f"{len(data)} images cannot be shared by {world} processes")
        from torch.nn.parallel import DistributedDataParallel as DDP

        run_model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    per_rank = len(data) // world if distributed else len(data)
    smallest = min((len(c) for c in _chunks(torch.arange(per_rank), batch_size, drop_last)), default=batch_size)
    _check_batch_norm(model, tuple(data.shape), smallest, dev, fmt)
    run_model = _compiled(run_model, getattr(optim, "compile", False))
    resident: Optional[ImageSet] = None
    if not streaming:
        labels = data.labels.to(dev) if (with_labels and data.labels is not None) else None
        resident = ImageSet(data.images.to(dev), labels, None, data.name)  # labels dropped unless asked for
    n = len(data)
    bar = progress_bar(total=optim.epochs, initial=start, desc=desc, unit="ep",
                       disable=(not main) or (None if progress is None else not progress))
    stopped = False
    try:
        for epoch in range(start, optim.epochs):
            t0 = time.time()
            lr = optim.lr_at(epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            gen = epoch_generator(seed, epoch)
            order = torch.randperm(n, generator=gen)  # the same on every rank
            if distributed:
                per = n // world
                order = order[rank * per:(rank + 1) * per]
                if rank > 0:  # rank 0 keeps drawing from gen (one process == rank 0 of one)
                    gen = epoch_generator(seed * 7919 + rank, epoch + 1_000_000)
            step = Step(epoch, optim.epochs, gen)
            model.train()
            sums: Dict[str, float] = {}
            count = 0
            for x, y in _epoch_batches(data, resident, _chunks(order, batch_size, drop_last), dev, with_labels):
                if augment_cfg is not None:  # crop/flip only move pixels: on uint8 it is 4x less memory
                    x = augment(x, augment_cfg, gen)  # traffic and the same values as on floats
                x = to_float(x).contiguous(memory_format=fmt)
                with autocast_for(dev):
                    loss, metrics = objective(run_model, x, y, step)
                if not torch.isfinite(loss):
                    raise BcuError(f"{desc}: loss became {float(loss)} at epoch {epoch + 1}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                m = x.shape[0]
                count += m
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v * m
            if distributed:  # metrics over all ranks' images
                keys = sorted(sums)
                tot = bdist.all_reduce_sum(torch.tensor([float(count)] + [sums[k] for k in keys], dtype=torch.float64))
                count, sums = int(tot[0]), {k: float(v) for k, v in zip(keys, tot[1:])}
            row: Dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
            row.update({k: v / max(count, 1) for k, v in sums.items()})
            if epoch_hook is not None:
                extra = epoch_hook(epoch, model) or {}
                stopped = bool(extra.pop("stop", False))
                row.update(extra)
            if distributed:
                stopped = bdist.broadcast_flag(stopped)  # rank 0 decides for everyone
            row["seconds"] = time.time() - t0
            history.append(row)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k not in ("epoch", "seconds", "lr")
                             and isinstance(v, float)})
            if resume_dir is not None and main:
                _save_resume(resume_dir, model, opt, epoch, history, {"stopped": stopped})
            if stopped:
                break
    except KeyboardInterrupt:
        done = history[-1]["epoch"] if history else 0
        raise Interrupted(f"{desc} interrupted after epoch {done}/{optim.epochs}") from None
    finally:
        bar.close()
    model.eval()
    return history


def _ordinary_tensors(model: nn.Module) -> None:
    """Replace parameters/buffers created under inference_mode (they cannot be trained or synced)."""
    with torch.no_grad():
        for mod in model.modules():
            for name, b in mod._buffers.items():
                if b is not None and b.is_inference():
                    mod._buffers[name] = b.clone()
            for name, p in mod._parameters.items():
                if p is not None and p.is_inference():
                    p.data = p.data.clone()


def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1024, device: str = "cpu",
            transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Logits for uint8 (or float [0, 1]) images, in eval mode, batched; returned on CPU."""
    from .data import to_float

    dev = torch.device(device)
    was_training = model.training
    model.eval()
    fmt = memory_format_for(model, None)
    model.to(dev, memory_format=fmt)  # outside inference_mode: moved weights stay ordinary tensors
    out = []
    with torch.inference_mode():
        for s in range(0, images.shape[0], batch_size):
            x = to_float(images[s:s + batch_size].to(dev))
            if transform is not None:
                x = transform(x)
            with autocast_for(dev):
                out.append(model(x.contiguous(memory_format=fmt)).float().cpu())
    model.train(was_training)
    if not out:
        return torch.empty(0)
    return torch.cat(out)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 256, device: str = "cpu") -> int:
    """Re-estimate every BatchNorm's running statistics on ``images`` (uint8 or float [0, 1]) as a
    cumulative average over one pass in train mode (parameters untouched); returns how many layers."""
    from .data import to_float

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    was = model.training
    dev = torch.device(device)
    fmt = memory_format_for(model, None)
    model.to(dev, memory_format=fmt)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for s in range(0, images.shape[0], batch_size):
            x = to_float(images[s:s + batch_size].to(dev))
            if x.shape[0] > 1:
                model(x.contiguous(memory_format=fmt))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was)
    return len(bns)
