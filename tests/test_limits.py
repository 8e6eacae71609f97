"""A tiny hostile file must not take the machine (issue 14, findings 8-10).

Each case is a small file that asks for a huge allocation, an endless read or a hang: a CIFAR
batch whose array is declared far larger than the file, one of shared references, an IDX gzip
whose header claims billions of images, sidecars and attack artifacts with giant options or
shapes, a model that is a link to /dev/zero or a FIFO, a YAML alias bomb, a PNG declaring
30000x30000 pixels. They are loaded in child processes of one runner, each with an address-space
limit, an alarm and its peak memory measured; the property: one bcu error, quickly, in bounded
memory. (Before these fixes every case crashed, hung, or needed gigabytes.)
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bcu.checkpoint import save_model
from bcu.models import create_model

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX: FIFOs, links, fork, umask")
LIMIT_BYTES = 3 << 30      # address space each case (bcu included) may map beyond what importing torch mapped
EXTRA_RSS_MB = 400         # peak memory a case may add on top of the runner's own
ALARM_S = 30

RUNNER = r'''
import json, os, resource, signal, sys
LIMIT, ALARM = int(sys.argv[2]), int(sys.argv[3])
import torch
torch.set_num_threads(1)
# the limit counts from here: torch's own mappings differ by build (~0.7 GB for the 2.13 CPU wheel,
# more for the 2.14.1 CUDA build that runs on the CPU), what a hostile file makes bcu map does not
with open("/proc/self/status") as fh:
    mapped = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + LIMIT, mapped + LIMIT))
import bcu.attacks, bcu.checkpoint, bcu.config, bcu.data
from bcu.errors import BcuError

def run(kind, a):
    if kind == "load_dataset":
        return bcu.data.load_dataset(a["spec"], labels=a.get("labels", False))
    if kind == "read_idx":
        return bcu.data.read_idx(a["path"])
    if kind == "load_model":
        return bcu.checkpoint.load_model(a["path"], **a.get("kw", {}))
    if kind == "load_file":
        return bcu.config.load_file(a["path"])
    if kind == "load_attack":
        return bcu.attacks.load_attack(a["path"])
    if kind == "stream":
        return bcu.data.load_dataset(a["spec"], labels=False, stream=True, workers=0)
    raise ValueError(kind)

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0

results = {}
for name, (kind, args) in json.loads(sys.argv[1]).items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.alarm(ALARM)
        start = status_kb("VmRSS")
        try:
            run(kind, args)
            out = {"outcome": "accepted"}
        except BaseException as e:  # the property under test: only BcuError
            out = {"outcome": "bcu" if isinstance(e, BcuError) else "crash", "type": type(e).__name__,
                   "message": str(e)[:3000]}
        out["rss_mb"] = (status_kb("VmHWM") - start) / 1024  # peak memory this case added
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    results[name] = json.loads(b"".join(chunks)) if chunks else {"outcome": "killed", "status": status}
print(json.dumps(results))
'''


# -------------------------------------------------------------------------------------------------
# the hostile files


class _Reconstruct:
    """Pickles as numpy's ``_reconstruct(ndarray, shape, 'B')`` with no data: an array of any size
    from a few bytes (what a real CIFAR batch's array reduces to, minus the bytes)."""

    def __init__(self, shape):
        self.shape = shape

    def __reduce__(self):
        return np.ndarray.__reduce__(np.zeros(0, np.uint8))[0], (np.ndarray, self.shape, b"B")


def _doubling(depth: int):
    """A list of 2**depth zeros built from `depth` shared lists: a few hundred bytes pickled."""
    x = [0, 0]
    for _ in range(depth - 1):
        x = [x, x]
    return x


def cifar_dir(d: Path, batch: dict) -> Path:
    d.mkdir(parents=True)
    with open(d / "data_batch_1", "wb") as fh:
        pickle.dump(batch, fh, protocol=2)
    return d


def idx_gzip_claiming_billions(path: Path) -> Path:
    """A 2 MB gzip (concatenated members of zeros) that expands to 2 GB, whose IDX header claims
    2^31 images of 28x28."""
    header = gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">III", 2 ** 31 - 1, 28, 28))
    zeros = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    path.write_bytes(header + zeros * 32)
    return path


