"""Safe loading: no file bcu is handed can run code, and ``bcu verify`` catches tampering.

Every malicious checkpoint here carries a payload whose unpickling creates a marker file
(``helpers.Marker.__reduce__`` returns ``(open, (marker, "w"))``). A loader that ran foreign
code leaves the marker behind; each test checks it does not exist afterwards. One test first
proves the payloads are live (an unsafe ``pickle.load`` does create the marker), so the
absence of the marker elsewhere means something.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bcu.checkpoint import TORCH_EXTENSIONS, load_model, sha256_file
from bcu.cli import main
from bcu.data import load_dataset, make_synthetic
from bcu.errors import DataError, ModelError

from helpers import Marker, write_cifar10_dir, write_cifar100_dir

SPEC_ARGS = ["--arch", "cnn-small", "--num-classes", "10", "--input-shape", "1,28,28"]
FORMATS = ("zip", "legacy", "pickle2", "pickle4", "pickle0-bare")


def cli(capsys, *argv) -> tuple:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("bcu: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    x = make_synthetic(64, (1, 28, 28), 10, seed=3).images.numpy()
    np.savez(d / "u.npz", x=x)
    return d / "u.npz"


def write_malicious(path: Path, marker: Path, fmt: str, net=None) -> None:
    """A checkpoint whose unpickling runs ``open(marker, "w")``; the rest looks like a state dict."""
    state = dict(net.net.state_dict()) if net is not None else {"w": torch.zeros(2)}
    payload = {**state, "evil": Marker(str(marker))}
    if fmt == "zip":
        torch.save(payload, path)  # the zip container torch writes since 1.6
    elif fmt == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)  # the pre-1.6 stream
    elif fmt == "pickle2":
        path.write_bytes(pickle.dumps({"state_dict": payload}, protocol=2))
    elif fmt == "pickle4":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    elif fmt == "pickle0-bare":
        path.write_bytes(pickle.dumps(Marker(str(marker)), protocol=0))
    else:  # pragma: no cover
        raise ValueError(fmt)


def test_payloads_are_live(tmp_path):
    """Control: loading these files the unsafe way does run the payload."""
    for fmt in FORMATS:
        marker = tmp_path / f"m-{fmt}"
        f = tmp_path / f"evil-{fmt}.pt"
        write_malicious(f, marker, fmt)
        if fmt in ("zip", "legacy"):
            torch.load(f, weights_only=False)
        else:
            pickle.loads(f.read_bytes())
        assert marker.exists(), fmt


@pytest.mark.parametrize("ext", TORCH_EXTENSIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_load_model_refuses_malicious_checkpoint(tmp_path, net, ext, fmt):
    marker = tmp_path / "pwned"
    f = tmp_path / f"evil{ext}"
    write_malicious(f, marker, fmt, net)
    with pytest.raises(ModelError, match="refusing to unpickle") as ei:
        load_model(f, arch="cnn-small", num_classes=10, input_shape=(1, 28, 28))
    assert "\n" not in str(ei.value) and "\x1b" not in str(ei.value) and len(str(ei.value)) < 400
    assert not marker.exists()


@pytest.mark.parametrize("ext", TORCH_EXTENSIONS)
def test_cli_verify_and_cleanse_refuse_malicious_checkpoint(tmp_path, capsys, net, npz, ext):
    marker = tmp_path / "pwned"
    f = tmp_path / f"evil{ext}"
    write_malicious(f, marker, "zip", net)
    rc, out, err = cli(capsys, "verify", f, *SPEC_ARGS)
    assert rc == 3 and "refusing to unpickle" in one_error_line(err) and out == ""
    out_dir = tmp_path / "out"
    rc, out, err = cli(capsys, "cleanse", "--model", f, *SPEC_ARGS, "--data", npz, "--out", out_dir,
                       "--epochs", "1", "--batch-size", "16", "--threads", "1")
    assert rc == 3 and "refusing to unpickle" in one_error_line(err)
    rc, out, err = cli(capsys, "defend", "--defense", "bcu", "--model", f, *SPEC_ARGS, "--data", npz,
                       "--out", out_dir, "--threads", "1")
    assert rc == 3 and "refusing to unpickle" in one_error_line(err)
    assert not marker.exists()
    assert not out_dir.exists() and not Path(str(out_dir) + ".partial").exists()


def test_sidecar_does_not_make_a_malicious_checkpoint_loadable(tmp_path, capsys, net):
    """A plausible sidecar (arch, sha256 of the file itself) changes nothing: pickles stay refused."""
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    write_malicious(f, marker, "legacy", net)
    (tmp_path / "evil.json").write_text(json.dumps({"arch": "cnn-small", "num_classes": 10,
                                                    "input_shape": [1, 28, 28], "sha256": sha256_file(f)}))
    rc, _, err = cli(capsys, "verify", f)
    assert rc == 3 and "refusing to unpickle" in one_error_line(err)
    assert not marker.exists()


@pytest.mark.parametrize("ext", TORCH_EXTENSIONS)
def test_plain_state_dicts_still_load(tmp_path, capsys, net, ext):
    """The refusal is not blanket: a genuine state dict (zip or legacy) loads and predicts the same."""
    x = torch.rand(4, 1, 28, 28)
    for i, kw in enumerate(({}, {"_use_new_zipfile_serialization": False})):
        f = tmp_path / f"ok{i}{ext}"
        torch.save({"state_dict": {"module." + k: v for k, v in net.net.state_dict().items()}}, f, **kw)
        m, info = load_model(f, arch="cnn-small", num_classes=10, input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,))
        assert torch.allclose(m(x), net.eval()(x))
        assert info["sha256"] == sha256_file(f)
        rc, out, _ = cli(capsys, "verify", f, *SPEC_ARGS)
        assert rc == 0 and out.startswith("ok:") and "no sidecar" in out


def test_torch_zip_with_tampered_pickle_inside(tmp_path, net):
    """Swap the data.pkl of a genuine torch zip for a malicious one: still refused."""
    good = tmp_path / "good.pt"
    torch.save(net.net.state_dict(), good)
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps(Marker(str(marker)), protocol=2)
            zout.writestr(item, data)
    with pytest.raises(ModelError):
        load_model(bad, arch="cnn-small", num_classes=10, input_shape=(1, 28, 28))
    assert not marker.exists()


# -------------------------------------------------------------------------------------------------
# data files


@pytest.mark.parametrize("victim", ["data_batch_3", "test_batch", "batches.meta"])
def test_cifar10_any_pickle_file_is_guarded(tmp_path, capsys, victim):
    d = write_cifar10_dir(tmp_path / "c10", 4)
    marker = tmp_path / "pwned"
    with open(d / victim, "wb") as fh:
        pickle.dump({b"data": Marker(str(marker)), b"label_names": [Marker(str(marker))]}, fh, protocol=2)
    split = "test" if victim == "test_batch" else "train"
    with pytest.raises(DataError, match="refusing"):
        load_dataset(d, split)
    rc, _, err = cli(capsys, "evaluate", "--model", tmp_path / "missing", "--data", d)  # model fails first
    assert rc == 3
    assert not marker.exists()


def test_cifar100_pickle_is_guarded_through_the_cli(tmp_path, capsys, model_dir):
    d = write_cifar100_dir(tmp_path / "c100", 4)
    marker = tmp_path / "pwned"
    with open(d / "train", "wb") as fh:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": Marker(str(marker))}, fh)
    out_dir = tmp_path / "out"
    rc, _, err = cli(capsys, "cleanse", "--model", model_dir, "--data", d, "--out", out_dir, "--threads", "1")
    assert rc == 4 and "refusing to load" in one_error_line(err)
    assert not marker.exists() and not out_dir.exists() and not Path(str(out_dir) + ".partial").exists()


def test_npz_with_object_array_is_refused(tmp_path, capsys, model_dir):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.npz"
    np.savez(f, x=np.array([Marker(str(marker))], dtype=object))
    np.load(f, allow_pickle=True)["x"]  # control: the unsafe way runs the payload
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DataError):
        load_dataset(f, labels=False)
    rc, _, err = cli(capsys, "cleanse", "--model", model_dir, "--data", f, "--out", tmp_path / "o")
    assert rc == 4 and "not a readable .npz" in one_error_line(err)
    assert not marker.exists()


# -------------------------------------------------------------------------------------------------
# bcu verify


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_sidecar(d: Path, **changes) -> None:
    side = json.loads((d / "model.json").read_text())
    for k, v in changes.items():
        if v is None:
            side.pop(k, None)
        else:
            side[k] = v
    (d / "model.json").write_text(json.dumps(side))


def test_verify_accepts_an_intact_model(capsys, model_dir):
    rc, out, err = cli(capsys, "verify", model_dir)
    digest = sha256_file(model_dir / "model.safetensors")
    assert rc == 0 and err == "" and out.startswith("ok:") and digest in out and "cnn-small" in out


def test_verify_catches_modified_weights(tmp_path, capsys, model_dir, net):
    """Weights changed after saving (still a valid safetensors file): the sidecar sha256 no longer matches."""
    from safetensors.torch import save

    d = _copy_model(model_dir, tmp_path / "m")
    state = {k: v.clone() for k, v in net.net.state_dict().items()}
    k0 = next(k for k, v in state.items() if v.is_floating_point())
    state[k0].view(-1)[0] += 1.0  # one weight nudged: a planted backdoor would look like this
    (d / "model.safetensors").write_bytes(save(state, metadata={"format": "bcu-model/1"}))
    rc, out, err = cli(capsys, "verify", d)
    assert rc == 3 and out == "" and "does not match the SHA-256" in one_error_line(err)


@pytest.mark.parametrize("change,expect", [
    ({"arch": "cnn4"}, "does not match architecture"),
    ({"num_classes": 5}, "output classes, not num_classes=5"),
    ({"input_shape": [1, 32, 32]}, "expects"),
    ({"arch": "no-such-net"}, "unknown architecture"),
    ({"arch": None}, "does not name an architecture"),
    ({"sha256": None}, "records no sha256"),
])
def test_verify_catches_architecture_mismatch(tmp_path, capsys, model_dir, change, expect):
    d = _copy_model(model_dir, tmp_path / "m")
    _edit_sidecar(d, **change)
    rc, out, err = cli(capsys, "verify", d)
    assert rc == 3 and out == "" and expect in one_error_line(err)


def test_verify_with_overriding_options(capsys, model_dir):
    rc, _, err = cli(capsys, "verify", model_dir, "--num-classes", "7")
    assert rc == 3 and "not num_classes=7" in one_error_line(err)
    rc, _, err = cli(capsys, "verify", model_dir, "--arch", "resnet18")
    assert rc == 3 and "does not match architecture" in one_error_line(err)


# -------------------------------------------------------------------------------------------------
# provenance in reports


def test_cleanse_and_defend_reports_carry_hashes(tmp_path, capsys, model_dir, npz):
    out = tmp_path / "c"
    rc, stdout, err = cli(capsys, "cleanse", "--model", model_dir, "--data", npz, "--out", out, "--epochs", "1",
                          "--batch-size", "32", "--threads", "1")
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["input"]["sha256"] == sha256_file(model_dir / "model.safetensors")
    assert rep["input"]["data_sha256"] == load_dataset(npz, labels=False).fingerprint()
    assert rep["output"]["sha256"] == sha256_file(out / "model.safetensors")
    assert rep["input"]["labels_read"] is False
    side = json.loads((out / "model.json").read_text())
    assert side["sha256"] == rep["output"]["sha256"] and side["teacher_sha256"] == rep["input"]["sha256"]
    rc, _, _ = cli(capsys, "verify", out)
    assert rc == 0

    out2 = tmp_path / "d"
    rc, _, err = cli(capsys, "defend", "--defense", "re", "--model", model_dir, "--data", npz, "--out", out2,
                     "--threads", "1")
    assert rc == 0, err
    rep = json.loads((out2 / "report.json").read_text())
    assert rep["input"]["sha256"] == sha256_file(model_dir / "model.safetensors")
    assert rep["input"]["data_sha256"] == load_dataset(npz, labels=False).fingerprint()
    assert rep["output"]["sha256"] == sha256_file(out2 / "model.safetensors")


# -------------------------------------------------------------------------------------------------
# issue 14, finding 6: NaN/Inf checked after the cast to the model's dtype, for every dtype


def _pt_with(tmp_path: Path, net, key_edit) -> Path:
    state = {k: v.clone() for k, v in net.net.state_dict().items()}
    k = next(k for k, v in state.items() if v.dim() == 4)
    state[k] = key_edit(state[k])
    f = tmp_path / "m.pt"
    torch.save(state, f)
    return f


@pytest.mark.parametrize("what,edit,expect", [
    ("complex64 holding NaN", lambda t: torch.complex(t, t).to(torch.complex64).index_fill_(0, torch.tensor([0]),
                                                                                           complex(float("nan"), 0)),
     "has dtype complex64, which bcu does not load"),
    ("float64 that overflows float32", lambda t: t.double().index_fill_(0, torch.tensor([0]), 1e300),
     "overflows to Inf as float32"),
    ("float64 holding NaN", lambda t: t.double().index_fill_(0, torch.tensor([0]), float("nan")), "contains NaN or Inf"),
    ("float8_e4m3", lambda t: t.to(torch.float8_e4m3fn), "has dtype float8_e4m3fn, which bcu does not load"),
    ("uint32", lambda t: t.to(torch.uint32), "has dtype uint32, which bcu does not load"),
])
def test_verify_checks_every_dtype_after_the_cast(tmp_path, capsys, net, what, edit, expect):
    f = _pt_with(tmp_path, net, edit)
    rc, out, err = cli(capsys, "verify", f, *SPEC_ARGS)
    assert rc == 3 and out == "" and expect in one_error_line(err)


def test_supported_dtypes_still_load(tmp_path, capsys, net):
    """float64 / float16 / bfloat16 weights of finite values load, cast to the model's float32."""
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        f = _pt_with(tmp_path, net, lambda t: t.to(dt))
        rc, out, err = cli(capsys, "verify", f, *SPEC_ARGS)
        assert rc == 0 and out.startswith("ok:"), err


def test_refusal_of_a_blocked_module_keeps_torchs_reason(tmp_path, capsys):
    """Finding 7: a pickle naming os.system used to give '... (Weights only load failed. In PyTorch
    2.6, we changed ... Re-running `torch.)': torch's reason lost, the line cut mid-sentence."""
    f = tmp_path / "evil.pt"
    f.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    rc, _, err = cli(capsys, "verify", f, *SPEC_ARGS)
    line = one_error_line(err)
    assert rc == 3 and line.endswith(
        "is not a plain state dict; refusing to unpickle it (Trying to load unsupported GLOBAL os.system whose "
        "module os is blocked)"), line
    assert "Re-running" not in line and "PyTorch 2.6" not in line
