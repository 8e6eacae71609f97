"""Crashes, interruptions and determinism.

(a) Inputs are never written: every CLI command leaves its input files byte-identical, and an
    audit hook sees no open-for-writing, rename, delete or chmod of anything under the inputs.
(b) ``kill -9`` mid-run, then ``--resume``: the final model is bit-identical (sha256) to an
    uninterrupted run with the same seed (``bcu cleanse`` and ``bcu attack``).
(c) Ctrl-C (SIGINT): exit 130, one line saying how to resume, ``<out>.partial`` keeps the
    checkpoint, and ``--resume`` completes (again bit-identical).
(d) Determinism: two uninterrupted runs, same seed, same machine, CPU, one thread: same hashes.

The subprocess runs use one thread, 600-800 tiny images and epochs of ~0.2 s: a kill lands after
epoch 2 of 6 with about a second to spare (the poll interval is 20 ms).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bcu.checkpoint import sha256_file
from bcu.cli import main
from bcu.data import make_synthetic

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "BCU_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
EPOCHS = 6


def bcu(*argv, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bcu", *map(str, argv)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bcu", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def epochs_saved(out: Path) -> int:
    """Completed epochs recorded in ``<out>.partial/resume/state.pt`` (0 when there is none yet)."""
    f = Path(str(out) + ".partial") / "resume" / "state.pt"
    try:
        return int(torch.load(f, map_location="cpu", weights_only=True)["epoch"]) + 1
    except Exception:  # not there yet, or (never, thanks to the atomic rename) half written
        return 0


def wait_for_epoch(proc: subprocess.Popen, out: Path, epochs: int, limit: float = 90) -> int:
    t0 = time.time()
    while time.time() - t0 < limit:
        n = epochs_saved(out)
        if n >= epochs:
            return n
        if proc.poll() is not None:
            raise AssertionError(f"run ended before epoch {epochs}: rc={proc.returncode} {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory) -> Path:
    """A small backdoored model and 600 held-out unlabeled images (unlabeled.npz)."""
    d = tmp_path_factory.mktemp("bd")
    r = bcu("attack", "--attack", "badnets", "--data", "synthetic:1100", "--epochs", "1", "--holdout", "600",
            "--batch-size", "64", "--threads", "1", "--out", d / "m")
    assert r.returncode == 0, r.stderr
    return d / "m"


def cleanse_args(model: Path, out: Path):
    return ["cleanse", "--model", model, "--data", model / "unlabeled.npz", "--epochs", EPOCHS, "--batch-size", "32",
            "--seed", "3", "--threads", "1", "--no-progress", "--out", out]


def attack_args(out: Path):
    return ["attack", "--attack", "badnets", "--data", "synthetic:800", "--holdout", "0", "--epochs", EPOCHS,
            "--batch-size", "32", "--seed", "5", "--threads", "1", "--no-progress", "--out", out]


@pytest.fixture(scope="module")
def cleanse_reference(backdoored, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ref") / "c"
    r = bcu(*cleanse_args(backdoored, out))
    assert r.returncode == 0, r.stderr
    assert not Path(str(out) + ".partial").exists() and not (out / "resume").exists()
    return sha256_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def attack_reference(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ref") / "a"
    r = bcu(*attack_args(out))
    assert r.returncode == 0, r.stderr
    return sha256_file(out / "model.safetensors")


# -------------------------------------------------------------------------------------------------
# (b) kill -9, then --resume


def _kill_and_resume(args, out: Path, reference: str) -> None:
    proc = start(*args)
    n = wait_for_epoch(proc, out, 2)
    proc.kill()  # SIGKILL: no handler runs, nothing is cleaned up
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert n < EPOCHS and not out.exists(), "the run finished before it could be killed"
    assert (Path(str(out) + ".partial") / "resume" / "state.pt").is_file()
    r = bcu(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert not Path(str(out) + ".partial").exists() and not (out / "resume").exists()
    assert sha256_file(out / "model.safetensors") == reference
    return r


@pytest.mark.slow  # real subprocesses
def test_cleanse_kill9_then_resume_is_bit_identical(backdoored, cleanse_reference, tmp_path):
    out = tmp_path / "c"
    _kill_and_resume(cleanse_args(backdoored, out), out, cleanse_reference)
    hist = json.loads((out / "report.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == list(range(1, EPOCHS + 1))  # history survives the kill too


@pytest.mark.slow  # real subprocesses
def test_attack_kill9_then_resume_is_bit_identical(attack_reference, tmp_path):
    out = tmp_path / "a"
    _kill_and_resume(attack_args(out), out, attack_reference)


@pytest.mark.slow  # needs the backdoored model (one subprocess run)
def test_resume_from_a_corrupt_checkpoint_is_one_line(backdoored, tmp_path, capsys):
    out = tmp_path / "c"
    staging = Path(str(out) + ".partial")
    (staging / "resume").mkdir(parents=True)
    (staging / "resume" / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    rc = main([str(a) for a in cleanse_args(backdoored, out)] + ["--resume"])
    lines = capsys.readouterr().err.strip("\n").split("\n")
    assert rc == 1 and len(lines) == 1 and "is unreadable" in lines[0] and "without --resume" in lines[0]
    assert not out.exists() and not staging.exists()


# -------------------------------------------------------------------------------------------------
# (c) Ctrl-C


@pytest.mark.slow  # real subprocesses
def test_cleanse_sigint_keeps_checkpoint_and_resume_completes(backdoored, cleanse_reference, tmp_path):
    out = tmp_path / "c"
    args = cleanse_args(backdoored, out)
    proc = start(*args)
    wait_for_epoch(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("bcu: error: cleanse interrupted after epoch "), err
    assert "run the same command with --resume to continue" in lines[0]
    staging = Path(str(out) + ".partial")
    assert (staging / "resume" / "state.pt").is_file() and not out.exists()
    r = bcu(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert sha256_file(out / "model.safetensors") == cleanse_reference and not staging.exists()


@pytest.mark.slow  # real subprocesses
def test_sigint_before_the_first_checkpoint_leaves_nothing(backdoored, tmp_path):
    """Interrupted before any epoch finished: nothing to resume, so nothing is kept, and the
    message does not promise --resume."""
    out = tmp_path / "c"
    args = cleanse_args(backdoored, out)
    args[args.index("--epochs") + 1] = 50
    proc = start(*args)
    staging = Path(str(out) + ".partial")
    t0 = time.time()
    while not staging.exists() and proc.poll() is None and time.time() - t0 < 60:
        time.sleep(0.01)
    assert epochs_saved(out) == 0, "the first epoch ended before the signal could be sent"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("bcu: error: ") and "--resume" not in lines[0], err
    assert not staging.exists() and not out.exists(), (err, sorted(map(str, staging.rglob("*"))))


# -------------------------------------------------------------------------------------------------
# (d) determinism


@pytest.mark.slow  # real subprocesses
def test_cleanse_is_deterministic(backdoored, cleanse_reference, tmp_path):
    """A second uninterrupted run gives the same model. It also starts where a crashed run left
    ``<out>.partial`` behind: without --resume that leftover is discarded, not used."""
    out = tmp_path / "c"
    staging = Path(str(out) + ".partial")
    (staging / "resume").mkdir(parents=True)
    (staging / "resume" / "state.pt").write_bytes(b"left over by a crash")
    r = bcu(*cleanse_args(backdoored, out))
    assert r.returncode == 0, r.stderr
    assert sha256_file(out / "model.safetensors") == cleanse_reference and not staging.exists()


@pytest.mark.slow  # real subprocesses
def test_attack_is_deterministic(attack_reference, tmp_path):
    out = tmp_path / "a"
    r = bcu(*attack_args(out))
    assert r.returncode == 0, r.stderr
    assert sha256_file(out / "model.safetensors") == attack_reference
    assert sha256_file(out / "attack.safetensors")  # the trigger artifact is written too


# -------------------------------------------------------------------------------------------------
# (a) inputs are read, never written

_WATCH: dict = {"root": None, "hits": []}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PATH_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.chown", "os.utime",
                "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.mkdir", "os.link", "os.symlink"}


def _under_root(p) -> bool:
    root = _WATCH["root"]
    if root is None or isinstance(p, int) or p is None:
        return False
    try:
        q = os.path.realpath(os.fsdecode(p))
    except (TypeError, ValueError):
        return False
    return q == root or q.startswith(root + os.sep)


def _audit(event, args):
    if _WATCH["root"] is None:
        return
    if event == "open":
        path, mode, flags = args
        if _under_root(path) and ((isinstance(flags, int) and flags & _WRITE_FLAGS)
                                  or (isinstance(mode, str) and any(c in mode for c in "wax+"))):
            _WATCH["hits"].append((event, path, mode))
    elif event in _PATH_EVENTS:
        targets = args[:2] if event in ("os.rename", "os.link", "os.symlink", "shutil.move", "shutil.copyfile") \
            else args[:1]
        if event in ("shutil.copyfile", "os.link", "os.symlink"):
            targets = args[1:2]  # the destination is what matters
        if any(_under_root(t) for t in targets):
            _WATCH["hits"].append((event, args))


_HOOKED = False


def _hash_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_no_command_writes_its_inputs(tmp_path, capsys):
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)  # hooks cannot be removed; this one is inert unless _WATCH["root"] is set
        _HOOKED = True
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    tr, te = make_synthetic(400, (1, 28, 28), 10, seed=0), make_synthetic(100, (1, 28, 28), 10, seed=1)
    np.savez(inputs / "data.npz", x_train=tr.images.numpy(), y_train=tr.labels.numpy(),
             x_test=te.images.numpy(), y_test=te.labels.numpy())
    (inputs / "cleanse.yaml").write_text("optim: {epochs: 1, batch_size: 32}\nreinit: {head: 0.2}\n")
    (inputs / "defend.yaml").write_text("optim: {epochs: 1, batch_size: 32}\n")
    assert main(["attack", "--attack", "badnets", "--data", str(inputs / "data.npz"), "--holdout", "100",
                 "--epochs", "1", "--batch-size", "32", "--threads", "1", "--out", str(work / "att")]) == 0
    shutil.copytree(work / "att", inputs / "model")
    m, d = str(inputs / "model"), str(inputs / "data.npz")
    commands = {
        "attack": ["attack", "--attack", "blended", "--data", d, "--holdout", "50", "--epochs", "1",
                   "--batch-size", "32", "--threads", "1", "--out", str(work / "att2")],
        "cleanse": ["cleanse", "--model", m, "--data", f"{m}/unlabeled.npz", "--test-data", d, "--attack", m,
                    "--config", str(inputs / "cleanse.yaml"), "--threads", "1", "--out", str(work / "c")],
        "defend": ["defend", "--defense", "bcu", "--model", m, "--data", d, "--config", str(inputs / "defend.yaml"),
                   "--threads", "1", "--out", str(work / "d")],
        "evaluate": ["evaluate", "--model", m, "--original", m, "--attack", m, "--data", d, "--threads", "1",
                     "--json", str(work / "e.json")],
        "verify": ["verify", m],
    }
    before = _hash_tree(inputs)
    _WATCH["root"] = os.path.realpath(inputs)
    try:
        for name, argv in commands.items():
            _WATCH["hits"] = []
            rc = main(argv)
            err = capsys.readouterr().err
            assert rc == 0, (name, err)
            assert _WATCH["hits"] == [], (name, _WATCH["hits"])
            assert _hash_tree(inputs) == before, name
    finally:
        _WATCH["root"] = None
    assert (work / "c" / "model.safetensors").is_file() and (work / "e.json").is_file()


def test_audit_hook_sees_writes():
    """Control: the hook does notice a write under the watched folder."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "x"
        f.write_text("a")
        _WATCH["root"], _WATCH["hits"] = os.path.realpath(tmp), []
        try:
            f.open("rb").close()
            assert _WATCH["hits"] == []
            f.open("ab").close()
            os.replace(f, Path(tmp) / "y")
            assert len(_WATCH["hits"]) == 2
        finally:
            _WATCH["root"] = None


