"""Label-free evidence from the CLI: `bcu inspect-data`, `cleanse --strict`, the diagnosis in the
report, `cleanse --data none` (synthesized images only) and `bcu scan`."""
import json

import numpy as np
import pytest

from bcu.cli import main
from helpers import badnets_folder
from bcu.data import make_synthetic

T = ["--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    return badnets_folder(tmp_path_factory.mktemp("evidence") / "atk", epochs=6)


@pytest.fixture(scope="module")
def one_class(tmp_path_factory, attacked):
    """Images the teacher puts (almost) all in one class: they cannot teach the others."""
    ds = make_synthetic(1500, (1, 28, 28), 10, seed=0)
    x = ds.images[ds.labels == 3].numpy()
    p = tmp_path_factory.mktemp("evidence") / "one_class.npz"
    np.savez(p, images=x)
    return p


def test_inspect_data_on_the_models_own_kind_of_images(attacked, tmp_path, capsys):
    js = tmp_path / "diag.json"
    assert main(["inspect-data", "--model", str(attacked), "--data", str(attacked / "unlabeled.npz"),
                 "--json", str(js), "--strict", *T]) == 0
    out = capsys.readouterr().out
    assert "verdict: suited" in out and "effective number of classes" in out
    d = json.loads(js.read_text())
    assert d["ok"] is True and d["images"] == 400 and d["effective_classes"] > 7 and d["untaught"] == []
    assert d["bn_shift"] is not None and d["bn_shift"] < 0.08 and len(d["sha256"]) == 64
    # the same --json again is an existing output: refused without --overwrite
    assert main(["inspect-data", "--model", str(attacked), "--data", str(attacked / "unlabeled.npz"),
                 "--json", str(js), *T]) != 0
    assert "already exists" in capsys.readouterr().err


def test_inspect_data_flags_images_that_cannot_teach(attacked, one_class, capsys):
    assert main(["inspect-data", "--model", str(attacked), "--data", str(one_class), *T]) == 0
    out = capsys.readouterr().out
    assert "verdict: unsuited" in out and "cannot teach" in out
    assert main(["inspect-data", "--model", str(attacked), "--data", str(one_class), "--strict", *T]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--strict" in err[0] and "unsuited" in err[0]


def test_cleanse_strict_refuses_before_writing_and_warns_without(attacked, one_class, tmp_path, capsys):
    out = tmp_path / "strict"
    assert main(["cleanse", "--model", str(attacked), "--data", str(one_class), "--out", str(out), "--strict",
                 "--epochs", "1", "--batch-size", "32", *T]) != 0
    assert not out.exists() and not out.with_name("strict.partial").exists()
    capsys.readouterr()
    assert main(["cleanse", "--model", str(attacked), "--data", str(one_class), "--out", str(out),
                 "--epochs", "1", "--batch-size", "32", *T]) == 0
    assert "warning:" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["data_diagnosis"]["ok"] is False and len(rep["data_diagnosis"]["untaught"]) >= 5
    md = (out / "report.md").read_text()
    assert "diagnosed before the cleanse" in md and "**Warning:**" in md


def test_cleanse_with_no_images_synthesizes_them(attacked, tmp_path):
    out = tmp_path / "nodata"
    assert main(["cleanse", "--model", str(attacked), "--data", "none", "--out", str(out), "--epochs", "1",
                 "--batch-size", "32", "--set", "synthesis.images=64", "--set", "synthesis.steps=5",
                 "--set", "synthesis.batch=32", "--test-data", "synthetic:1500", *T]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["synthesized_images"] == 64 and rep["unlabeled_images"] == 0 and rep["input"]["images"] == 0
    assert rep["data_diagnosis"] is None and rep["input"]["data_sha256"] is None
    assert "synthesized from the model" in (out / "report.md").read_text()
    assert main(["cleanse", "--model", str(attacked), "--data", "none", "--out", str(tmp_path / "x"),
                 "--max-images", "10", *T]) != 0


def test_scan_command_writes_its_evidence(attacked, tmp_path, capsys):
    js = tmp_path / "scan.json"
    assert main(["scan", "--model", str(attacked), "--data", str(attacked / "unlabeled.npz"), "--json", str(js),
                 "--set", "scan.steps=30", "--set", "scan.images=128", *T]) == 0
    out = capsys.readouterr().out
    res = json.loads(js.read_text())
    assert len(res["classes"]) == 10 and res["steps"] == 30 and res["images"] == 128
    assert res["summary"].splitlines()[0] in out
    scanned = [c for c in res["classes"] if c["l1"] is not None]
    assert len(scanned) >= 3 and all(0 <= c["flip"] <= 100 for c in scanned)
    assert main(["scan", "--model", str(attacked), "--data", str(attacked / "unlabeled.npz"),
                 "--set", "scan.steps=0", *T]) != 0


def test_scan_strict_exits_6_when_flagged(attacked, monkeypatch, capsys):
    """`scan --strict`: a flagged class is exit code 6, a code of its own (3 is a model file error)."""
    from bcu import workflows
    from bcu.scan import ClassScan, ScanResult

    def fake(flagged):
        classes = [ClassScan(k, str(k), 0.1, 20.0 if k else 2.0, 1.0, 99.0, True, 10.0 if k else 1.0, 3.0)
                   for k in range(10)]
        return lambda *a, **k: ScanResult(classes, flagged, 1, 30, 128, 1.0, {})

    data = str(attacked / "unlabeled.npz")
    monkeypatch.setattr(workflows, "scan_model", fake(0))
    assert main(["scan", "--model", str(attacked), "--data", data, "--strict", *T]) == 6
    assert "flagged" in capsys.readouterr().out
    assert main(["scan", "--model", str(attacked), "--data", data, *T]) == 0  # without --strict: a report
    monkeypatch.setattr(workflows, "scan_model", fake(None))
    assert main(["scan", "--model", str(attacked), "--data", data, "--strict", *T]) == 0
