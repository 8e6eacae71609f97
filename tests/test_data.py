import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bcu.data import (AugmentConfig, ImageSet, augment, batches, load_dataset, make_synthetic, mixup, noise_blend,
                      random_crop, random_hflip, random_warp, read_idx, split, take)
from bcu.errors import DataError

from helpers import Marker, write_cifar10_dir, write_cifar100_dir, write_idx, write_idx_dir


def test_idx_folder_round_trip(tmp_path):
    d = write_idx_dir(tmp_path / "fm", 40, 20)
    tr = load_dataset(d, "train")
    te = load_dataset(d, "test")
    assert tr.images.shape == (40, 1, 28, 28) and tr.images.dtype == torch.uint8 and tr.labels.shape == (40,)
    assert te.images.shape == (20, 1, 28, 28)
    raw = read_idx(d / "train-images-idx3-ubyte.gz")
    assert torch.equal(tr.images[:, 0], torch.from_numpy(raw))


def test_idx_unlabeled_never_opens_labels(tmp_path):
    d = write_idx_dir(tmp_path / "fm")
    (d / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    assert load_dataset(d, "train", labels=False).labels is None
    with pytest.raises(DataError):
        load_dataset(d, "train", labels=True)


def test_idx_truncated_and_wrong_magic(tmp_path):
    d = write_idx_dir(tmp_path / "fm")
    f = d / "train-images-idx3-ubyte.gz"
    write_idx(f, np.zeros((4, 28, 28)), compress=False)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_dataset(d, "train", labels=False)
    f.write_bytes(b"\x00\x00\x0d\x03" + bytes(12))
    with pytest.raises(DataError, match="IDX"):
        load_dataset(d, "train", labels=False)


def test_cifar10_and_100_pickle_folders(tmp_path):
    c10 = load_dataset(write_cifar10_dir(tmp_path / "c10", 8), "train")
    assert c10.images.shape == (40, 3, 32, 32) and c10.classes[:2] == ["c0", "c1"] and len(c10.labels) == 40
    assert load_dataset(tmp_path / "c10", "test").images.shape == (8, 3, 32, 32)
    c100 = load_dataset(write_cifar100_dir(tmp_path / "c100", 6), "test")
    assert c100.images.shape == (6, 3, 32, 32) and len(c100.classes) == 100


def test_cifar_folder_with_malicious_pickle_is_refused(tmp_path):
    d = write_cifar10_dir(tmp_path / "c10", 4)
    marker = tmp_path / "pwned"
    with open(d / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": Marker(str(marker))}, fh)
    with pytest.raises(DataError, match="refusing"):
        load_dataset(d, "train")
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw"])
def test_npz_layouts(tmp_path, layout):
    x = np.random.default_rng(0).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    arr = {"nchw": x, "nhwc": x.transpose(0, 2, 3, 1), "nhw": x[:, 0]}[layout]
    np.savez(tmp_path / "d.npz", x=arr, y=np.arange(10) % 3)
    ds = load_dataset(tmp_path / "d.npz")
    want = x if layout != "nhw" else x[:, :1]
    assert torch.equal(ds.images, torch.from_numpy(want)) and ds.labels.tolist() == [i % 3 for i in range(10)]


def test_npz_float_and_errors(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.full((4, 1, 5, 5), 0.5, dtype=np.float32))
    assert int(load_dataset(tmp_path / "f.npz", labels=False).images[0, 0, 0, 0]) == 128
    np.savez(tmp_path / "bad.npz", images=np.full((4, 1, 5, 5), 2.0, dtype=np.float32))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        load_dataset(tmp_path / "bad.npz", labels=False)
    np.savez(tmp_path / "nokey.npz", z=np.zeros(3))
    with pytest.raises(DataError, match="no 'x'"):
        load_dataset(tmp_path / "nokey.npz", labels=False)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError):
        load_dataset(tmp_path / "junk.npz", labels=False)


def _png(path, mode, size=(6, 5), value=100):
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], value * 256, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, size, value if mode == "L" else (value,) * len(mode)).save(path)


