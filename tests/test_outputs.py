"""Where bcu writes (issue 14, findings 1-4 and 7): an output is never an input, ``--overwrite``
only replaces what bcu wrote, staging never follows a link, one run per output, normal file modes.

Every test drives the real CLI (in-process, or a subprocess where two runs must overlap) and
checks that nothing the user owns was touched: the trees are hashed before and after.
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

from bcu.cli import main
from bcu.data import make_synthetic

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX: FIFOs, links, fork, umask")
QUICK = ["--epochs", "1", "--batch-size", "16", "--threads", "1", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "BCU_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}


def tree(root: Path) -> dict:
    """Every entry under ``root``: file hashes, link targets, folders."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def cli(capsys):
    def run(*argv, ok: bool = False):
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        if ok:
            assert rc == 0, err
            return rc, ""
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("bcu: error: "), err
        return rc, lines[0]

    return run


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> Path:
    """A `bcu attack` output (model, attack artifact, unlabeled.npz, the marker)."""
    d = tmp_path_factory.mktemp("att") / "v"
    assert main(["attack", "--attack", "badnets", "--data", "synthetic:400", "--holdout", "200", "--out", str(d),
                 *QUICK]) == 0
    return d


@pytest.fixture
def v(attacked, tmp_path) -> Path:
    dst = tmp_path / "v"
    shutil.copytree(attacked, dst)
    return dst


def _npz(path: Path, n: int = 64, labels: bool = False) -> Path:
    ds = make_synthetic(n, (1, 28, 28), 10, seed=3)
    arrays = {"x": ds.images.numpy()}
    if labels:
        arrays["y"] = ds.labels.numpy()
    np.savez(path, **arrays)
    return path


# -------------------------------------------------------------------------------------------------
# finding 1: --overwrite never deletes inputs, user folders, / . ..


def test_overwrite_refuses_an_output_that_is_the_input_folder(cli, v):
    """`bcu cleanse --model v --data v/unlabeled.npz --out v --overwrite` used to exit 0 with the
    model and the images gone."""
    before = tree(v)
    rc, line = cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", v, "--overwrite", *QUICK)
    assert rc == 5 and "is never an input" in line and f"--out {v}" in line
    assert tree(v) == before
    assert not Path(f"{v}.partial").exists() and not Path(f"{v}.lock").exists()


def test_overwrite_refuses_a_folder_that_contains_inputs_or_user_files(cli, v, tmp_path):
    proj = tmp_path / "proj"
    shutil.copytree(v, proj / "model")
    _npz(proj / "images.npz")
    (proj / "notes.txt").write_text("three weeks of notes")
    before = tree(proj)
    rc, line = cli("cleanse", "--model", proj / "model", "--data", proj / "images.npz", "--out", proj, "--overwrite",
                   *QUICK)
    assert rc == 5 and "contains the input" in line
    assert tree(proj) == before
    # a folder of the user's without any input in it: not a bcu output, not replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    rc, line = cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", mine, "--overwrite", *QUICK)
    assert rc == 5 and ".bcu-output marker" in line and "delete it by hand" in line
    assert (mine / "notes.txt").read_text() == "mine" and sorted(os.listdir(mine)) == ["notes.txt"]


def test_attack_overwrite_refuses_the_folder_of_its_own_training_data(cli, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _npz(d / "train.npz", n=200, labels=True)
    before = tree(d)
    rc, line = cli("attack", "--attack", "badnets", "--data", d / "train.npz", "--out", d, "--overwrite",
                   "--holdout", "0", *QUICK)
    assert rc == 5 and "contains the input" in line
    assert tree(d) == before


@pytest.mark.parametrize("target", ["/", ".", ".."])
def test_out_root_current_and_parent_folder_are_refused(cli, v, tmp_path, monkeypatch, target):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "canary").write_text("still here")
    (work.parent / "canary").write_text("still here")
    monkeypatch.chdir(work)
    rc, line = cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", target, "--overwrite", *QUICK)
    assert rc == 5 and "give bcu a folder of its own" in line
    assert (work / "canary").read_text() == "still here" and (work.parent / "canary").read_text() == "still here"
    assert sorted(os.listdir(work)) == ["canary"]


