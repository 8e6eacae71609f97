"""Property-based fuzzing of everything that parses untrusted input.

The property: whatever the bytes or values, only the documented error type escapes -- a
:class:`~bcu.errors.BcuError` subclass (ModelError for model files and sidecars, ConfigError for
options and config files, DataError for image files) -- never a raw ``KeyError``, ``struct.error``,
``zipfile.BadZipFile``... that would reach the user as a traceback. Budgets are bounded
(``max_examples`` per test, no deadline) so the file runs in well under 30 s at one thread.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from bcu.attacks import ATTACKS, load_attack
from bcu.checkpoint import load_model, read_sidecar, save_model, spec_from_sidecar
from bcu.config import from_dict, load_file, parse_overrides
from bcu.data import load_dataset, make_synthetic, read_cifar_dir, read_idx
from bcu.defenses.bcu import CleanseConfig, preset
from bcu.errors import BcuError, ConfigError, DataError, ModelError
from bcu.models import ModelSpec, create_model
from bcu.train import OptimConfig, fit

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
              st.text(max_size=10) | st.sampled_from(["[1, 2", "{a: 1}", "true", "1e999", "- x",
                                                      "!!python/object:os.system", "0.5"]))
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
    """bcu.data.stream (``--stream``): memory-mapped .npy/.npz, read batch by batch."""

    ext, raw = case
    f = fresh(work, "d" + ext)
    f.write_bytes(raw)

    def run():
        s = load_dataset(f, labels=False, stream=True, workers=0)
        s.images[[0]]  # read one image through the stream

    _expect_data_error(run)


# -------------------------------------------------------------------------------------------------
# issue 14, finding 15: the shapes of the hostile files above, for every parser -- only bcu's own
# error type escapes, and memory stays bounded (peak RSS measured per example on Linux)


MEMORY_BUDGET_MB = 400
FUZZ_SMALL = settings(FUZZ, max_examples=40)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def bounded_memory():
    """Peak memory added inside the block stays under MEMORY_BUDGET_MB (Linux: the kernel's high-water
    mark, reset through /proc/self/clear_refs; elsewhere only the exception property is checked)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        start = _status_kb("VmRSS")
    except OSError:
        yield
        return
    yield
    grown = (_status_kb("VmHWM") - start) / 1024
    assert grown < MEMORY_BUDGET_MB, f"peak memory grew by {grown:.0f} MB"


def only(error, fn):
    """Run ``fn``; ``error`` (a BcuError subclass) may escape, nothing else; memory bounded."""
    with bounded_memory():
        try:
            fn()
        except error:
            pass


def _nested(depth: int) -> list:
    x: list = []
    for _ in range(depth):
        x = [x]
    return x


huge_ints = st.sampled_from([-1, 0, 1, 2, 7, 2**31, 2**32 - 1, 2**63, 2**64, -(2**63) - 1, 10**3999, 10**30])
hostile = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | huge_ints
           | st.sampled_from([1e300, -1e308, 1e-300, "abc", "", "1" * 50, [], {}, [3, 32], [1, 1e300, 28],
                              [1, 28, 28], [3, 100000, 100000], [2**40, 2, 2], {"hidden": -1}, {"hidden": 10**6},
                              {"width": 1e300}, {"width": 1000}, {"width": "x"}, {"hidden": 64}])
           | st.integers(1, 200).map(lambda n: _nested(n)))


def _json_text(obj) -> str:
    return json.dumps(obj, default=str)


SIDECAR_BASE = {"num_classes": 10, "input_shape": [1, 28, 28], "mean": [0.5], "std": [0.25], "kwargs": {"width": 0.25}}


@FUZZ_SMALL
@given(st.dictionaries(st.sampled_from(["num_classes", "input_shape", "mean", "std", "kwargs", "classes"]), hostile,
                       max_size=2), st.sampled_from(["cnn-small", "cnn4", "resnet18"]))