def png_header(path: Path, w: int, h: int) -> Path:
    """A valid PNG whose header declares w x h grayscale pixels (the pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def yaml_bomb(path: Path) -> Path:
    """The billion laughs: 9 levels of 9 aliases, ~300 bytes, 9^9 = 387 million values expanded."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("optim: {epochs: *a8}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    w = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    net = create_model("cnn-small", 10, (1, 28, 28))
    good = w / "good"
    good.mkdir()
    save_model(net, good)
    side = json.loads((good / "model.json").read_text())

    def model_with(name: str, **changes) -> str:
        d = w / name
        d.mkdir()
        (d / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
        s = {k: v for k, v in side.items() if k != "sha256"}
        s.update(changes)
        (d / "model.json").write_text(json.dumps(s))
        return str(d)

    zero = w / "zero.pt"
    zero.symlink_to("/dev/zero")
    (w / "fifo.json").write_text(json.dumps(side))  # the sidecar beside a FIFO posing as the weights
    os.mkfifo(w / "fifo.safetensors")
    os.mkfifo(w / "fifo.npz")
    os.mkfifo(w / "fifo.yaml")

    from bcu.attacks import create_attack

    att = w / "attack"
    att.mkdir()
    create_attack("blended", {}, (1, 28, 28), 10).save(att)
    meta = json.loads((att / "attack.json").read_text())
    meta["image_shape"] = [3, 60000, 60000]
    (att / "attack.json").write_text(json.dumps(meta))

    imgs = w / "bomb-png"
    imgs.mkdir()
    png_header(imgs / "bomb.png", 30000, 30000)

    return {
        "cifar_reconstruct_350000x3072": ("load_dataset", {"spec": str(cifar_dir(
            w / "c1", {b"data": _Reconstruct((350000, 3072)), b"labels": [0]}))}),
        "cifar_shared_references": ("load_dataset", {"spec": str(cifar_dir(
            w / "c2", {b"data": _doubling(30), b"labels": [0]}))}),
        "cifar_labels_shared_references": ("load_dataset", {"labels": True, "spec": str(cifar_dir(
            w / "c3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": _doubling(30)}))}),
        "cifar_memo_index_2_31": ("load_dataset", {"spec": str(cifar_dir(w / "c4", {b"data": 1}))}),
        "idx_gzip_claims_billions": ("read_idx", {"path": str(idx_gzip_claiming_billions(
            w / "train-images-idx3-ubyte.gz"))}),
        "sidecar_hidden_1000000": ("load_model", {"path": model_with("hidden", kwargs={"hidden": 1000000})}),
        "sidecar_width_1000": ("load_model", {"path": model_with("width", kwargs={"width": 1000})}),
        "sidecar_input_shape_huge": ("load_model", {"path": model_with("shape", input_shape=[3, 100000, 100000])}),
        "attack_image_shape_huge": ("load_attack", {"path": str(att)}),
        "model_link_to_dev_zero": ("load_model", {"path": str(zero), "kw": {"arch": "cnn-small"}}),
        "model_fifo": ("load_model", {"path": str(w / "fifo.safetensors")}),
        "data_fifo": ("load_dataset", {"spec": str(w / "fifo.npz")}),
        "data_fifo_stream": ("stream", {"spec": str(w / "fifo.npz")}),
        "config_fifo": ("load_file", {"path": str(w / "fifo.yaml")}),
        "config_yaml_alias_bomb": ("load_file", {"path": str(yaml_bomb(w / "bomb.yaml"))}),
        "png_30000x30000": ("load_dataset", {"spec": str(imgs)}),
    }


@pytest.fixture(scope="module")
def results(cases):
    # the memo case: a LONG_BINPUT to index 2^31 would make C pickle allocate a 16 GB memo table
    c4 = Path(cases["cifar_memo_index_2_31"][1]["spec"]) / "data_batch_1"
    c4.write_bytes(b"\x80\x02}q\x00(X\x04\x00\x00\x00dataq\x01K\x01r\xff\xff\xff\x7fu.")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cases), str(LIMIT_BYTES), str(ALARM_S)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