def test_overwrite_replaces_a_bcu_output_and_leaves_nothing_behind(cli, v, tmp_path):
    out = tmp_path / "c"
    cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", out, *QUICK, ok=True)
    marker = json.loads((out / ".bcu-output").read_text())
    assert marker["format"] == "bcu-output/1" and marker["command"] == "cleanse"
    (out / "stale.txt").write_text("from the first run")
    cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", out, "--overwrite", "--seed", "1", *QUICK,
        ok=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "v"]  # no c.old, c.partial or c.lock


def test_overwrite_refuses_an_output_of_an_older_bcu_without_marker(cli, v, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(v, old)
    (old / ".bcu-output").unlink()
    before = tree(old)
    rc, line = cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", old, "--overwrite", *QUICK)
    assert rc == 5 and "no .bcu-output marker" in line and "delete it by hand" in line
    assert tree(old) == before


def test_overwrite_of_a_file_is_refused_and_leaves_no_old_copy(cli, v, tmp_path):
    """`--out FILE --overwrite` used to replace the file and leave FILE.old behind."""
    f = tmp_path / "report.txt"
    f.write_text("a file of the user's")
    rc, line = cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", f, "--overwrite", *QUICK)
    assert rc == 5 and "is a file, not a bcu output folder" in line
    assert f.read_text() == "a file of the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt", "v"]


# -------------------------------------------------------------------------------------------------
# finding 2: evaluate --json follows the same rule


def test_evaluate_json_never_overwrites_without_overwrite(cli, v, tmp_path):
    js = tmp_path / "e.json"
    js.write_text("keep me")
    rc, line = cli("evaluate", "--model", v, "--data", "synthetic:300", "--json", js, "--threads", "1")
    assert rc == 5 and "already exists" in line and "--overwrite" in line
    assert js.read_text() == "keep me"
    cli("evaluate", "--model", v, "--data", "synthetic:300", "--json", js, "--overwrite", "--threads", "1", ok=True)
    assert "acc" in json.loads(js.read_text())


def test_evaluate_json_refuses_the_models_own_sidecar(cli, v):
    before = tree(v)
    for extra in ([], ["--overwrite"]):
        rc, line = cli("evaluate", "--model", v, "--data", "synthetic:300", "--json", v / "model.json", *extra)
        assert rc == 5 and "is the input" in line
    assert tree(v) == before
    cli("verify", v, ok=True)


def test_evaluate_json_refuses_a_link_and_a_folder(cli, v, tmp_path):
    target = tmp_path / "target.json"
    target.write_text("target")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    rc, line = cli("evaluate", "--model", v, "--data", "synthetic:300", "--json", link, "--overwrite")
    assert rc == 5 and "symbolic link" in line and target.read_text() == "target" and link.is_symlink()
    (tmp_path / "dir.json").mkdir()
    rc, line = cli("evaluate", "--model", v, "--data", "synthetic:300", "--json", tmp_path / "dir.json", "--overwrite")
    assert rc == 5 and "not a regular file" in line


# -------------------------------------------------------------------------------------------------
# finding 3: a planted <out>.partial (or .lock) link is never followed


@pytest.mark.parametrize("resume", [False, True])
def test_planted_partial_symlink_is_refused(cli, v, tmp_path, resume):
    victim = tmp_path / "victim"
    (victim / "resume").mkdir(parents=True)
    (victim / "resume" / "state.pt").write_bytes(b"someone else's checkpoint")
    (victim / "data.txt").write_text("someone else's data")
    out = tmp_path / "o"
    Path(f"{out}.partial").symlink_to(victim)
    before = tree(victim)
    rc, line = cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", out, *QUICK,
                   *(["--resume"] if resume else []))
    assert rc == 5 and "symbolic link" in line
    assert tree(victim) == before and not out.exists() and Path(f"{out}.partial").is_symlink()


