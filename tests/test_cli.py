"""The CLI end to end on small data: attack -> cleanse -> evaluate -> verify, and the demo."""
import json

import pytest

from bcu.cli import main
from helpers import badnets_folder

T = ["--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    return badnets_folder(tmp_path_factory.mktemp("cli") / "atk", epochs=2)


def test_attack_writes_model_artifact_and_holdout(attacked):
    for f in ("model.safetensors", "model.json", "attack.json", "attack.safetensors", "unlabeled.npz", "metrics.json"):
        assert (attacked / f).is_file(), f
    side = json.loads((attacked / "model.json").read_text())
    assert side["arch"] == "cnn-small" and side["num_classes"] == 10 and len(side["sha256"]) == 64
    assert json.loads((attacked / "attack.json").read_text())["config"]["patch_size"] == 4
    assert not attacked.with_name("atk.partial").exists()


def test_cleanse_evaluate_verify(attacked, tmp_path, capsys):
    out = tmp_path / "clean"
    assert main(["cleanse", "--model", str(attacked), "--data", str(attacked / "unlabeled.npz"), "--out", str(out),
                 "--epochs", "2", "--batch-size", "64", "--test-data", "synthetic:1500", "--attack", str(attacked),
                 *T]) == 0
    for f in ("model.safetensors", "model.json", "report.json", "report.md", "curves.png"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    assert rep["input"]["labels_read"] is False and rep["epochs_run"] == 2
    assert set(rep["scores"]) == {"teacher", "cleansed"} and rep["der"] is not None
    assert len(rep["input"]["sha256"]) == 64 and len(rep["output"]["sha256"]) == 64
    assert "![loss and agreement per epoch](curves.png)" in (out / "report.md").read_text()
    capsys.readouterr()
    js = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(out), "--data", "synthetic:1500", "--attack", str(attacked),
                 "--original", str(attacked), "--json", str(js), *T]) == 0
    res = json.loads(js.read_text())
    assert {"acc", "asr", "ra", "der", "original", "asr_by_class"} <= set(res)
    assert len(res["asr_by_class"]) == 9 and all(0 <= v <= 100 for v in res["asr_by_class"].values())
    assert main(["verify", str(out)]) == 0
    assert "matches its sidecar" in capsys.readouterr().out


def test_cleanse_with_config_file_and_overrides(attacked, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: paper\noptim:\n  epochs: 1\n  batch_size: 64\nreinit:\n  scale: 2.0\n")
    out = tmp_path / "c2"
    assert main(["cleanse", "--model", str(attacked), "--data", str(attacked / "unlabeled.npz"), "--out", str(out),
                 "--config", str(cfg), "--set", "distill.t_end=3", *T]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["reinit"]["scale"] == 2.0 and rep["config"]["distill"]["t_end"] == 3.0
    assert rep["config"]["optim"]["epochs"] == 1


def test_existing_output_is_refused_and_kept(attacked, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["cleanse", "--model", str(attacked), "--data", str(attacked / "unlabeled.npz"), "--out", str(out),
               "--epochs", "1", *T])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 5 and len(err) == 1 and err[0].startswith("bcu: error:") and "already exists" in err[0]
    assert (out / "keep.txt").read_text() == "mine"


def test_defend_and_list(attacked, tmp_path, capsys):
    assert main(["defend", "--defense", "kd", "--model", str(attacked), "--data", str(attacked / "unlabeled.npz"),
                 "--out", str(tmp_path / "kd"), "--set", "optim.epochs=1", "--set", "optim.batch_size=64", *T]) == 0
    rep = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert rep["defense"] == "kd" and rep["uses_labels"] is False
    from bcu.checkpoint import load_model
    kd, info = load_model(tmp_path / "kd")
    teacher, tinfo = load_model(attacked)
    assert info["sha256"] != tinfo["sha256"] and kd.spec.arch == teacher.spec.arch
    capsys.readouterr()
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    from bcu.attacks import ATTACKS
    from bcu.defenses import DEFENSES
    from bcu.models import MODELS
    for name in [*MODELS.names(), *ATTACKS.names(), *DEFENSES.names()]:  # every registered name is listed
        assert f"  {name} " in out, name
    assert main(["defend", "--defense", "nope", "--model", str(attacked), "--out", str(tmp_path / "x")]) == 2


def test_demo_on_synthetic_data_writes_metrics_of_the_promised_shape(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data", "synthetic:2400", "--out", str(out), "--attack-epochs", "1", "--epochs", "1",
                 *T]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m) == ["teacher", "cleansed", "seconds", "config"]
    assert set(m["teacher"]) == set(m["cleansed"]) == {"acc", "asr", "ra"}
    assert set(m["seconds"]) == {"attack", "cleanse"}
    assert all(0 <= v <= 100 for part in ("teacher", "cleansed") for v in m[part].values())
    for f in ("suspicious/model.safetensors", "suspicious/attack.json", "cleansed/model.safetensors",
              "report.md", "curves.png"):
        assert (out / f).is_file(), f
    text = capsys.readouterr().out
    assert "backdoored (teacher)" in text and "cleansed (bcu)" in text


def test_demo_reads_real_fashion_mnist(tmp_path):
    """The embedded default's data path on the real files (a small slice, one epoch each)."""
    out = tmp_path / "demo-fm"
    assert main(["demo", "--out", str(out), "--n-train", "3000", "--attack-epochs", "1", "--epochs", "1", *T]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["data"] == "fashion-mnist" and m["config"]["unlabeled_images"] == 5000
    assert m["teacher"]["acc"] > 50  # a real task was learned from real images


def test_cleanse_max_images_uses_a_subset(attacked, tmp_path):
    out = tmp_path / "few"
    assert main(["cleanse", "--model", str(attacked), "--data", str(attacked / "unlabeled.npz"), "--out", str(out),
                 "--epochs", "1", "--batch-size", "64", "--max-images", "150", *T]) == 0
    assert json.loads((out / "report.json").read_text())["input"]["images"] == 150