EXPECT = {
    "cifar_reconstruct_350000x3072": "in a file of",
    "cifar_shared_references": "'data' must be a uint8 array",
    "cifar_labels_shared_references": "labels must be a list of 2 integers",
    "cifar_memo_index_2_31": "'data' must be a uint8 array",
    "idx_gzip_claims_billions": "more than the file can hold",
    "sidecar_hidden_1000000": "more than the 500,000,000 bcu builds",
    "sidecar_width_1000": "more than the 500,000,000 bcu builds",
    "sidecar_input_shape_huge": "input_shape must be (C, H, W) with",
    "attack_image_shape_huge": "image_shape must be (C, H, W) with",
    "model_link_to_dev_zero": "is a device, not a regular file",
    "model_fifo": "is a FIFO, not a regular file",
    "data_fifo": "is a FIFO, not a regular file",
    "data_fifo_stream": "is a FIFO, not a regular file",
    "config_fifo": "is a FIFO, not a regular file",
    "config_yaml_alias_bomb": "expands to more than 100000 values",
    "png_30000x30000": "more than the 33554432 bcu decodes",
}


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_a_tiny_hostile_file_gets_one_error_in_bounded_memory(results, name):
    r = results[name]
    assert r["outcome"] == "bcu", r
    assert EXPECT[name] in r["message"] and "\n" not in r["message"] and len(r["message"]) <= 1001, r
    assert r["rss_mb"] < EXTRA_RSS_MB, r


def test_the_hostile_files_are_small(cases):
    """The point of the cases: each is tiny on disk (the IDX one is a 2 MB gzip)."""
    for name, (_, args) in cases.items():
        p = Path(args.get("spec") or args["path"])
        files = [f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file() and not f.is_symlink()]
        assert sum(f.stat().st_size for f in files) < (3 << 20) + 400_000, name


@pytest.mark.parametrize("limit,load,expect", [
    ("MAX_SIDECAR_BYTES", "sidecar", "more than the 64 bytes bcu reads for sidecars"),
    ("MAX_MODEL_BYTES", "model", "more than the 64 bytes bcu reads for model weights"),
    ("MAX_CONFIG_BYTES", "config", "more than the 64 bytes bcu reads for config files"),
    ("MAX_ATTACK_JSON_BYTES", "attack", "more than the 64 bytes bcu reads for attack artifact"),
    ("MAX_ATTACK_TENSOR_BYTES", "attack", "more than the 64 bytes bcu reads for attack tensors"),
    ("MAX_PICKLE_BYTES", "cifar", "more than the 64 bytes bcu reads for CIFAR batches"),
    ("MAX_RESIDENT_BYTES", "npz", "more than the 64 bytes bcu loads into memory (use --stream"),
    ("MAX_RESIDENT_BYTES", "folder", "more than the 64 bytes bcu loads into memory (use --stream"),
])
def test_each_size_limit_is_enforced(tmp_path, monkeypatch, limit, load, expect):
    """Every limit of docs/security.md's table, lowered to 64 bytes, refuses a genuine file of its kind."""
    import bcu.untrusted
    from bcu.attacks import create_attack, load_attack
    from bcu.checkpoint import load_model
    from bcu.config import load_file
    from bcu.data import load_dataset, make_synthetic
    from bcu.errors import BcuError
    from PIL import Image

    d = tmp_path / "x"
    d.mkdir()
    if load in ("sidecar", "model"):
        save_model(create_model("cnn-small", 10, (1, 28, 28)), d)
        run = lambda: load_model(d)  # noqa: E731
    elif load == "config":
        (d / "c.yaml").write_text("optim: {epochs: 3, batch_size: 32, lr: 0.01}\nreinit: {head: 0.2}\n" * 3)
        run = lambda: load_file(d / "c.yaml")  # noqa: E731
    elif load == "attack":
        create_attack("blended", {}, (1, 28, 28), 10).save(d)
        run = lambda: load_attack(d)  # noqa: E731
    elif load == "cifar":
        with open(d / "data_batch_1", "wb") as fh:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, fh, protocol=2)
        run = lambda: load_dataset(d, labels=False)  # noqa: E731
    elif load == "npz":
        np.savez(d / "x.npz", x=make_synthetic(8, (1, 28, 28), 10).images.numpy())
        run = lambda: load_dataset(d / "x.npz", labels=False)  # noqa: E731
    else:
        for i in range(3):
            Image.fromarray(np.zeros((28, 28), np.uint8)).save(d / f"{i}.png")
        run = lambda: load_dataset(d, labels=False)  # noqa: E731
    run()  # fine at the real limit
    monkeypatch.setattr(bcu.untrusted, limit, 64)
    with pytest.raises(BcuError) as e:
        run()
    assert expect in str(e.value)