def test_planted_lock_symlink_is_refused(cli, v, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("do not truncate")
    out = tmp_path / "o"
    Path(f"{out}.lock").symlink_to(victim)
    rc, line = cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", out, *QUICK)
    assert rc == 5 and "symbolic link" in line
    assert victim.read_text() == "do not truncate" and not out.exists()


def test_planted_final_symlink_is_not_replaced_through(cli, v, tmp_path):
    victim = tmp_path / "victim"
    shutil.copytree(v, victim)  # even a real bcu output, when reached through a link
    out = tmp_path / "o"
    out.symlink_to(victim)
    before = tree(victim)
    rc, line = cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", out, "--overwrite", *QUICK)
    assert rc == 5 and "symbolic link" in line
    assert tree(victim) == before and out.is_symlink()


# -------------------------------------------------------------------------------------------------
# finding 4: one run per output


def _start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bcu", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


@pytest.mark.slow  # a real subprocess holds the output
def test_second_run_on_the_same_output_names_the_holder(cli, v, tmp_path):
    out = tmp_path / "o"
    first = _start("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", out, "--epochs", "200",
                   "--batch-size", "16", "--threads", "1", "--no-progress")
    state = Path(f"{out}.partial") / "resume" / "state.pt"
    try:
        t0 = time.time()
        while not state.is_file() and first.poll() is None and time.time() - t0 < 90:
            time.sleep(0.02)
        assert state.is_file(), first.stderr.read() if first.poll() is not None else "no checkpoint in time"
        rc, line = cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", out, *QUICK)
        assert rc == 5 and "in use by another bcu run" in line and f"pid {first.pid}" in line
        assert state.is_file() and first.poll() is None  # the first run's staging and checkpoint survive
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # once the holder is gone (even by kill -9), the lock is free again
    cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", out, *QUICK, ok=True)
    assert not Path(f"{out}.lock").exists()


# -------------------------------------------------------------------------------------------------
# finding 7: normal permissions


@pytest.mark.skipif(not hasattr(os, "umask") or os.name == "nt", reason="POSIX file modes")
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_output_files_get_the_modes_the_umask_allows(cli, v, tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "c"
        cli("cleanse", "--model", v, "--data", v / "unlabeled.npz", "--out", out, *QUICK, ok=True)
        js = tmp_path / "e.json"
        cli("evaluate", "--model", out, "--data", "synthetic:300", "--json", js, "--threads", "1", ok=True)
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()] + [js]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(file_mode)}
    assert oct(out.stat().st_mode & 0o777) == oct(dir_mode)


# -------------------------------------------------------------------------------------------------
# bench's output folder follows the same rules (it is kept and added to, never replaced)


def test_bench_refuses_a_user_folder_and_a_folder_holding_its_config(tmp_path):
    import yaml

    from bcu.bench import load_config, run_bench
    from bcu.errors import OutputError

    cfg_dict = {"name": "t", "data": "synthetic:200:1x16x16", "holdout": 50, "attacks": ["badnets"],
                "defenses": ["bcu"], "unlabeled": ["small"], "sources": {"small": {"kind": "holdout", "n": 32}},
                "teacher": {"epochs": 1, "batch_size": 32},
                "defense_options": {"bcu": {"optim": {"epochs": 1, "batch_size": 32}}}}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    path = mine / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(str(path))
    with pytest.raises(OutputError, match="contains the input"):
        run_bench(cfg, mine, config_path=str(path), log=lambda *_: None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine too")
    with pytest.raises(OutputError, match="no .bcu-output marker"):
        run_bench(cfg, other, config_path=str(path), log=lambda *_: None)
    assert sorted(os.listdir(mine)) == ["bench.yaml", "notes.txt"] and os.listdir(other) == ["notes.txt"]
