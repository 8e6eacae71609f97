"""Property-based fuzzing of everything that parses untrusted input.

The property: whatever the bytes or values, only the documented error type escapes -- a
:class:`~bcu.errors.BcuError` subclass (ModelError for model files and sidecars, ConfigError for
options and config files, DataError for image files) -- never a raw ``KeyError``, ``struct.error``,
``zipfile.BadZipFile``... that would reach the user as a traceback. Budgets are bounded
(``max_examples`` per test, no deadline) so the file runs in well under 30 s at one thread.
"""
from __future__ import annotations

import gzip
import io
import itertools
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bcu.checkpoint import load_model, read_sidecar, save_model, spec_from_sidecar
from bcu.config import from_dict, load_file, parse_overrides
from bcu.data import load_dataset, read_idx
from bcu.defenses.bcu import CleanseConfig, preset
from bcu.errors import BcuError, ConfigError, DataError, ModelError
from bcu.models import ModelSpec, create_model

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_counter = itertools.count()

scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12))
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh(work: Path, name: str) -> Path:
    d = work / f"case{next(_counter)}"
    d.mkdir()
    return d / name


def mutate(data: bytes, edits) -> bytes:
    """Apply (position, byte) overwrites and an optional truncation to ``data``."""
    buf = bytearray(data)
    pos_bytes, cut = edits
    for pos, val in pos_bytes:
        if buf:
            buf[pos % len(buf)] = val
    if cut is not None and buf:
        buf = buf[: cut % (len(buf) + 1)]
    return bytes(buf)


edits = st.tuples(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
                  st.none() | st.integers(0, 10**6))


# -------------------------------------------------------------------------------------------------
# sidecars and model files -> ModelError


spec_keys = st.sampled_from(["arch", "num_classes", "input_shape", "mean", "std", "kwargs", "classes", "sha256"])
spec_values = st.sampled_from(["cnn-small", "resnet18", 10, 0, -3, [1, 28, 28], [3, 32], [0.5], [0.0, 0.0, 0.0],
                               {"width": 2}, ["a", "b"], None, "", 1e309]) | json_like


@FUZZ
@given(st.dictionaries(spec_keys | st.text(max_size=6), spec_values, max_size=7))
def test_spec_from_sidecar(data):
    try:
        spec = spec_from_sidecar(data)
    except ModelError:
        return
    assert isinstance(spec, ModelSpec)


@FUZZ
@given(st.binary(max_size=200) | json_like.map(lambda v: json.dumps(v).encode()))
def test_read_sidecar(work, raw):
    f = fresh(work, "model.json")
    f.write_bytes(raw)
    try:
        assert isinstance(read_sidecar(f), dict)
    except ModelError:
        pass


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = create_model("cnn-small", 10, (1, 28, 28), mean=(0.5,), std=(0.25,), width=0.25)
    save_model(net, d)
    buf = io.BytesIO()
    torch.save(net.net.state_dict(), buf)
    return d, buf.getvalue()


@FUZZ
@given(edits, st.booleans())
def test_mutated_model_files(work, saved_model, e, keep_sha):
    """Byte-mutated safetensors (sidecar hash dropped so parsing is reached) and torch zips."""
    d, torch_bytes = saved_model
    m = fresh(work, "m")
    m.mkdir()
    m_side = json.loads((d / "model.json").read_text())
    if not keep_sha:
        m_side.pop("sha256")
    (m / "model.json").write_text(json.dumps(m_side))
    (m / "model.safetensors").write_bytes(mutate((d / "model.safetensors").read_bytes(), e))
    for path, kw in ((m, {}), (m.parent / "w.pt", {"arch": "cnn-small", "num_classes": 10, "width": 0.25})):
        if path.suffix == ".pt":
            path.write_bytes(mutate(torch_bytes, e))
        try:
            load_model(path, **kw)
        except ModelError:
            pass


# -------------------------------------------------------------------------------------------------
# configs -> ConfigError

cfg_keys = st.sampled_from(["reinit", "distill", "optim", "augment", "stop", "seed", "epochs", "lr", "stem",
                            "stages", "head", "t_start", "t_end", "mixup_alpha", "rule", "batch_size",
                            "schedule", "milestones", "crop_pad", "hflip", "patience"])
cfg_tree = st.recursive(scalars | st.sampled_from(["cosine", "plateau", "none", [0.1, 0.2], "0.5"]),
                        lambda inner: st.dictionaries(cfg_keys | st.text(max_size=5), inner, max_size=4)
                        | st.lists(inner, max_size=4), max_leaves=14)


@FUZZ
@given(st.dictionaries(cfg_keys, cfg_tree, max_size=5))
def test_cleanse_config_from_dict(data):
    try:
        cfg = from_dict(CleanseConfig, data)
    except ConfigError:
        return
    assert isinstance(cfg, CleanseConfig)