@example({"kwargs": {"hidden": 10**6}}, "cnn-small")
@example({"kwargs": {"width": 1000}}, "cnn-small")
@example({"kwargs": {"hidden": -1}}, "cnn-small")
@example({"input_shape": [3, 100000, 100000]}, "cnn-small")
@example({"num_classes": 10**3999}, "cnn-small")
def test_sidecar_shapes_through_load_model(work, saved_model, side, arch):
    """saved_model's weights are cnn-small at width 0.25; the sidecar says otherwise."""
    d, _ = saved_model
    m = fresh(work, "m")
    m.mkdir()
    (m / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    (m / "model.json").write_text(_json_text({"arch": arch, **SIDECAR_BASE, **side}))
    only(ModelError, lambda: load_model(m))


@FUZZ_SMALL
@given(st.sampled_from(sorted(ATTACKS.names()) + ["nope", 5]), hostile, hostile,
       st.dictionaries(st.sampled_from(["target", "poison_rate", "seed", "patch_size", "margin", "k", "alpha",
                                        "gen_channels", "gen_stages", "pattern_image", "delta", "mode"]),
                       hostile, max_size=4) | hostile)
def test_attack_json_shapes(work, name, shape, classes, config):
    d = fresh(work, "a")
    d.mkdir()
    (d / "attack.json").write_text(_json_text({"name": name, "image_shape": shape, "num_classes": classes,
                                               "config": config}))
    only(DataError, lambda: load_attack(d))


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory):
    """A tiny model, data, and a genuine checkpoint of 1 finished epoch to mutate."""
    d = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    data = make_synthetic(32, (1, 8, 8), 10, seed=0)
    net = create_model("cnn-small", 10, (1, 8, 8), width=0.25)
    fit(net, data, lambda m, x, y, s: (m(x).pow(2).mean(), {"loss": 0.0}), OptimConfig(epochs=1, batch_size=8),
        resume_dir=d, progress=False, with_labels=False)
    return data, torch.load(d / "state.pt", weights_only=True)


tensors = st.sampled_from([torch.zeros(3), torch.zeros(0), torch.full((2, 2), float("nan")),
                           torch.zeros(4, 1, 3, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.complex64),
                           torch.zeros(2, dtype=torch.float8_e4m3fn), torch.tensor(5)])


@settings(FUZZ, max_examples=20)  # each example runs fit
@given(st.fixed_dictionaries({}, optional={"epoch": hostile, "history": hostile | st.lists(
    st.dictionaries(st.text(max_size=6), hostile, max_size=3), max_size=3), "extra": hostile,
    }), st.booleans(), st.one_of(st.none(), st.sampled_from(["model", "optimizer"])),
    tensors)
@example({"epoch": 10**6}, False, None, torch.zeros(3))
@example({}, False, "model", torch.zeros(2, dtype=torch.complex64))
@example({"history": "x"}, False, None, torch.zeros(3))
def test_state_pt_shapes(work, resume_case, changes, drop, bad_part, tensor):
    data, good = resume_case
    state = {**good, **changes}
    if drop:
        state.pop(next(iter(changes), "extra"), None)
    if bad_part == "model":
        state = {**state, "model": {**good["model"], next(iter(good["model"])): tensor}}
    elif bad_part == "optimizer":
        state = {**state, "optimizer": {"state": {0: {"momentum_buffer": tensor}},
                                        "param_groups": good["optimizer"]["param_groups"]}}
    d = fresh(work, "r")
    d.mkdir()
    torch.save(state, d / "state.pt")
    torch.manual_seed(0)
    net = create_model("cnn-small", 10, (1, 8, 8), width=0.25)
    objective = lambda m, x, y, s: (m(x).pow(2).mean(), {"loss": 0.0})  # noqa: E731
    only(BcuError, lambda: fit(net, data, objective, OptimConfig(epochs=3, batch_size=8), resume_dir=d,
                               progress=False, with_labels=False))


class _Obj:
    def __init__(self, reduce):
        self.r = reduce

    def __reduce__(self):
        return self.r


def _self_ref():
    x = []
    x.append(x)
    return x


def _doubling(depth):
    x = [0]
    for _ in range(depth):
        x = [x, x]
    return x


cifar_values = (hostile
                | st.sampled_from(["self-ref", "doubling", "reconstruct", "ndarray", "ragged"]).map(lambda k: {
                    "self-ref": _self_ref(), "doubling": _doubling(28), "ragged": [[0] * 3072, [1]],
                    "reconstruct": _Obj((np.ndarray.__reduce__(np.zeros(0, np.uint8))[0],
                                         (np.ndarray, (10**6, 3072), b"B"))),
                    "ndarray": np.zeros((2, 3072), np.uint8)}[k])
                | st.tuples(st.integers(0, 5), st.integers(0, 4000), st.sampled_from(["u1", "f4", "i8", "O"])).map(
                    lambda t: np.zeros((t[0], t[1]), t[2])))