# -------------------------------------------------------------------------------------------------
# (e) issue 14, finding 5: a checkpoint is resumed only for the inputs and settings it was made
#     with, and every field of state.pt is checked before it is used

RQUICK = ["--epochs", "3", "--batch-size", "16", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from bcu.checkpoint import save_model
    from bcu.models import create_model

    d = tmp_path_factory.mktemp("models")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        (d / f"m{seed}").mkdir()
        save_model(create_model("cnn-small", 10, (1, 28, 28), mean=(0.5,), std=(0.25,)), d / f"m{seed}")
        out.append(d / f"m{seed}")
    for name, seed in (("u.npz", 3), ("other.npz", 4)):
        np.savez(d / name, x=make_synthetic(64, (1, 28, 28), 10, seed=seed).images.numpy())
    return out[0], out[1], d / "u.npz", d / "other.npz"


def _interrupt_after_first_epoch(monkeypatch):
    """Ctrl-C right after epoch 1's checkpoint is written (in-process: the real save, then SIGINT)."""
    import bcu.resume as R

    real = R.save

    def save_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "save", save_then_interrupt)


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip("\n").split("\n")
    return rc, err[-1] if err else ""


@pytest.fixture
def interrupted(two_models, tmp_path, monkeypatch, capsys):
    """An output folder whose cleanse was interrupted after epoch 1 of 3 (checkpoint kept)."""
    m0, _, u, _ = two_models
    out = tmp_path / "c"
    with monkeypatch.context() as mp:
        _interrupt_after_first_epoch(mp)
        rc, line = _run(capsys, "cleanse", "--model", m0, "--data", u, "--out", out, "--seed", "3", *RQUICK)
    assert rc == 130 and "--resume" in line, line
    state = Path(f"{out}.partial") / "resume" / "state.pt"
    assert state.is_file()
    return out, state


