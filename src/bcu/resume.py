"""Resume checkpoints: what ``resume/state.pt`` records, and everything checked before one is used.

:func:`bcu.train.fit` writes a checkpoint after every epoch (model, optimiser, history, the
objective's own state when it has one, and the *fingerprint* of the run: the hashes of its inputs
and its full config, see :func:`fingerprint`). A checkpoint is read back only as a regular file of
bounded size with ``weights_only=True``, only for the same fingerprint, and every field is checked
against the model and optimiser at hand before it is loaded (issue 14).
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .checkpoint import SUPPORTED_DTYPES, check_zip_members
from .errors import BcuError, ModelError, ResumeMismatch, show
from .output import atomic_write_bytes
from . import untrusted
from .untrusted import read_bounded

STATE_FILE = "state.pt"
MAX_HISTORY_KEYS = 64
_FINGERPRINT: "contextvars.ContextVar[Optional[Dict[str, Any]]]" = contextvars.ContextVar(
    "bcu_resume_fingerprint", default=None)


@contextlib.contextmanager
def fingerprint(values: Dict[str, Any]):
    """Inside this block every resume checkpoint records ``values`` (the hashes of the inputs and the
    full config of the run), and a checkpoint read back must record the same, or
    :class:`~bcu.errors.ResumeMismatch` names the first difference. Each workflow wraps its run."""
    token = _FINGERPRINT.set(json.loads(json.dumps(values, default=str)))  # plain JSON values
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


def save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, history: List[Dict[str, Any]],
         extra: Dict[str, Any], objective: Optional[Dict[str, Any]] = None) -> None:
    """Write ``path/state.pt`` atomically (``objective``: the objective's own state, when it has one)."""
    buf = io.BytesIO()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "history": history,
             "extra": extra, "fingerprint": _FINGERPRINT.get()}
    if objective is not None:
        state["objective"] = objective
    torch.save(state, buf)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / STATE_FILE, buf.getvalue())


def read_checkpoint(f: Path) -> Optional[Dict[str, Any]]:
    """A resume checkpoint file as a dict (None when there is none): a regular file of at most
    :data:`bcu.untrusted.MAX_CHECKPOINT_BYTES`, read with ``weights_only=True``, recording the
    inputs and settings of this run (see :func:`fingerprint`)."""
    if not os.path.lexists(f):
        return None
    raw = read_bounded(f, untrusted.MAX_CHECKPOINT_BYTES, "resume checkpoints", BcuError)
    try:
        check_zip_members(raw, f)
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


def load(path: Path) -> Optional[Dict[str, Any]]:
    """The checkpoint in ``path/state.pt`` (see :func:`read_checkpoint`); its fields are checked by
    :func:`restore`."""
    return read_checkpoint(path / STATE_FILE)


def malformed(f: Path, field: str, why: str) -> BcuError:
    return BcuError(f"resume checkpoint {f} is malformed ({field}: {why}); start again without --resume")


def _plain_number(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, int) and abs(v) < 2 ** 63) or (isinstance(v, float) and math.isfinite(v))


def _first_line_of(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def check_state_dict(state: Any, own: Dict[str, torch.Tensor], f: Path, field: str = "model") -> Dict[str, torch.Tensor]:
    """A saved state dict against the module's own: same keys, shapes, castable dtypes, finite values."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise malformed(f, field, "not a table of named tensors")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise malformed(f, field, f"it does not match this architecture: {'missing' if missing else 'unexpected'} "
                                  f"{show((missing or unexpected)[0])} (was the model or its options changed?)")
    out = {}
    for k, v in own.items():
        s = state[k]
        if s.layout != torch.strided or s.dtype not in SUPPORTED_DTYPES:
            raise malformed(f, field, f"{show(k)} has an unsupported dtype {s.dtype}")
        if tuple(s.shape) != tuple(v.shape):
            raise malformed(f, field, f"{show(k)} has shape {tuple(s.shape)}, this architecture expects "
                                      f"{tuple(v.shape)} (was the model or its options changed?)")
        c = s.to(v.dtype)
        if c.is_floating_point() and not torch.isfinite(c).all():
            raise malformed(f, field, f"{show(k)} holds NaN or Inf")
        out[k] = c
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, saved: Any, f: Path, field: str = "optimizer") -> None:
    """Load a saved optimiser state into ``opt`` after checking it: tensors of supported dtypes, the
    shapes of their parameters, finite values. Hyper-parameters (lr, betas, ...) stay this run's."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(
            saved.get("param_groups"), list):
        raise malformed(f, field, "not an optimizer state")
    for entry in saved["state"].values():
        if not isinstance(entry, dict) or not all(
                not isinstance(v, torch.Tensor) or (v.layout == torch.strided and v.dtype in SUPPORTED_DTYPES)
                for v in entry.values()):
            raise malformed(f, field, "its state holds something else than tensors of a supported dtype")
    current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(saved)
    except Exception as e:  # group sizes, missing keys, wrong types: torch names it
        raise malformed(f, field, _first_line_of(e)) from None
    for group, settings in zip(opt.param_groups, current):  # hyper-parameters come from this run's config
        group.update(settings)
    for group in opt.param_groups:
        for p in group["params"]:
            for name, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and (tuple(v.shape) != tuple(p.shape) or (
                        v.is_floating_point() and not torch.isfinite(v).all())):
                    raise malformed(f, field, f"{name} does not match its parameter")
                if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point() and not torch.isfinite(v):
                    raise malformed(f, field, f"{name} is not finite")


def restore(state: Dict[str, Any], f: Path, model: nn.Module, opt: torch.optim.Optimizer,
            epochs: int) -> Tuple[int, List[Dict[str, Any]], Dict[str, Any]]:
    """Check every field of a resume checkpoint, then load the model and optimiser:
    (first epoch to run, history, extra)."""
    epoch = state.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < epochs:
        raise malformed(f, "epoch", f"expected a finished epoch in [0, {epochs - 1}], got {show(epoch)}")
    history = state.get("history")
    if not isinstance(history, list) or len(history) != epoch + 1:
        raise malformed(f, "history", f"expected one row for each of the {epoch + 1} finished epochs")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or len(row) > MAX_HISTORY_KEYS or row.get("epoch") != i + 1 or not all(
                isinstance(k, str) and len(k) <= 64 and (_plain_number(v) or (isinstance(v, str) and len(v) <= 256))
                for k, v in row.items()):
            raise malformed(f, "history", f"row {i + 1} is not a table of numbers for epoch {i + 1}")
    extra = state.get("extra", {})
    if not isinstance(extra, dict) or not isinstance(extra.get("stopped", False), bool):
        raise malformed(f, "extra", "expected a table with a true/false 'stopped'")
    model_state = check_state_dict(state.get("model"), model.state_dict(), f)
    saved_opt = state.get("optimizer")
    if not isinstance(saved_opt, dict) or not isinstance(saved_opt.get("state"), dict) or not isinstance(
            saved_opt.get("param_groups"), list):
        raise malformed(f, "optimizer", "not an optimizer state")
    try:
        model.load_state_dict(model_state)
    except Exception as e:
        raise malformed(f, "optimizer", _first_line_of(e)) from None
    load_optimizer_state(opt, saved_opt, f)
    return epoch + 1, list(history), extra
