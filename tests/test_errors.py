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
    from bcu import checkpoint

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.OutputDir, "commit", full)
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
