"""The one training loop that attacks and defenses share.

``fit`` runs epochs of the configured optimiser (:class:`OptimConfig`: SGD, Adam or AdamW) over
an image set (:class:`~bcu.data.imageset.Images`: resident or streamed) with batch-level
augmentation, calls an *objective* for the loss of each batch (cross-entropy for attacks and
label-using defenses, distillation for bcu), schedules the learning rate, shows progress,
checkpoints every epoch for ``--resume`` (:mod:`bcu.resume`) and keeps a per-epoch history.
Randomness comes from one generator per epoch seeded from ``(seed, epoch)``, so a resumed run is
bit-identical to an uninterrupted one on CPU.

An objective is any callable ``(model, x, y_or_None, step) -> (loss, metrics)``. One that carries
state of its own across batches (a trigger generator and its optimiser, a bank of perturbations)
implements :class:`StatefulObjective`: ``fit`` saves that state in every checkpoint and restores
it on resume; one that updates something after each optimiser step implements
:class:`SteppingObjective`.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from . import dist as bdist
from . import resume, seeding
from .config import check
from .data.augment import AugmentConfig, augment
from .data.imageset import Images, to_float
from .errors import BcuError, ConfigError, DataError, Interrupted
from .progress import progress_bar


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


@runtime_checkable
class StatefulObjective(Protocol):
    """An objective whose own state must survive a resume: ``fit`` stores ``state_dict()`` in every
    checkpoint (under the run's fingerprint) and hands it back to ``load_state_dict(state, where)``,
    which checks it (see :mod:`bcu.resume`) before using it."""

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Any, where: Path) -> None: ...


@runtime_checkable
class SteppingObjective(Protocol):
    """An objective that updates something of its own after each optimiser step of the model (e.g.
    a trigger generator with its own optimiser, trained by the same backward pass)."""

    def after_step(self) -> None: ...


@dataclass
class Step:
    """What an objective may know about where training is."""

    epoch: int
    epochs: int
    generator: torch.Generator


EpochHook = Callable[[int, nn.Module], Optional[Dict[str, Any]]]


@runtime_checkable
class RestorableHook(Protocol):
    """An epoch hook with state of its own (early stopping) that a resumed run rebuilds from the history."""

    def __call__(self, epoch: int, model: nn.Module) -> Optional[Dict[str, Any]]: ...

    def restore(self, history: List[Dict[str, Any]]) -> None: ...


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


def _check_batch_norm(model: nn.Module, shape: Tuple[int, ...], batch: int, dev: torch.device,
                      fmt: torch.memory_format) -> None:
    """A batch of ``batch`` images must give every BatchNorm layer more than one value per channel
    (else training fails inside torch); tried once, in eval mode, on an all-zero batch."""
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


def _compiled(model: nn.Module, enabled: bool) -> nn.Module:
    if not enabled:
        return model
    try:
        return torch.compile(model, dynamic=False)  # type: ignore[return-value]
    except Exception as e:  # no compiler toolchain on this machine: run eagerly, say so
        warnings.warn(f"torch.compile unavailable ({type(e).__name__}); running eagerly")
        return model


def fit(model: nn.Module, data: Images, objective: Objective, optim: OptimConfig, *,
        augment_cfg: Optional[AugmentConfig] = None, seed: int = 0, device: str = "cpu",
        with_labels: bool = True, params: Optional[Iterable[nn.Parameter]] = None,
        epoch_hook: Optional[EpochHook] = None, resume_dir: Optional[Path] = None,
        channels_last: Optional[bool] = None, desc: str = "train",
        progress: Optional[bool] = None, drop_last: bool = True) -> List[Dict[str, Any]]:
    """Train ``model`` in place; returns the per-epoch history.

    ``data`` is any :class:`~bcu.data.imageset.Images`: an :class:`~bcu.data.ImageSet` (moved to
    the device once, batches gathered by index) or a :class:`~bcu.data.StreamingImages` (batches
    read from disk by DataLoader workers); either way each batch gets the same tensor augmentation
    from the same per-epoch generator, so both sources give identical batches for the same seed.
    ``with_labels=False`` hands the objective ``y=None`` and never touches ``data.labels``.
    ``epoch_hook(epoch, model)`` may return metrics to log and ``{"stop": True}`` to end early; a
    hook with ``restore(history)`` (:class:`RestorableHook`) replays a resumed run's history.
    With ``resume_dir``, state is saved after every epoch (the objective's too, when it is a
    :class:`StatefulObjective`) and restored from there when present.

    Under ``torchrun`` (see :mod:`bcu.dist`) the model is wrapped in DistributedDataParallel, each
    rank trains on a disjoint slice of every epoch's permutation with ``batch_size / world`` images
    a step (the global batch stays ``batch_size``), and only rank 0 writes the resume state.
    """
    if len(data) == 0:
        raise DataError("no training images")
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
    stateful = isinstance(objective, StatefulObjective)
    state = resume.load(resume_dir) if (resume_dir is not None and main) else None
    if distributed:
        state = bdist.broadcast_state(state)
    if state is not None:
        where = Path(resume_dir) / resume.STATE_FILE
        start, history, extra = resume.restore(state, where, model, opt, optim.epochs)
        if stateful:
            if "objective" not in state:
                raise resume.malformed(where, "objective", "the training objective's state is missing")
            objective.load_state_dict(state["objective"], where)
        if extra.get("stopped"):
            start = optim.epochs
        if isinstance(epoch_hook, RestorableHook):  # stateful hooks (early stopping) replay the saved history
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
    run_model = _compiled(run_model, optim.compile)
    source = data.on(dev, with_labels)  # resident: moved to the device once, labels dropped unless asked for
    stepping = isinstance(objective, SteppingObjective)
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
            for x, y in source.iter_batches(_chunks(order, batch_size, drop_last), with_labels=with_labels, device=dev):
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
                if stepping:
                    objective.after_step()
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
                resume.save(resume_dir, model, opt, epoch, history, {"stopped": stopped},
                            objective.state_dict() if stateful else None)
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
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 256, device: str = "cpu",
                          channels_last: Optional[bool] = None) -> int:
    """Re-estimate every BatchNorm's running statistics on ``images`` (uint8 or float [0, 1]) as a
    cumulative average over one pass in train mode (parameters untouched); returns how many layers.
    ``channels_last`` as in :func:`memory_format_for` (None: where it pays)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    was = model.training
    dev = torch.device(device)
    fmt = memory_format_for(model, channels_last)
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
