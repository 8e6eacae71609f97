"""The training loop: resident and streaming sources, determinism, predict, the throughput benchmark."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bcu.data import AugmentConfig, ImageSet, StreamingImages, load_dataset, make_synthetic, read_image_folder
from bcu.models import create_model
from bcu.data.formats import npz_memmap
from bcu.train import OptimConfig, Step, cross_entropy_objective, fit, predict

ROOT = Path(__file__).resolve().parents[1]


def _folder(tmp: Path, data: ImageSet) -> Path:
    """``data`` as one PNG per image in class sub-folders (lossless, so pixels round-trip)."""
    for i in range(len(data)):
        d = tmp / f"c{int(data.labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i, 0].numpy()).save(d / f"{i:05d}.png")
    return tmp


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    data = make_synthetic(300, (1, 28, 28), 10, seed=0)
    return _folder(tmp_path_factory.mktemp("imgs"), data)


class Recorder:
    """Cross-entropy that remembers every batch it saw."""

    def __init__(self):
        self.batches = []

    def __call__(self, model, x, y, step: Step):
        self.batches.append((x.detach().clone(), None if y is None else y.clone()))
        return cross_entropy_objective(model, x, y, step)


def _fit(data, epochs=2, seed=3, **kw):
    torch.manual_seed(0)
    model = create_model("cnn-small", 10, (1, 28, 28))
    rec = Recorder()
    hist = fit(model, data, rec, OptimConfig(epochs=epochs, batch_size=32, lr=0.05), augment_cfg=AugmentConfig(),
               seed=seed, progress=False, **kw)
    return model, hist, rec


def test_streaming_folder_matches_resident(folder):
    resident = read_image_folder(folder)
    stream = load_dataset(folder, labels=True, stream=True, workers=2)
    assert isinstance(stream, StreamingImages) and len(stream) == len(resident) and stream.shape == (1, 28, 28)
    assert torch.equal(stream.load().images, resident.images) and torch.equal(stream.labels, resident.labels)
    assert stream.fingerprint() == resident.fingerprint()
    m1, h1, r1 = _fit(resident)
    m2, h2, r2 = _fit(stream)
    # same number of steps, the same (augmented) pixels and labels in the same order: same model
    assert len(r1.batches) == len(r2.batches) == 2 * (300 // 32)
    for (x1, y1), (x2, y2) in zip(r1.batches, r2.batches):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert h2[-1]["loss"] < h2[0]["loss"]  # it learns


def test_streaming_yields_every_image_once_per_epoch(tmp_path):
    n = 103
    x = np.arange(n, dtype=np.int64)
    imgs = np.zeros((n, 1, 4, 4), dtype=np.uint8)
    imgs[:, 0, 0, 0], imgs[:, 0, 0, 1] = x % 256, x // 256  # each image encodes its index
    np.save(tmp_path / "x.npy", imgs)
    s = load_dataset(tmp_path / "x.npy", labels=False, stream=True, workers=2)
    assert isinstance(s, StreamingImages) and isinstance(s.array, np.memmap)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    seen = []
    for b, _ in s.iter_batches(list(order.split(10))):
        assert b.dtype == torch.uint8 and b.shape[1:] == (1, 4, 4)
        seen += (b[:, 0, 0, 0].long() + 256 * b[:, 0, 0, 1].long()).tolist()
    assert seen == order.tolist()  # every image exactly once, in the epoch's order
    sub = s.subset(torch.tensor([5, 2]))
    assert sub.images[torch.tensor([1, 0])][:, 0, 0, 0].tolist() == [2, 5]


def test_npz_memmap_and_compressed_fallback(tmp_path):
    d = make_synthetic(64, (1, 28, 28), 10, seed=2)
    np.savez(tmp_path / "a.npz", x=d.images.numpy(), y=d.labels.numpy())
    np.savez_compressed(tmp_path / "b.npz", x=d.images.numpy(), y=d.labels.numpy())
    assert isinstance(npz_memmap(tmp_path / "a.npz", "x"), np.memmap)
    s = load_dataset(tmp_path / "a.npz", labels=True, stream=True)
    assert isinstance(s, StreamingImages) and torch.equal(s.load().images, d.images)
    assert torch.equal(s.labels, d.labels)
    r = load_dataset(tmp_path / "b.npz", labels=True, stream=True)
    assert isinstance(r, ImageSet) and torch.equal(r.images, d.images)
    assert isinstance(load_dataset(tmp_path / "a.npz", labels=False, stream=True), StreamingImages)
    assert isinstance(load_dataset(tmp_path / "a.npz", labels=False), ImageSet)


def test_fit_is_deterministic_and_drop_last():
    data = make_synthetic(200, seed=4)
    m1, h1, r1 = _fit(data, epochs=1)
    m2, h2, r2 = _fit(data, epochs=1)
    assert len(r1.batches) == 200 // 32 and all(b[0].shape[0] == 32 for b in r1.batches)
    assert h1[0]["loss"] == h2[0]["loss"]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    _, _, r3 = _fit(data, epochs=1, seed=4)
    assert not torch.equal(r1.batches[0][0], r3.batches[0][0])  # the seed matters


def test_cleanse_on_a_stream(folder):
    from bcu.defenses.bcu import Cleanser, preset

    torch.manual_seed(0)
    model = create_model("cnn-small", 10, (1, 28, 28))
    stream = load_dataset(folder, labels=False, stream=True, workers=1)
    cfg = preset("paper", {"optim": {"epochs": 1, "batch_size": 64}})
    a = Cleanser(cfg).run(model, stream, progress=False)
    b = Cleanser(cfg).run(model, read_image_folder(folder, labels=False), progress=False)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)


def test_predict_matches_model_and_leaves_ordinary_weights():
    torch.manual_seed(0)
    model = create_model("cnn-small", 10, (1, 28, 28)).eval()
    imgs = make_synthetic(70, seed=5).images
    out = predict(model, imgs, batch_size=32)
    with torch.no_grad():
        ref = model(imgs.float() / 255)
    assert out.shape == (70, 10) and torch.allclose(out, ref, atol=1e-5)
    assert not any(t.is_inference() for t in list(model.parameters()) + list(model.buffers()))


def test_throughput_benchmark_smoke():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BCU_PROGRESS": "0"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--images", "512", "--epochs", "1",
                        "--threads", "1", "--naive-workers", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"real_ips", "bare_ips", "naive_ips", "config"} <= set(out)
    assert out["real_ips"] > 0 and out["bare_ips"] > 0 and out["naive_ips"] > 0
    assert out["config"]["batch_size"] == 256 and out["config"]["images"] == 512
