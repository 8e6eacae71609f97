"""Writers of real on-disk formats, for loader tests (no downloads)."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_idx_dir(d: Path, n_train: int = 40, n_test: int = 20, size: int = 28, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, size, size)))
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return d


def write_cifar10_dir(d: Path, per_batch: int = 8, seed: int = 0) -> Path:
    """The python-pickle layout of cifar-10-batches-py (bytes keys, like the real files)."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        with open(d / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": per_batch}, fh)
    return d


def write_cifar100_dir(d: Path, n: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        with open(d / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                         b"coarse_labels": [0] * n}, fh)
    with open(d / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, fh)
    return d


class Marker:
    """Unpickling this creates a marker file: the proof that a loader ran foreign code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def badnets_folder(d: Path, epochs: int) -> Path:
    """`bcu attack` output of a BadNets (4x4 patch) cnn-small on 1,500 synthetic images, 400 held out."""
    from bcu.cli import main

    assert main(["attack", "--attack", "badnets", "--data", "synthetic:1500", "--out", str(d), "--epochs",
                 str(epochs), "--holdout", "400", "--set", "attack.patch_size=4", "--threads", "1",
                 "--no-progress"]) == 0
    return d