@pytest.mark.parametrize("change,expect", [
    ("model", "model_sha256 is"),
    ("data", "data_sha256 is"),
    (["--seed", "4"], "config.seed is 3 there, 4 now"),
    (["--lr", "0.5"], "config.optim.lr is 0.01 there, 0.5 now"),
    (["--set", "reinit.head=0.5"], "config.reinit.head is 0.1 there, 0.5 now"),
])
def test_resume_refuses_other_inputs_or_settings(two_models, interrupted, capsys, change, expect):
    m0, m1, u, other = two_models
    out, state = interrupted
    model, data, extra = m0, u, []
    if change == "model":
        model = m1
    elif change == "data":
        data = other
    else:
        extra = change
    before = state.read_bytes()
    rc, line = _run(capsys, "cleanse", "--model", model, "--data", data, "--out", out, "--seed", "3", *RQUICK,
                    *extra, "--resume")
    assert rc == 1 and line.startswith("bcu: error: resume checkpoint ") and expect in line, line
    assert "was written for other inputs or settings" in line
    assert state.read_bytes() == before and not out.exists()  # the checkpoint survives the refusal
    # and the original command still resumes from it
    rc, line = _run(capsys, "cleanse", "--model", m0, "--data", u, "--out", out, "--seed", "3", *RQUICK, "--resume")
    assert rc == 0, line
    assert len(json.loads((out / "report.json").read_text())["history"]) == 3


