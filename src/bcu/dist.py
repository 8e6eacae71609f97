"""More than one process: torch.distributed, the way ``torchrun`` sets it up.

``torchrun --nproc-per-node N -m bcu cleanse ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`bcu.train.fit` then calls :func:`init` (NCCL on CUDA, gloo on CPU), wraps the model in
DistributedDataParallel and gives each rank a disjoint slice of every epoch's permutation. Only
rank 0 writes anything (:func:`is_main`); the others wait at a :func:`barrier`.

Without those variables every function here is a no-op for one process.
"""
from __future__ import annotations

import atexit
import gc
import io
import os
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as td


def launched() -> bool:
    """True when started by torchrun (or anything else that sets WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    """True when a process group with more than one process is initialised."""
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    if td.is_available() and td.is_initialized():
        return td.get_rank()
    try:
        return int(os.environ.get("RANK", "0")) if launched() else 0
    except ValueError:
        return 0


def world_size() -> int:
    if td.is_available() and td.is_initialized():
        return td.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0
    except ValueError:
        return 0


def is_main() -> bool:
    """The process that writes outputs: rank 0, or the only process."""
    return rank() == 0


def device_for(device: str) -> str:
    """``cuda`` -> ``cuda:<LOCAL_RANK>`` under torchrun (one GPU per process); anything else unchanged."""
    if launched() and device == "cuda":
        return f"cuda:{local_rank()}"
    return device


def init(device: Any = "cpu") -> bool:
    """Initialise the process group if torchrun launched us and nobody has yet; True when distributed.

    ``torch._dynamo`` is imported *before* the group exists: DistributedDataParallel imports it on
    construction, and imported after ``init_process_group`` it keeps a reference to the group that
    :func:`shutdown` cannot drop, so gloo's worker threads outlive ``destroy_process_group``. A
    worker thread still releasing a finished collective's tensors while the interpreter finalizes
    then needs the GIL, cannot get it, and aborts the process ("terminate called without an active
    exception", SIGABRT; torchrun then SIGTERMs the other rank). See docs/distributed.md.
    """
    if not launched() or not td.is_available():
        return False
    if not td.is_initialized():
        import torch._dynamo  # noqa: F401  (before the group: see above)

        dev = torch.device(device)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev.index if dev.index is not None else local_rank())
        try:
            minutes = int(os.environ.get("BCU_DIST_TIMEOUT_MIN", "30"))
        except ValueError:
            minutes = 30
        td.init_process_group(backend=backend, timeout=timedelta(minutes=max(1, minutes)))
        global _ATEXIT
        if not _ATEXIT:  # a run that ends by an exception still tears the group down before finalization
            atexit.register(shutdown, False)
            _ATEXIT = True
    return td.get_world_size() > 1


_ATEXIT = False


def barrier() -> None:
    if active():
        td.barrier()


def shutdown(sync: bool = True) -> None:
    """Tear the process group down while the interpreter is fully alive, in this order: a barrier
    (no rank leaves while another still has collectives in flight), a garbage collection (the
    DistributedDataParallel wrapper of the last fit sits in reference cycles and holds the group),
    then ``destroy_process_group``, which drops the last reference: gloo joins its worker threads.
    No thread of the group survives into interpreter shutdown (tests/test_dist.py checks)."""
    if not (td.is_available() and td.is_initialized()):
        return
    if sync and active():
        td.barrier()
    gc.collect()
    td.destroy_process_group()
    gc.collect()


def _comm_device() -> torch.device:
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_state(state: Optional[Any], src: int = 0) -> Optional[Any]:
    """Send ``state`` (tensors, numbers, strings, lists, dicts) from ``src`` to every rank.

    Serialised with torch.save and read back with ``weights_only=True`` (never a pickle of
    arbitrary objects).
    """
    if not active():
        return state
    dev = _comm_device()
    if rank() == src:
        buf = io.BytesIO()
        torch.save({"state": state}, buf)
        payload = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).to(dev)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=dev)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=dev)
    td.broadcast(size, src)
    if rank() != src:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    td.broadcast(payload, src)
    if rank() == src:
        return state
    return torch.load(io.BytesIO(payload.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)["state"]


def broadcast_flag(flag: bool, src: int = 0) -> bool:
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    td.broadcast(t, src)
    return bool(t.item())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64 tensor over ranks (returned on CPU)."""
    if not active():
        return values
    t = values.to(_comm_device())
    td.all_reduce(t, op=td.ReduceOp.SUM)
    return t.cpu()