override_text = st.lists(
    st.tuples(st.lists(cfg_keys | st.text(max_size=4), min_size=0, max_size=3).map(".".join),
              st.sampled_from(["=", "", "=="]),
              st.text(max_size=10) | st.sampled_from(["[1, 2", "{a: 1}", "true", "1e999", "- x", "!!python/object:os.system", "0.5"]))
    .map("".join), max_size=5)


@FUZZ
@given(override_text)
def test_parse_overrides_then_preset(items):
    try:
        over = parse_overrides(items)
        assert isinstance(over, dict)
        cfg = preset("default", over)
    except ConfigError:
        return
    assert isinstance(cfg, CleanseConfig)


@FUZZ
@given(st.sampled_from([".yaml", ".yml", ".toml", ".json", ".cfg"]),
       st.text(max_size=120) | cfg_tree.map(lambda v: json.dumps(v, default=str))
       | st.sampled_from(["!!python/object/apply:os.system ['touch /tmp/x']", "a: [", "[optim]\nepochs = ",
                          "\x00\x01", "optim:\n  epochs: 3\n  lr: .nan"]))
def test_load_file(work, suffix, text):
    f = fresh(work, "c" + suffix)
    f.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        data = load_file(f)
        assert isinstance(data, dict)
        preset("default", data)
    except ConfigError:
        pass


# -------------------------------------------------------------------------------------------------
# image files -> DataError


def _png_bytes(mode: str) -> bytes:
    buf = io.BytesIO()
    arr = np.arange(8 * 8 * (3 if mode == "RGB" else 1), dtype=np.uint8).reshape((8, 8, 3) if mode == "RGB" else (8, 8))
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((3, 1, 8, 8), np.uint8), y=np.arange(3))
    return buf.getvalue()


def _idx_bytes() -> bytes:
    arr = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    return bytes([0, 0, 8, 3]) + struct.pack(">III", 3, 8, 8) + arr.tobytes()


def _npy_bytes() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 1, 8, 8))
    return buf.getvalue()


PNG_L, PNG_RGB, NPZ, NPY, IDX = _png_bytes("L"), _png_bytes("RGB"), _npz_bytes(), _npy_bytes(), _idx_bytes()


def _expect_data_error(fn) -> None:
    try:
        fn()
    except DataError:
        pass


@FUZZ
@given(st.binary(max_size=300) | st.sampled_from([PNG_L, PNG_RGB]).flatmap(
    lambda b: edits.map(lambda e: mutate(b, e))), st.sampled_from([".png", ".jpg", ".bmp", ".gif", ".webp"]))
def test_image_folder(work, raw, ext):
    f = fresh(work, "img" + ext)
    f.write_bytes(raw)
    (f.parent / ("ok" + ".png")).write_bytes(PNG_L)
    _expect_data_error(lambda: load_dataset(f.parent, labels=False))


def _zip_member(raw: bytes) -> bytes:
    """A well-formed zip (valid CRCs) around a damaged ``x.npy``: reaches numpy's header parser."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", raw)
    return buf.getvalue()


@FUZZ
@given(st.binary(max_size=300) | edits.map(lambda e: mutate(NPZ, e))
       | edits.map(lambda e: _zip_member(mutate(NPY, e))), st.booleans())
def test_npz(work, raw, labels):
    f = fresh(work, "d.npz")
    f.write_bytes(raw)
    _expect_data_error(lambda: load_dataset(f, labels=labels))


@FUZZ
@given(st.binary(max_size=300) | edits.map(lambda e: mutate(IDX, e)), st.booleans())
def test_idx(work, raw, gz):
    f = fresh(work, "train-images-idx3-ubyte" + (".gz" if gz else ""))
    f.write_bytes(gzip.compress(raw) if gz and raw[:1] != b"\x1f" else raw)
    _expect_data_error(lambda: read_idx(f))
    _expect_data_error(lambda: load_dataset(f.parent, labels=False))


def test_only_bcu_errors_are_documented():
    """The property above is about these types: all are BcuError subclasses with an exit code."""
    for cls in (ModelError, ConfigError, DataError):
        assert issubclass(cls, BcuError) and cls.exit_code in (2, 3, 4)



@FUZZ
@given(st.sampled_from([(".npz", NPZ), (".npy", NPY)]).flatmap(
    lambda kb: edits.map(lambda e: (kb[0], mutate(kb[1], e)))))
def test_streaming_loader(work, case):
    """bcu.stream (``--stream``): memory-mapped .npy/.npz, read batch by batch."""
    from bcu.stream import load_stream

    ext, raw = case
    f = fresh(work, "d" + ext)
    f.write_bytes(raw)

    def run():
        s = load_stream(f, labels=False, workers=0)
        s.images[[0]]  # read one image through the stream

    _expect_data_error(run)