@FUZZ_SMALL
@given(cifar_values, cifar_values, cifar_values, st.booleans(), edits)
def test_cifar_shapes(work, data, labels, names, with_labels, e):
    d = fresh(work, "cifar")
    d.mkdir()
    raw = pickle.dumps({b"data": data, b"labels": labels}, protocol=2)
    (d / "data_batch_1").write_bytes(mutate(raw, e) if e[0] else raw)
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    only(DataError, lambda: read_cifar_dir(d, "train", labels=with_labels))


@FUZZ_SMALL
@given(st.integers(0, 6), st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 64), min_size=0, max_size=6),
       st.binary(max_size=64), st.booleans())
def test_idx_header_shapes(work, ndim, dims, body, gz):
    raw = bytes([0, 0, 8, ndim]) + b"".join(struct.pack(">I", v) for v in dims) + body
    f = fresh(work, "train-images-idx3-ubyte" + (".gz" if gz else ""))
    f.write_bytes(gzip.compress(raw) if gz else raw)
    only(DataError, lambda: read_idx(f))


def _npy_with_header(shape, descr: str, body: bytes) -> bytes:
    header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}".encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


npy_shapes = st.lists(st.integers(0, 64) | huge_ints.filter(lambda v: 0 <= v < 2**70), min_size=0, max_size=5)
npy_descr = st.sampled_from(["|u1", "<f4", "<f8", "|O", "<c16", "|b1", "<u2", "V8"])


@FUZZ_SMALL
@given(npy_shapes, npy_descr, st.binary(max_size=128), st.booleans(), st.booleans())
def test_npy_and_npz_declared_shapes(work, shape, descr, body, compressed, stream):
    raw = _npy_with_header(shape, descr, body)
    f = fresh(work, "d.npz")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as z:
        z.writestr("x.npy", raw)
    f.write_bytes(buf.getvalue())
    npy = f.with_suffix(".npy")
    npy.write_bytes(raw)
    if stream:
        only(DataError, lambda: load_dataset(f, labels=False, stream=True, workers=0).images[[0]])
        only(DataError, lambda: load_dataset(npy, labels=False, stream=True, workers=0).images[[0]])
    else:
        only(DataError, lambda: load_dataset(f, labels=False))


def _png(w: int, h: int, depth: int, color: int) -> bytes:
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@FUZZ_SMALL
@given(st.integers(0, 2**31 - 1) | st.integers(0, 64), st.integers(0, 2**31 - 1) | st.integers(0, 64),
       st.sampled_from([1, 8, 16]), st.sampled_from([0, 2, 3, 4, 6]))
def test_image_header_sizes(work, w, h, depth, color):
    f = fresh(work, "img.png")
    f.write_bytes(_png(w, h, depth, color))
    only(DataError, lambda: load_dataset(f.parent, labels=False))


@FUZZ_SMALL
@given(st.integers(1, 10), st.integers(1, 12), st.booleans(), st.integers(0, 120), st.sampled_from(["", "preset"]))
@example(9, 9, False, 0, "")  # the billion laughs
@example(9, 9, False, 1, "preset")
@example(1, 1, True, 0, "")
def test_yaml_aliases_and_nesting(work, levels, fanout, recursive, depth, where):
    """Anchors defined inside the value of a real option, each level aliasing the previous one
    ``fanout`` times: ``optim: [&a0 [x, ...], &a1 [*a0, ...], ...]`` (9 x 9 is the billion laughs)."""
    parts = [f"&a0 [{', '.join(['x'] * fanout)}]"]
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]")
    if recursive:
        parts.append("&r [*r]")
    value = "[" * depth + "[" + ", ".join(parts) + "]" + "]" * depth
    f = fresh(work, "c.yaml")
    f.write_text(f"{where or 'optim'}: {value}\n")
    only(ConfigError, lambda: preset("default", load_file(f)))
    only(ConfigError, lambda: parse_overrides([f"optim={'[' * depth}1{']' * depth}"]))
