"""bcu bench: a 2x2 grid on tiny synthetic data runs, writes every output, never recomputes a
finished cell, and resumes after being killed."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bcu.bench import ROW_KEYS, load_config, run_bench
from bcu.data import make_synthetic, split
from bcu.errors import ConfigError
from bcu.data.sources import build, conform, export_npz, resolve

TINY = {
    "name": "tiny",
    "data": "synthetic:600:1x16x16",
    "arch": "cnn-small",
    "holdout": 200,
    "attacks": ["badnets", "blended"],
    "defenses": ["bcu", "ft"],
    "seeds": [0],
    "unlabeled": ["small"],
    "sources": {"small": {"kind": "holdout", "n": 128}},
    "teacher": {"epochs": 1, "batch_size": 64},
    "defense_options": {"bcu": {"optim": {"epochs": 1, "batch_size": 64}},
                        "ft": {"optim": {"epochs": 1, "batch_size": 64}}},
}


def _write(tmp_path: Path, cfg=TINY) -> Path:
    p = tmp_path / "bench.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_grid_runs_writes_outputs_and_reuses_cells(tmp_path):
    path = _write(tmp_path)
    cfg = load_config(str(path))
    out = tmp_path / "out"
    logs = []
    stats = run_bench(cfg, out, config_path=str(path), threads=1, log=logs.append)
    assert stats["computed"] == 4 and stats["cached"] == 0
    for f in ("results.json", "results.csv", "results.md", "acc_asr.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 4
    for r in rows:
        assert set(ROW_KEYS) <= set(r)
        assert r["status"] == "ok" and 0 <= r["asr"] <= 100 and 0 <= r["der"] <= 100
        assert r["command"].startswith("bcu bench --config") and f"--defenses {r['defense']}" in r["command"]
        assert r["unlabeled"] == "small" and r["images"] == 128
    assert {r["labels_used"] for r in rows if r["defense"] == "bcu"} == {False}
    with open(out / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    md = (out / "results.md").read_text()
    assert "| badnets |" in md and "bcu ACC" in md and "ft ACC" in md
    # teachers are cached as safetensors + attack artifact, one per (attack, seed)
    for a in ("badnets", "blended"):
        t = out / "teachers" / f"cnn-small__{a}__s0"
        assert (t / "model.safetensors").is_file() and (t / "attack.json").is_file()
    assert (out / "unlabeled" / "small__s0.npz").is_file()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    teacher_mtime = (out / "teachers" / "cnn-small__badnets__s0" / "model.safetensors").stat().st_mtime_ns
    # a second run recomputes nothing
    stats2 = run_bench(cfg, out, config_path=str(path), threads=1, log=logs.append)
    assert stats2["computed"] == 0 and stats2["cached"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == mtimes
    assert (out / "teachers" / "cnn-small__badnets__s0" / "model.safetensors").stat().st_mtime_ns == teacher_mtime


def test_killed_run_resumes(tmp_path):
    path = _write(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BCU_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "bcu", "bench", "--config", str(path), "--out", str(out), "--threads", "1"]
    # the same command, SIGKILLed from inside once its second cell is written (no hook in bcu itself)
    killer = ("import os, signal, sys\n"
              "import bcu.bench as b\n"
              "real, done = b.run_cell, []\n"
              "def run_cell(*a, **k):\n"
              "    row = real(*a, **k)\n"
              "    done.append(row)\n"
              "    if len(done) == 2:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return row\n"
              "b.run_cell = run_cell\n"
              "from bcu.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", killer] + cmd[3:], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -9, p.stderr  # killed by SIGKILL after two cells
    done = sorted((out / "cells").glob("*.json"))
    assert len(done) == 2
    first = {d.name: d.stat().st_mtime_ns for d in done}
    assert not (out / "results.json").exists()
    p = subprocess.run(cmd + ["--workers", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "2 cells computed, 2 reused" in p.stdout
    assert {d.name: d.stat().st_mtime_ns for d in (out / "cells").glob("*.json") if d.name in first} == first
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)


def test_filters_and_unknown_names(tmp_path):
    path = _write(tmp_path, {**TINY, "attacks": ["badnets", "not-an-attack-yet"], "defenses": ["clp"]})
    cfg = load_config(str(path))
    out = tmp_path / "out"
    stats = run_bench(cfg, out, config_path=str(path), threads=1, log=lambda *_: None)
    assert stats["computed"] == 1 and stats["not_runnable"] == 1  # unregistered attacks are reported, not run
    assert "not-an-attack-yet" in (out / "results.md").read_text()
    with pytest.raises(ConfigError):
        run_bench(cfg, out, attacks=["wanet"], log=lambda *_: None)
    with pytest.raises(ConfigError):
        load_config(str(_write(tmp_path, {**TINY, "unlabeled": ["nowhere"]})))


def test_label_using_defense_is_skipped_on_unlabeled_ood_source(tmp_path):
    path = _write(tmp_path, {**TINY, "attacks": ["badnets"], "unlabeled": ["synthetic"],
                             "sources": {"synthetic": {"kind": "synthetic", "n": 128}}})
    cfg = load_config(str(path))
    out = tmp_path / "out"
    run_bench(cfg, out, config_path=str(path), threads=1, log=lambda *_: None)
    rows = {r["defense"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["bcu"]["status"] == "ok" and rows["bcu"]["images"] == 128
    assert rows["ft"]["status"] == "skipped" and rows["ft"]["asr"] is None


def test_unlabeled_sources(tmp_path):
    train = make_synthetic(400, (1, 16, 16), 10, seed=0)
    _, hold = split(train, 200, seed=0)
    half = build(resolve("half-classes"), hold, (1, 16, 16), seed=0)
    assert set(half.labels.tolist()) <= set(range(5)) and len(half) > 0
    few = build(resolve("x", {"x": {"n": 50}}), hold, (1, 16, 16), seed=0)
    assert len(few) == 50
    syn = build(resolve("synthetic"), None, (1, 16, 16), seed=0)
    assert syn.labels is None and syn.shape == (1, 16, 16)
    rgb = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8)
    assert conform(rgb, (1, 16, 16)).shape == (3, 1, 16, 16)
    # a user folder / npz source, and export for `bcu cleanse --data`
    npz = export_npz(few, tmp_path / "few.npz")
    user = build(resolve("u", {"u": {"kind": "data", "path": str(npz)}}), None, (1, 8, 8), seed=0)
    assert user.shape == (1, 8, 8) and len(user) == 50 and user.labels is None
    with pytest.raises(ConfigError):
        resolve("u", {"u": {"kind": "data"}})


def test_defense_variants_resolve_to_registered_defenses():
    from bcu.bench import registry_name
    from bcu.defenses import DEFENSES, create_defense

    assert registry_name("bcu@stop") == "bcu" and registry_name("ft") == "ft"
    d = create_defense(registry_name("bcu@stop"), {"stop": {"rule": "plateau"}})
    assert d.config.stop.rule == "plateau" and registry_name("bcu@stop") in DEFENSES


def test_summary_means_over_attacks_then_seeds():
    from bcu.bench import summary

    def row(a, d, s, before, acc, asr, der):
        return {"attack": a, "defense": d, "seed": s, "acc_before": before, "acc": acc, "asr": asr, "der": der}

    rows = [row("badnets", "bcu", 0, 90, 88, 2, 98), row("blended", "bcu", 0, 90, 86, 6, 95),
            row("badnets", "bcu", 1, 90, 90, 4, 96), row("blended", "bcu", 1, 90, 88, 8, 94),
            row("badnets", "ft", 0, 90, 91, 90, 55)]  # ft lacks blended: no complete seed, no line
    lines = summary(rows, ["badnets", "blended"], ["bcu", "ft"])
    bcu_line = next(l for l in lines if l.startswith("| bcu |"))
    # per-seed means: drop (3, 1) -> 2.00 ± 1.41; ASR (4, 6) -> 5.00 ± 1.41; DER (96.5, 95) -> 95.75 ± 1.06
    assert bcu_line == "| bcu | no | 2 | 2.00 ± 1.41 | 5.00 ± 1.41 | 95.75 ± 1.06 |"
    assert not any(l.startswith("| ft |") for l in lines)


def test_architectures_and_attack_variants(tmp_path):
    """Several architectures (each with options and teacher overrides) x attack variants (name@label)."""
    cfg_dict = {**TINY, "attacks": ["badnets", "badnets@line"], "defenses": ["clp"],
                "archs": {"cnn-small": {}, "narrow": {"arch": "cnn4", "options": {"width": 0.5}, "teacher": {"epochs": 2}}},
                "attack_options": {"badnets@line": {"patch_size": 1, "patch_width": 8, "pattern": "white", "target": 3}},
                "attack_teacher": {"badnets@line": {"lr": 0.02}}}
    path = _write(tmp_path, cfg_dict)
    cfg = load_config(str(path))
    assert cfg.teacher_optim("narrow", "badnets@line").epochs == 2
    assert cfg.teacher_optim("narrow", "badnets@line").lr == 0.02 and cfg.teacher_optim("cnn-small", "badnets").lr == 0.05
    out = tmp_path / "out"
    stats = run_bench(cfg, out, config_path=str(path), threads=1, log=lambda *_: None)
    assert stats["computed"] == 4
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted((r["arch"], r["attack"]) for r in rows) == [
        ("cnn-small", "badnets"), ("cnn-small", "badnets@line"), ("narrow", "badnets"), ("narrow", "badnets@line")]
    for r in rows:
        assert f"--archs {r['arch']} --attacks {r['attack']}" in r["command"]
    line = json.loads((out / "teachers" / "narrow__badnets@line__s0" / "attack.json").read_text())
    assert line["name"] == "badnets" and line["config"]["patch_width"] == 8 and line["config"]["target"] == 3
    narrow = json.loads((out / "teachers" / "narrow__badnets__s0" / "model.json").read_text())
    assert narrow["arch"] == "cnn4" and narrow["kwargs"] == {"width": 0.5}
    scores = json.loads((out / "teachers" / "narrow__badnets__s0" / "scores.json").read_text())
    assert scores["teacher"]["epochs"] == 2 and len(scores["asr_by_class"]) == 9
    md = (out / "results.md").read_text()
    assert "`narrow`, unlabeled source" in md and "| badnets@line |" in md
    t = run_bench(cfg, tmp_path / "t", threads=1, archs=["narrow"], teachers_only=True, log=lambda *_: None)
    assert t["computed"] == 2 and not (tmp_path / "t" / "results.json").exists()
    assert sorted(p.name for p in (tmp_path / "t" / "teachers").iterdir() if not p.name.startswith(".")) == [
        "narrow__badnets@line__s0", "narrow__badnets__s0"]
    only = run_bench(cfg, out, config_path=str(path), threads=1, archs=["narrow"], log=lambda *_: None)
    assert only["cells"] == 2 and only["computed"] == 0
    with pytest.raises(ConfigError):
        run_bench(cfg, out, archs=["resnet18"], log=lambda *_: None)
    with pytest.raises(ConfigError, match="attack_teacher"):
        load_config(str(_write(tmp_path, {**TINY, "attack_teacher": {"wanet": {"epochs": 2}}})))