def _edit_state(state: Path, edit) -> None:
    s = torch.load(state, weights_only=True)
    edit(s)
    torch.save(s, state)


def _bad_tensor(s):
    k = next(k for k, v in s["model"].items() if v.dim() == 4)
    s["model"][k] = torch.zeros(3, 3)


def _nan_tensor(s):
    k = next(k for k, v in s["model"].items() if v.is_floating_point())
    s["model"][k] = torch.full_like(s["model"][k], float("nan"))


def _bad_momentum(s):
    st = s["optimizer"]["state"]
    k = next(iter(st))
    st[k]["momentum_buffer"] = torch.zeros(7)


@pytest.mark.parametrize("what,edit,expect", [
    ("epoch 1000000", lambda s: s.update(epoch=1_000_000), "epoch: expected a finished epoch in [0, 2], got 1000000"),
    ("epoch -5", lambda s: s.update(epoch=-5), "epoch: expected a finished epoch in [0, 2]"),
    ("epoch as text", lambda s: s.update(epoch="1"), "epoch: expected a finished epoch"),
    ("history of the wrong length", lambda s: s.update(history=[]), "history: expected one row"),
    ("history rows that are not tables", lambda s: s.update(history=["x"]), "history: row 1"),
    ("history with a nested value", lambda s: s["history"][0].update(loss=[1.0] * 10), "history: row 1"),
    ("extra.stopped not a bool", lambda s: s.update(extra={"stopped": "yes"}), "extra:"),
    ("a weight of another shape (architecture change)", _bad_tensor, "model: "),
    ("NaN weights", _nan_tensor, "holds NaN or Inf"),
    ("a momentum buffer of another shape", _bad_momentum, "optimizer: momentum_buffer does not match"),
    ("no optimizer", lambda s: s.pop("optimizer"), "optimizer: not an optimizer state"),
])
def test_resume_checks_every_field_of_state_pt(two_models, interrupted, capsys, what, edit, expect):
    m0, _, u, _ = two_models
    out, state = interrupted
    _edit_state(state, edit)
    rc, line = _run(capsys, "cleanse", "--model", m0, "--data", u, "--out", out, "--seed", "3", *RQUICK, "--resume")
    assert rc == 1 and "is malformed" in line and expect in line and "start again without --resume" in line, line
    assert not out.exists()


def test_resume_state_pt_that_is_not_a_table(two_models, interrupted, capsys):
    m0, _, u, _ = two_models
    out, state = interrupted
    torch.save([1, 2, 3], state)
    rc, line = _run(capsys, "cleanse", "--model", m0, "--data", u, "--out", out, "--seed", "3", *RQUICK, "--resume")
    assert rc == 1 and "is malformed (not a table of fields)" in line


def test_fit_refuses_a_checkpoint_of_another_architecture(tmp_path):
    """Through the API (no CLI fingerprint): the state itself is checked against the model."""
    from bcu.data import ImageSet
    from bcu.errors import BcuError
    from bcu.models import create_model
    from bcu.train import OptimConfig, cross_entropy_objective, fit

    data = make_synthetic(64, (1, 28, 28), 10, seed=0)
    small = create_model("cnn-small", 10, (1, 28, 28))
    fit(small, data, cross_entropy_objective, OptimConfig(epochs=1, batch_size=16), resume_dir=tmp_path,
        progress=False)
    assert (tmp_path / "state.pt").is_file()
    other = create_model("cnn4", 10, (1, 28, 28))
    with pytest.raises(BcuError, match="does not match this architecture") as e:
        fit(other, data, cross_entropy_objective, OptimConfig(epochs=3, batch_size=16), resume_dir=tmp_path,
            progress=False)
    assert "\n" not in str(e.value) and isinstance(data, ImageSet)
