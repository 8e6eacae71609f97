"""Bad input, clear errors: one test per row of docs/errors.md.

Each test drives the real CLI in-process (``bcu.cli.main``) and checks the contract: the exit code,
stderr is exactly one line starting with ``bcu: error:``, and no output is left behind (neither
``<out>`` nor ``<out>.partial``). Rows where bcu *accepts* the input (RGBA, 16-bit, grayscale for a
1-channel model) check that it is converted as documented and the command succeeds.

Set ``BCU_ERRORS_DUMP=file`` to append every (test, exit code, line) to ``file``: that is how the
messages in docs/errors.md were collected.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bcu.checkpoint import save_model
from bcu.cli import main
from bcu.data import load_dataset, make_synthetic
from bcu.models import create_model

SPEC = ["--arch", "cnn-small", "--num-classes", "10", "--input-shape", "1,28,28"]
QUICK = ["--epochs", "1", "--batch-size", "16", "--threads", "1", "--no-progress"]


@pytest.fixture
def cli(capsys, request):
    """Run ``bcu argv...`` in-process; returns (exit code, stdout, the one stderr line or '')."""

    def run(*argv, expect_error: bool = True):
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        line = ""
        if expect_error:
            lines = err.strip("\n").split("\n")
            assert len(lines) == 1, f"stderr is not one line: {err!r}"
            line = lines[0]
            assert line.startswith("bcu: error: "), line
            dump = os.environ.get("BCU_ERRORS_DUMP")
            if dump:
                with open(dump, "a") as fh:
                    fh.write(json.dumps({"test": request.node.name, "rc": rc, "line": line}) + "\n")
        return rc, out, line

    return run


def no_output(out: Path) -> bool:
    return not out.exists() and not Path(str(out) + ".partial").exists()


@pytest.fixture(scope="module")
def rgb_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("rgb")
    save_model(create_model("cnn-small", 10, (3, 28, 28), mean=(0.5,) * 3, std=(0.25,) * 3), d)
    return d


def _npz(path: Path, shape=(1, 28, 28), n=64, labels=False) -> Path:
    ds = make_synthetic(n, shape, 10, seed=3)
    arrays = {"x": ds.images.numpy()}
    if labels:
        arrays["y"] = ds.labels.numpy()
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return _npz(tmp_path_factory.mktemp("data") / "u.npz")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _cleanse(cli, model, data, out, *extra, **kw):
    return cli("cleanse", "--model", model, "--data", data, "--out", out, *QUICK, *extra, **kw)


# -------------------------------------------------------------------------------------------------
# model files (exit 3)


def test_truncated_safetensors(cli, tmp_path, model_dir):
    d = _copy(model_dir, tmp_path / "m")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    rc, _, line = cli("verify", d)
    assert rc == 3 and "is not a valid safetensors file (corrupt or truncated)" in line


def test_corrupt_safetensors(cli, tmp_path, model_dir):
    d = _copy(model_dir, tmp_path / "m")
    w = d / "model.safetensors"
    w.write_bytes(b"\xff" * 8 + os.urandom(w.stat().st_size - 8))  # header length 2^64-1: absurd
    rc, _, line = cli("verify", d)
    assert rc == 3 and "is not a valid safetensors file (corrupt or truncated)" in line
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, d, tmp_path / "nodata.npz", out)
    assert rc == 3 and no_output(out)


def test_truncated_torch_state_dict(cli, tmp_path, net):
    f = tmp_path / "m.pt"
    torch.save(net.net.state_dict(), f)
    f.write_bytes(f.read_bytes()[:1000])
    rc, _, line = cli("verify", f, *SPEC)
    assert rc == 3 and "is not a readable PyTorch state dict" in line


def test_not_a_state_dict(cli, tmp_path):
    f = tmp_path / "m.pt"
    torch.save([torch.zeros(3)], f)
    rc, _, line = cli("verify", f, *SPEC)
    assert rc == 3 and "does not hold a state dict of named tensors" in line


def test_unsupported_model_file(cli, tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"onnx")
    rc, _, line = cli("verify", f, *SPEC)
    assert rc == 3 and "unsupported model file" in line


def test_model_does_not_exist(cli, tmp_path, npz):
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, tmp_path / "nope", npz, out)
    assert rc == 3 and "does not exist" in line and no_output(out)


def test_wrong_architecture(cli, tmp_path, net, npz):
    f = tmp_path / "m.pt"
    torch.save(net.net.state_dict(), f)
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, f, npz, out, "--arch", "cnn4", "--num-classes", "10", "--input-shape", "1,28,28")
    assert rc == 3 and "does not match architecture 'cnn4'" in line and no_output(out)


def test_shape_mismatch(cli, tmp_path, net):
    state = dict(net.net.state_dict())
    k = next(k for k, v in state.items() if v.dim() == 4)
    state[k] = torch.zeros(state[k].shape[0], state[k].shape[1], 5, 5)
    f = tmp_path / "m.pth"
    torch.save(state, f)
    rc, _, line = cli("verify", f, *SPEC)
    assert rc == 3 and f"{k!r} has shape" in line and "expects" in line


def test_wrong_num_classes(cli, tmp_path, model_dir, npz):
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, npz, out, "--num-classes", "5")
    assert rc == 3 and "has 10 output classes, not num_classes=5" in line and no_output(out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(cli, tmp_path, net, npz, bad):
    import copy

    m = copy.deepcopy(net)
    with torch.no_grad():
        next(p for p in m.net.parameters() if p.dim() > 1).view(-1)[3] = bad
    d = tmp_path / "m"
    d.mkdir()
    save_model(m, d)  # the sidecar hash matches: only the finiteness check can catch it
    rc, _, line = cli("verify", d)
    assert rc == 3 and "contains NaN or Inf" in line
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, d, npz, out)
    assert rc == 3 and no_output(out)


def test_missing_sidecar(cli, tmp_path, model_dir):
    d = _copy(model_dir, tmp_path / "m")
    (d / "model.json").unlink()
    rc, _, line = cli("verify", d)
    assert rc == 3 and "has no sidecar model.json; pass --arch" in line


def test_sidecar_not_json(cli, tmp_path, model_dir):
    d = _copy(model_dir, tmp_path / "m")
    (d / "model.json").write_text("{arch: cnn-small")
    rc, _, line = cli("verify", d)
    assert rc == 3 and "is not valid JSON" in line


def test_sidecar_sha_mismatch(cli, tmp_path, model_dir, npz):
    d = _copy(model_dir, tmp_path / "m")
    side = json.loads((d / "model.json").read_text())
    side["sha256"] = "0" * 64
    (d / "model.json").write_text(json.dumps(side))
    rc, _, line = cli("verify", d)
    assert rc == 3 and "does not match the SHA-256 in its sidecar" in line
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, d, npz, out)
    assert rc == 3 and no_output(out)


# -------------------------------------------------------------------------------------------------
# images (exit 4)


def test_wrong_channel_count(cli, tmp_path, model_dir):
    data = _npz(tmp_path / "rgb.npz", (3, 28, 28))
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, data, out)
    assert rc == 4 and "images are 3x28x28 (CxHxW) but the model expects 1x28x28: wrong channel count" in line
    assert no_output(out)


def test_wrong_image_size(cli, tmp_path, model_dir):
    data = _npz(tmp_path / "big.npz", (1, 32, 32))
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, data, out)
    assert rc == 4 and "wrong image size" in line and no_output(out)


def _png_folder(d: Path, n: int, mode: str, size=(28, 28), value=128) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        c = {"L": None, "RGB": 3, "RGBA": 4}.get(mode)
        if mode == "I;16":
            arr = rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16)
            Image.fromarray(arr).save(d / f"{i:03d}.png")
            continue
        arr = rng.integers(0, 256, (size[1], size[0]) + ((c,) if c else ()), dtype=np.uint8)
        Image.fromarray(arr, mode).save(d / f"{i:03d}.png")
    return d


def test_grayscale_images_for_an_rgb_model(cli, tmp_path, rgb_model_dir, model_dir):
    d = _png_folder(tmp_path / "gray", 20, "L")
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, rgb_model_dir, d, out)
    assert rc == 4 and "wrong channel count" in line and no_output(out)
    rc, _, _ = _cleanse(cli, model_dir, d, out, expect_error=False)  # fine for a grayscale model
    assert rc == 0 and (out / "model.safetensors").is_file()


def test_rgba_images_lose_their_alpha(cli, tmp_path, rgb_model_dir):
    d = _png_folder(tmp_path / "rgba", 20, "RGBA")
    ds = load_dataset(d, labels=False)
    assert ds.shape == (3, 28, 28)
    ref = np.asarray(Image.open(d / "000.png").convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(ds.images[0].numpy(), ref)
    out = tmp_path / "o"
    rc, _, _ = _cleanse(cli, rgb_model_dir, d, out, expect_error=False)
    assert rc == 0


def test_16bit_images_are_scaled_to_8bit(cli, tmp_path, model_dir):
    d = _png_folder(tmp_path / "deep", 20, "I;16")
    ds = load_dataset(d, labels=False)
    raw = np.asarray(Image.open(d / "000.png")).astype(np.int64)
    assert ds.shape == (1, 28, 28) and np.array_equal(ds.images[0, 0].numpy(), (raw >> 8).astype(np.uint8))
    out = tmp_path / "o"
    rc, _, _ = _cleanse(cli, model_dir, d, out, expect_error=False)
    assert rc == 0


def test_corrupt_image_file(cli, tmp_path, model_dir):
    d = _png_folder(tmp_path / "imgs", 20, "L")
    (d / "010.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, d, out)
    assert rc == 4 and "cannot read image" in line and "010.png" in line and no_output(out)


def test_truncated_image_file(cli, tmp_path, model_dir):
    d = _png_folder(tmp_path / "imgs", 20, "L")
    f = d / "005.png"
    f.write_bytes(f.read_bytes()[:60])
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, d, out)
    assert rc == 4 and "cannot read image" in line and no_output(out)


def test_images_of_different_sizes(cli, tmp_path, model_dir):
    d = _png_folder(tmp_path / "imgs", 5, "L")
    Image.fromarray(np.zeros((30, 30), np.uint8), "L").save(d / "999.png")
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, d, out)
    assert rc == 4 and "all images in a folder must have the same size" in line and no_output(out)


def test_empty_folder(cli, tmp_path, model_dir):
    d = tmp_path / "empty"
    d.mkdir()
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, d, out)
    assert rc == 4 and "contains no image files" in line and no_output(out)


def test_folder_without_images(cli, tmp_path, model_dir):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(3):
        (d / f"notes{i}.txt").write_text("not an image")
    (d / "sub").mkdir()
    (d / "sub" / "readme.md").write_text("# nothing")
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, d, out)
    assert rc == 4 and "contains no image files" in line and no_output(out)


def test_fewer_images_than_one_batch(cli, tmp_path, model_dir):
    data = _npz(tmp_path / "few.npz", n=10)
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, data, out)  # batch size 16
    assert rc == 4 and "10 unlabeled images are fewer than one batch (16)" in line and no_output(out)


def test_data_does_not_exist(cli, tmp_path, model_dir):
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, tmp_path / "nope", out)
    assert rc == 4 and "does not exist" in line and no_output(out)


def test_unsupported_data_file(cli, tmp_path, model_dir):
    f = tmp_path / "x.csv"
    f.write_text("1,2,3\n")
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, f, out)
    assert rc == 4 and "unsupported data file" in line and no_output(out)


def test_corrupt_npz(cli, tmp_path, model_dir):
    f = tmp_path / "x.npz"
    f.write_bytes(b"PK\x03\x04" + os.urandom(100))
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, f, out)
    assert rc == 4 and "is not a readable .npz file" in line and no_output(out)


def test_nan_in_float_images(cli, tmp_path, model_dir):
    x = np.random.default_rng(0).random((40, 1, 28, 28)).astype(np.float32)
    x[3, 0, 2, 2] = np.nan
    f = tmp_path / "x.npz"
    np.savez(f, x=x)
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, f, out)
    assert rc == 4 and "images contain NaN or Inf" in line and no_output(out)


def test_attack_needs_labels(cli, tmp_path):
    f = _npz(tmp_path / "u.npz")
    out = tmp_path / "o"
    rc, _, line = cli("attack", "--attack", "badnets", "--data", f, "--out", out, "--holdout", "0", *QUICK)
    assert rc == 4 and "no labels" in line and no_output(out)


# -------------------------------------------------------------------------------------------------
# names and options (exit 2)


def test_unknown_attack(cli, tmp_path):
    out = tmp_path / "o"
    rc, _, line = cli("attack", "--attack", "badnet", "--data", "synthetic:200", "--out", out, *QUICK)
    assert rc == 2 and "unknown attack 'badnet'; did you mean badnets" in line and no_output(out)


def test_unknown_defense(cli, tmp_path, model_dir, npz):
    out = tmp_path / "o"
    rc, _, line = cli("defend", "--defense", "fine-pruning-xyz", "--model", model_dir, "--data", npz, "--out", out)
    assert rc == 2 and "unknown defense 'fine-pruning-xyz'" in line and no_output(out)


def test_unknown_model_name(cli, tmp_path, net):
    out = tmp_path / "o"
    rc, _, line = cli("attack", "--attack", "badnets", "--arch", "resnet19", "--data", "synthetic:200",
                      "--holdout", "0", "--out", out, *QUICK)
    assert rc == 2 and "unknown architecture 'resnet19'" in line and no_output(out)
    f = tmp_path / "m.pt"
    torch.save(net.net.state_dict(), f)
    rc, _, line = cli("verify", f, "--arch", "resnet19", "--num-classes", "10")
    assert rc == 3 and "unknown architecture 'resnet19'" in line  # naming a file's architecture: a model error


def test_unknown_preset(cli, tmp_path, model_dir, npz):
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, npz, out, "--preset", "fast")
    assert rc == 2 and "unknown preset 'fast'" in line and no_output(out)


@pytest.mark.parametrize("flag,expect", [
    (["--set", "optim.lr=-1"], "lr must be > 0, got -1"),
    (["--set", "optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
    (["--set", "optim.learning_rate=0.1"], "unknown option optim.learning_rate"),
    (["--set", "reinit"], "override 'reinit' must look like key=value"),
    (["--set", "distill.mixup_alpha=-0.5"], "mixup_alpha must be >= 0"),
    (["--set", "stop.rule=sometimes"], "stop.rule: 'sometimes' is not one of"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
])
def test_invalid_config_value(cli, tmp_path, model_dir, npz, flag, expect):
    out = tmp_path / "o"
    rc, _, line = cli("cleanse", "--model", model_dir, "--data", npz, "--out", out, "--threads", "1", *flag)
    assert rc == 2 and expect in line and no_output(out)


def test_invalid_config_file(cli, tmp_path, model_dir, npz):
    out = tmp_path / "o"
    bad = tmp_path / "c.yaml"
    bad.write_text("optim: {epochs: [\n")
    rc, _, line = _cleanse(cli, model_dir, npz, out, "--config", bad)
    assert rc == 2 and "is not valid yaml" in line and no_output(out)
    rc, _, line = _cleanse(cli, model_dir, npz, out, "--config", tmp_path / "none.toml")
    assert rc == 2 and "does not exist" in line and no_output(out)
    bad.write_text("- just\n- a list\n")
    rc, _, line = _cleanse(cli, model_dir, npz, out, "--config", bad)
    assert rc == 2 and "must hold a table of options" in line and no_output(out)


def test_usage_error_is_one_line(cli, tmp_path):
    rc, _, line = cli("cleanse", "--data", "x")
    assert rc == 2 and "the following arguments are required: --model, --out" in line
    rc, _, line = cli("verify", "m", "--input-shape", "3x32")
    assert rc == 2 and "expected C,H,W" in line
    rc, _, line = cli("frobnicate")
    assert rc == 2 and "invalid choice: 'frobnicate'" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(cli, tmp_path, model_dir, npz):
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, npz, out, "--device", "cuda")
    assert rc == 2 and "CUDA is not available" in line and no_output(out)


# -------------------------------------------------------------------------------------------------
# outputs (exit 5)


def test_output_exists(cli, tmp_path, model_dir, npz):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, line = _cleanse(cli, model_dir, npz, out)
    assert rc == 5 and "already exists (choose another --out or pass --overwrite)" in line
    assert (out / "keep.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["keep.txt"]
    assert not Path(str(out) + ".partial").exists()


def test_output_under_a_file(cli, tmp_path, model_dir, npz):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "o"
    rc, _, line = _cleanse(cli, model_dir, npz, out)
    assert rc == 5 and f"cannot write {blocker}: a file is in the way where a folder is needed" in line


def test_resume_with_nothing_to_resume(cli, tmp_path, model_dir, npz):
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, npz, out, "--resume")
    assert rc == 5 and "nothing to resume" in line and no_output(out)


def test_read_only_output_folder(cli, tmp_path, model_dir, npz, monkeypatch):
    """A read-only parent folder. Tests run as root, and root ignores permission bits, so a
    chmod 0o555 folder stays writable here; instead we make ``os.access`` report the folder as
    read-only (the check OutputDir makes before staging) and, separately, make the first write
    fail with EROFS, as a read-only mount does."""
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    out = parent / "o"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == parent and mode & os.W_OK
                        else real_access(p, mode, *a, **k))
    rc, _, line = _cleanse(cli, model_dir, npz, out)
    assert rc == 5 and f"cannot write {out}: permission denied (read-only location?)" in line and no_output(out)
    monkeypatch.setattr(os, "access", real_access)

    import tempfile

    def ro_mkstemp(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", ro_mkstemp)
    rc, _, line = _cleanse(cli, model_dir, npz, out)
    assert rc == 5 and "permission denied (read-only location?)" in line and no_output(out)
    parent.chmod(0o755)


def test_disk_full(cli, tmp_path, model_dir, npz, monkeypatch):
    """Simulated: every fsync fails with ENOSPC, as it does when the disk fills during a write."""

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, npz, out)
    assert rc == 5 and "disk full while writing" in line and no_output(out)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_disk_full_outside_the_atomic_writers(cli, tmp_path, model_dir, npz, monkeypatch):
    """An ENOSPC raised anywhere else (here: the final rename) still ends as one line, exit 5."""
    from bcu import output

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output.OutputDir, "commit", full)
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, npz, out)
    assert rc == 5 and line == "bcu: error: disk full" and no_output(out)


# -------------------------------------------------------------------------------------------------
# the real executable


def test_real_executable_prints_one_line(tmp_path, model_dir):
    """No import-time warnings or tracebacks sneak onto stderr of the installed command."""
    d = _copy(model_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"garbage")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "bcu", "verify", str(d)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 3 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("bcu: error: ") and "not a valid safetensors" in p.stderr


# -------------------------------------------------------------------------------------------------
# issue 14, finding 11: each of these ended in a traceback; now one line and its exit code


def _cifar(d: Path, batch: dict, meta: dict = None) -> Path:
    import pickle

    d.mkdir(parents=True, exist_ok=True)
    with open(d / "data_batch_1", "wb") as fh:
        pickle.dump(batch, fh, protocol=2)
    with open(d / "test_batch", "wb") as fh:
        pickle.dump(batch, fh, protocol=2)
    if meta is not None:
        with open(d / "batches.meta", "wb") as fh:
            pickle.dump(meta, fh, protocol=2)
    return d


def _self_referencing_list():
    x = []
    x.append(x)
    return x


GOOD_DATA = np.zeros((4, 3072), np.uint8)


@pytest.mark.parametrize("name,batch,meta,expect", [
    ("ragged", {b"data": [[0] * 3072, [0] * 100], b"labels": [0, 1]}, None, "'data' must be a uint8 array"),
    ("self-referencing", {b"data": _self_referencing_list(), b"labels": [0]}, None, "'data' must be a uint8 array"),
    ("label_names: 5", {b"data": GOOD_DATA, b"labels": [0, 1, 2, 3]}, {b"label_names": 5},
     "label names must be a list of short texts"),
    ("labels of the wrong type", {b"data": GOOD_DATA, b"labels": ["a", "b", "c", "d"]}, None,
     "labels must be a list of 4 integers"),
    ("labels: a number", {b"data": GOOD_DATA, b"labels": 7}, None, "labels must be a list of 4 integers"),
])
def test_malformed_cifar_batches(cli, tmp_path, model_dir, name, batch, meta, expect):
    d = _cifar(tmp_path / "cifar", batch, meta)
    rc, _, line = cli("evaluate", "--model", model_dir, "--data", d, "--split", "train")
    assert rc == 4 and expect in line


def test_idx_dimensions_whose_product_overflows(cli, tmp_path, model_dir):
    import struct

    d = tmp_path / "idx"
    d.mkdir()
    (d / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 2**32 - 1, 2**32 - 1,
                                                                                     2**32 - 1) + b"\0" * 64)
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, d, out)
    assert rc == 4 and "more than the file can hold" in line and no_output(out)


def test_npz_with_a_scalar_x_under_stream(cli, tmp_path, model_dir):
    f = tmp_path / "s.npz"
    np.savez(f, x=np.uint8(3))
    out = tmp_path / "o"
    for extra in ([], ["--stream"]):
        rc, _, line = _cleanse(cli, model_dir, f, out, *extra)
        assert rc == 4 and "expected images of shape" in line and no_output(out)


def _edit_sidecar(d: Path, raw: str = None, **changes) -> None:
    side = json.loads((d / "model.json").read_text())
    side.pop("sha256", None)
    side.update(changes)
    (d / "model.json").write_text(raw if raw is not None else json.dumps(side))


@pytest.mark.parametrize("what,edit,expect", [
    ("nested 100,000 deep", {"raw": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
    ("a 5,000-digit integer", {"raw": '{"arch": "cnn-small", "num_classes": ' + "9" * 5000 + "}"}, "is not valid JSON"),
    ("a 4,000-digit integer", {"raw": '{"arch": "cnn-small", "num_classes": ' + "9" * 4000 + "}"},
     "expected an integer in [-2^63, 2^63 - 1]"),
    ("hidden: -1", {"kwargs": {"hidden": -1}}, "cannot build 'cnn-small'"),
    ("width: 1e300", {"kwargs": {"width": 1e300}}, "cannot build 'cnn-small'"),
    ("kwargs: 5", {"kwargs": 5}, "kwargs: expected a table"),
    ("input_shape: abc", {"input_shape": "abc"}, "input_shape"),
])
def test_malformed_sidecars(cli, tmp_path, model_dir, what, edit, expect):
    d = _copy(model_dir, tmp_path / "m")
    _edit_sidecar(d, **edit)
    rc, _, line = cli("verify", d)
    assert rc == 3 and expect in line


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from bcu.attacks import create_attack

    d = tmp_path_factory.mktemp("artifact")
    create_attack("badnets", {}, (1, 28, 28), 10).save(d)
    return d


@pytest.mark.parametrize("what,raw,expect", [
    ("nested 100,000 deep", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("a 5,000-digit integer", '{"name": "badnets", "num_classes": ' + "7" * 5000 + ', "image_shape": [1, 28, 28]}',
     "is not valid JSON"),
    ("image_shape: abc", '{"name": "badnets", "num_classes": 10, "image_shape": "abc"}', "image_shape"),
    ("image_shape of huge ints", '{"name": "badnets", "num_classes": 10, "image_shape": [1, 1e300, 28]}',
     "image_shape"),
    ("config: a list", '{"name": "badnets", "num_classes": 10, "image_shape": [1, 28, 28], "config": [1]}',
     "config"),
])
def test_malformed_attack_artifacts(cli, tmp_path, model_dir, artifact, what, raw, expect):
    d = _copy(artifact, tmp_path / "a")
    (d / "attack.json").write_text(raw)
    rc, _, line = cli("evaluate", "--model", model_dir, "--data", "synthetic:200", "--attack", d)
    assert rc == 4 and expect in line


@pytest.mark.parametrize("flags,expect", [
    (["--seed", "99999999999999999999"], "argument --seed: expected an integer in [-2^63, 2^63 - 1]"),
    (["--set", f"seed={2**64}"], "seed: expected an integer in [-2^63, 2^63 - 1]"),
    (["--set", f"reinit.seed={2**63}"], "reinit.seed: expected an integer in [-2^63, 2^63 - 1]"),
    (["--threads", "-1"], "--threads must be a number of threads in [1, 4096], got -1"),
    (["--threads", "0"], "--threads must be a number of threads in [1, 4096], got 0"),
    (["--device", "foo"], "--device 'foo': not a device"),
    (["--device", "meta"], "--device 'meta': bcu runs on cpu or cuda devices, not meta"),
    (["--device", "mps"], "--device 'mps': bcu runs on cpu or cuda devices, not mps"),
    (["--lr", "1e308"], "optim.lr: expected a number in [-1e12, 1e12]"),
    (["--set", "optim.weight_decay=1e300"], "optim.weight_decay: expected a number in [-1e12, 1e12]"),
    (["--set", "augment.crop_pad=1000000"], "crop_pad must be in [0, 4096], got 1000000"),
    (["--set", "augment.crop_pad=100"], "augment.crop_pad 100 is larger than the 28x28 images"),
    (["--set", "optim=3"], "optim: expected a table of options, got 3"),
    (["--set", "optim.lr=0.1", "--set", "optim=3"], "conflicts with another override"),
])
def test_runtime_flags_and_options_out_of_range(cli, tmp_path, model_dir, npz, flags, expect):
    out = tmp_path / "o"
    rc, _, line = cli("cleanse", "--model", model_dir, "--data", npz, "--out", out, "--epochs", "1",
                      "--batch-size", "16", *flags)
    assert rc == 2 and expect in line and no_output(out)


def test_seed_above_int64_in_attack_and_defend(cli, tmp_path, model_dir, npz):
    for argv in (["attack", "--attack", "badnets", "--data", "synthetic:200", "--holdout", "0"],
                 ["defend", "--defense", "bcu", "--model", model_dir, "--data", npz]):
        out = tmp_path / "o"
        rc, _, line = cli(*argv, "--out", out, "--seed", str(2**70), "--epochs" if argv[0] == "attack" else "--threads",
                          "1")
        assert rc == 2 and "--seed: expected an integer" in line and no_output(out)


def test_large_valid_seed_trains(cli, tmp_path, model_dir, npz):
    """A seed near 2^63 is valid; seeds derived from it (seed * 1,000,003 + ...) no longer overflow."""
    out = tmp_path / "o"
    rc, _, _ = _cleanse(cli, model_dir, npz, out, "--seed", str(2**63 - 1), expect_error=False)
    assert rc == 0 and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("preset", ["[x]", "{a: 1}", "5"])
def test_config_preset_that_is_not_a_name(cli, tmp_path, model_dir, npz, preset):
    c = tmp_path / "c.yaml"
    c.write_text(f"preset: {preset}\n")
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, npz, out, "--config", c)
    assert rc == 2 and "unknown preset" in line and no_output(out)


def test_batch_size_1_with_batchnorm_on_tiny_inputs(cli, tmp_path):
    """ResNet-18 on 8x8 images reaches 1x1 in its last stage: a batch of one image gives its
    BatchNorm one value per channel, which torch refuses mid-training."""
    out = tmp_path / "o"
    rc, _, line = cli("attack", "--attack", "badnets", "--arch", "resnet18", "--data", "synthetic:40:3x8x8",
                      "--holdout", "0", "--out", out, "--epochs", "1", "--batch-size", "1", "--threads", "1",
                      "--set", "attack.patch_size=2")
    assert rc == 2 and "batch_size 1 is too small for this model" in line and "BatchNorm" in line and no_output(out)


# -------------------------------------------------------------------------------------------------
# issue 14, finding 12: names of refused pickle classes and image files reach the terminal escaped

ESCAPES = "\x1b]0;owned\x07\x1b]52;c;ZWNobyBvd25lZA==\x07\x1b[2J\u202e"


def _assert_clean(line: str) -> None:
    assert not any(ch in line for ch in "\x1b\x07\u202e"), repr(line)
    assert "\\x1b" in line and "\\x07" in line


def _stack_global(module: str, name: str) -> bytes:
    """A protocol-4 pickle whose STACK_GLOBAL names any module/name, escapes included."""
    def u(s: str) -> bytes:
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b
    return b"\x80\x04" + u(module) + u(name) + b"\x93" + b")R."


def test_refused_pickle_class_names_are_escaped(cli, tmp_path, model_dir):
    d = tmp_path / "cifar"
    d.mkdir()
    (d / "data_batch_1").write_bytes(_stack_global("os" + ESCAPES, "system" + ESCAPES))
    (d / "test_batch").write_bytes((d / "data_batch_1").read_bytes())
    rc, _, line = cli("evaluate", "--model", model_dir, "--data", d)
    assert rc == 4 and "refusing to load" in line
    _assert_clean(line)


def test_image_file_names_are_escaped(cli, tmp_path, model_dir):
    d = _png_folder(tmp_path / "imgs", 3, "L")
    (d / f"{ESCAPES}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    out = tmp_path / "o"
    rc, _, line = _cleanse(cli, model_dir, d, out)
    assert rc == 4 and "cannot read image" in line and no_output(out)
    _assert_clean(line)


def test_every_message_is_capped(cli, tmp_path, model_dir, npz):
    out = tmp_path / ("x" * 200) / ("y" * 200) / ("z" * 200) / "o"
    long_value = "v" * 100_000
    rc, _, line = _cleanse(cli, model_dir, npz, out, "--set", f"stop.rule={long_value}")
    assert rc == 2 and len(line) <= len("bcu: error: ") + 1001


@pytest.mark.parametrize("raw", [b"(inumpy\nndarray\n.", b"\x80\x02cnumpy\ndtype\n)\x81."])
def test_cifar_pickle_that_builds_objects(cli, tmp_path, model_dir, raw):
    """INST/OBJ/NEWOBJ are refused outright by bcu's CIFAR unpickler (they call constructors)."""
    d = tmp_path / "cifar"
    d.mkdir()
    for name in ("data_batch_1", "test_batch"):
        (d / name).write_bytes(raw)
    rc, _, line = cli("evaluate", "--model", model_dir, "--data", d)
    assert rc == 4 and "refusing to build objects (OBJ/INST/NEWOBJ)" in line