def test_image_folder_flat_and_classes(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        _png(flat / f"{i}.png", "RGB")
    ds = load_dataset(flat, labels=False)
    assert ds.images.shape == (3, 3, 5, 6) and ds.labels is None
    with pytest.raises(DataError, match="sub-folder"):
        load_dataset(flat, labels=True)
    cls = tmp_path / "cls"
    for c in ("cat", "dog"):
        (cls / c).mkdir(parents=True)
        for i in range(2):
            _png(cls / c / f"{i}.png", "RGB")
    ds = load_dataset(cls)
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.classes == ["cat", "dog"]


def test_image_modes_grayscale_rgba_16bit(tmp_path):
    for mode in ("L", "RGBA", "I;16"):
        d = tmp_path / mode.replace(";", "")
        d.mkdir()
        _png(d / "a.png", mode)
        _png(d / "b.png", mode)
        ds = load_dataset(d, labels=False)
        assert ds.images.shape[1] == (3 if mode == "RGBA" else 1)
        assert int(ds.images.max()) == 100


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no image files"):
        load_dataset(empty, labels=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    _png(bad / "a.png", "L")
    (bad / "b.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="b.png"):
        load_dataset(bad, labels=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _png(mixed / "a.png", "L", (6, 5))
    _png(mixed / "b.png", "L", (7, 5))
    with pytest.raises(DataError, match="resize"):
        load_dataset(mixed, labels=False)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_split_and_take_are_deterministic_and_disjoint():
    ds = make_synthetic(100)
    a, b = split(ds, 30, seed=3)
    a2, b2 = split(ds, 30, seed=3)
    assert torch.equal(a.images, a2.images) and len(a) == 70 and len(b) == 30
    all_rows = torch.cat([a.images, b.images]).flatten(1)
    assert len({tuple(r.tolist()) for r in all_rows}) == len({tuple(r.tolist()) for r in ds.images.flatten(1)})
    assert len(take(ds, 10, seed=1)) == 10 and torch.equal(take(ds, 10, 1).images, take(ds, 10, 1).images)


def test_crop_flip_mixup_contracts():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    assert torch.equal(random_crop(x, 0, g), x)
    y = random_crop(x, 2, g)
    assert y.shape == x.shape and y.dtype == x.dtype
    # every crop is a shifted window of the zero-padded image
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):
        assert any(torch.equal(y[i], xp[i, :, a:a + 8, b:b + 8]) for a in range(5) for b in range(5))
    f = random_hflip(x, torch.Generator().manual_seed(1))
    assert all(torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(2)) for i in range(16))
    m1 = mixup(x, 1.0, torch.Generator().manual_seed(5))
    m2 = mixup(x, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(m1, m2) and m1.min() >= 0 and m1.max() <= 1 and not torch.equal(m1, x)
    a1 = augment(x, AugmentConfig(4, True), torch.Generator().manual_seed(9))
    a2 = augment(x, AugmentConfig(4, True), torch.Generator().manual_seed(9))
    assert torch.equal(a1, a2)


def test_noise_blend_contract():
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert noise_blend(x, 0.0) is x
    a = noise_blend(x, 0.2, torch.Generator().manual_seed(3))
    b = noise_blend(x, 0.2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1  # a convex blend of two [0, 1] images
    moved = (a - x).abs().flatten(1).amax(1)
    assert float(moved.max()) <= 0.2 + 1e-6 and float(moved.min()) > 0  # every image moved, none by > a_max
    # the weight is drawn per image: the images are not all moved alike
    assert float(moved.std()) > 0.01
    big = noise_blend(torch.zeros(4, 1, 4, 4), 1.0, torch.Generator().manual_seed(0))
    assert float(big.max()) > 0.05


def test_random_warp_contract():
    x = torch.rand(16, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    assert random_warp(x, 0.0) is x
    a = random_warp(x, 2.0, 4, torch.Generator().manual_seed(3))
    b = random_warp(x, 2.0, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    moved = (a - x).abs().flatten(1).mean(1)
    assert float(moved.min()) > 0 and float(moved.std()) > 0  # every image moved, by its own strength
    # a constant image stays constant in its interior: a warp moves pixels, it does not add a pattern
    flat = torch.full((2, 1, 8, 8), 0.4)
    assert torch.allclose(random_warp(flat, 1.0, 4, torch.Generator().manual_seed(0))[..., 1:-1, 1:-1],
                          flat[..., 1:-1, 1:-1], atol=1e-5)
    # a horizontal ramp is displaced by at most strength * mean-normalised field / 2 pixels
    ramp = torch.linspace(0, 1, 33).view(1, 1, 1, 33).expand(4, 1, 33, 33).contiguous()
    w = random_warp(ramp, 0.5, 4, torch.Generator().manual_seed(1))
    shift_px = ((w - ramp).abs() * 32)[..., 2:-2, 2:-2]
    assert 0 < float(shift_px.max()) < 0.5 * 4  # |field| <= |ctrl|max / mean|ctrl| which is < 4 here


def test_batches_without_labels_never_reads_them():
    ds = make_synthetic(50)
    seen = sum(x.shape[0] for x, y in batches(ds.without_labels(), 16, shuffle=True,
                                                generator=torch.Generator().manual_seed(0)) if y is None)
    assert seen == 50
    with pytest.raises(DataError):
        ImageSet(torch.zeros(3, 1, 4, 4))  # float images are rejected
