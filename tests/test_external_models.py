"""timm and torchvision models from the CLI (``--arch timm:NAME``, ``torchvision:NAME``, ``--arch-opt``),
Hub-style folders in and out (``config.json`` + ``model.safetensors``, written and read back by timm
itself), the model card, and the re-initialisation plan of a timm ViT. Nothing is downloaded: every
model is built here with ``pretrained=False`` / ``weights=None`` (issue 15)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
import yaml

from bcu.checkpoint import load_model
from bcu.cli import main
from bcu.defenses.reinit import ReinitConfig, plan
from bcu.models import create_model

T = ["--threads", "1", "--no-progress"]
SHORT = ["--epochs", "1", "--batch-size", "64", *T]


def one_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("bcu: error: "), err
    return err[0]


def front_matter(path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---", 4)])


@pytest.fixture(scope="module")
def data():
    """Unlabeled 1x28x28 images and a labelled 1x28x28 test set."""
    return "synthetic:400:1x28x28", "synthetic:300:1x28x28"


def test_importing_bcu_imports_neither_timm_nor_torchvision():
    code = "import sys, bcu, bcu.cli; assert 'timm' not in sys.modules and 'torchvision' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_timm_resnet_state_dict_cleanses_end_to_end(tmp_path, capsys, data):
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    pt = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), pt)
    out = tmp_path / "clean"
    assert main(["cleanse", "--model", str(pt), "--arch", "timm:resnet18", "--num-classes", "10",
                 "--input-shape", "1,28,28", "--norm", "timm", "--data", data[0], "--out", str(out),
                 "--test-data", data[1], *SHORT]) == 0
    side = json.loads((out / "model.json").read_text())
    assert side["arch"] == "timm:resnet18" and side["input_shape"] == [1, 28, 28]
    assert side["mean"] == pytest.approx([0.449]) and side["std"] == pytest.approx([0.226])  # timm's, one channel
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert "matches its sidecar and its model card" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(out), "--data", data[1], *T]) == 0  # rebuilt from the sidecar alone
    model, _ = load_model(out)
    assert type(model.net).__module__.startswith("timm.") and model.net.conv1.in_channels == 1


def test_timm_vit_with_arch_options_trains_cleanses_and_rebuilds(tmp_path, capsys, data):
    atk = tmp_path / "vit"
    assert main(["attack", "--attack", "badnets", "--data", "synthetic:500:1x28x28", "--out", str(atk), "--arch",
                 "timm:vit_tiny_patch16_224", "--arch-opt", "img_size=28", "--arch-opt", "patch_size=7",
                 "--arch-opt", "depth=2", "--arch-opt", "drop_rate=0.0", "--holdout", "200", "--epochs", "1",
                 *T]) == 0
    side = json.loads((atk / "model.json").read_text())
    assert side["kwargs"] == {"img_size": 28, "patch_size": 7, "depth": 2, "drop_rate": 0.0}  # typed values
    out = tmp_path / "vit-clean"
    assert main(["cleanse", "--model", str(atk), "--data", str(atk / "unlabeled.npz"), "--out", str(out),
                 "--test-data", "synthetic:300:1x28x28", "--attack", str(atk), *SHORT]) == 0
    rep = json.loads((out / "report.json").read_text())
    layers = {l["name"]: l for l in rep["layers"]}
    assert "net.blocks.1.attn.qkv" in layers and not any("norm" in n for n in layers)
    assert set(rep["scores"]) == {"teacher", "cleansed"} and rep["der"] is not None
    model, _ = load_model(out)
    assert len(model.net.blocks) == 2 and model.net.patch_embed.proj.kernel_size == (7, 7)
    capsys.readouterr()
    assert main(["defend", "--defense", "ft", "--model", str(out), "--data", "synthetic:200:1x28x28",
                 "--out", str(tmp_path / "ft"), "--set", "optim.epochs=1", *T]) == 0


def test_torchvision_resnet18_state_dict(tmp_path, capsys):
    torch.manual_seed(0)
    pt = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), pt)
    out = tmp_path / "tv-clean"
    assert main(["cleanse", "--model", str(pt), "--arch", "torchvision:resnet18", "--num-classes", "10",
                 "--input-shape", "3,32,32", "--norm", "torchvision", "--data", "synthetic:300:3x32x32",
                 "--out", str(out), *SHORT]) == 0
    side = json.loads((out / "model.json").read_text())
    assert side["arch"] == "torchvision:resnet18" and side["mean"] == pytest.approx([0.485, 0.456, 0.406])
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert "torchvision:resnet18, 10 classes, input 3x32x32" in capsys.readouterr().out
    # bcu's own resnet18 is the CIFAR variant: the same file under that name is refused with one line
    rc = main(["verify", str(pt), "--arch", "resnet18", "--num-classes", "10", "--input-shape", "3,32,32"])
    assert "does not match architecture 'resnet18'" in one_error(capsys, rc)


def _hub_vit(folder, data_config=True):
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
                            in_chans=3, depth=2)
    dc = dict(input_size=(3, 32, 32), mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), interpolation="bilinear",
              crop_pct=1.0) if data_config else None
    timm.models.save_for_hf(net, folder, safe_serialization=True, data_config=dc)
    return net


def test_hub_folder_in_and_out_round_trip_through_timm(tmp_path, capsys):
    src = tmp_path / "hub-in"
    _hub_vit(src)
    model, info = load_model(src)
    assert info["format"] == "hub" and model.spec.arch == "timm:vit_tiny_patch16_224"
    assert model.spec.input_shape == (3, 32, 32) and model.spec.mean == pytest.approx((0.49, 0.48, 0.45))
    capsys.readouterr()
    assert main(["verify", str(src)]) == 0
    assert "Hub folder" in capsys.readouterr().out
    out = tmp_path / "hub-out"
    assert main(["cleanse", "--model", str(src), "--data", "synthetic:300:3x32x32", "--out", str(out),
                 "--out-format", "hub", *SHORT]) == 0
    assert {"config.json", "model.safetensors", "model.json", "README.md"} <= {p.name for p in out.iterdir()}
    back = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    ours, _ = load_model(out)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(ours.normalize(x)), ours(x))  # timm's own loader: the same network, bit for bit
        teacher, _ = load_model(src)
        assert not torch.equal(teacher(x), ours(x))  # and it is the cleansed one
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32] and cfg["pretrained_cfg"]["mean"] == [0.49, 0.48, 0.45]
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert "model card and config.json" in capsys.readouterr().out


def test_hub_folder_without_input_facts_needs_flags(tmp_path, capsys):
    src = tmp_path / "hub-bare"
    _hub_vit(src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["pretrained_cfg"]
    (src / "config.json").write_text(json.dumps(cfg))
    rc = main(["verify", str(src)])
    assert "records no input_shape (pretrained_cfg); pass --input-shape" in one_error(capsys, rc)
    assert main(["verify", str(src), "--input-shape", "3,32,32", "--norm", "timm"]) == 0


BAD_CONFIGS = {
    "not json": (b"{nope", "is not valid JSON"),
    "not an object": (b"[1, 2]", "must be a JSON object"),
    "architecture with a prefix": ({"architecture": "hf-hub:evil/model"}, "'architecture' must name a timm model"),
    "architecture not in timm": ({"architecture": "resnet999"}, "timm has no model 'resnet999'"),
    "num_classes a text": ({"num_classes": "ten"}, "num_classes: expected an integer in [2, 100000], got 'ten'"),
    "num_classes huge": ({"num_classes": 10 ** 9}, "num_classes: expected an integer in [2, 100000]"),
    "model_args disagree": ({"model_args": {"num_classes": 5}}, "disagrees with num_classes 10"),
    "model_args not a table": ({"model_args": [1]}, "'model_args' must be a table"),
    "input_size huge": ({"pretrained_cfg": {"input_size": [3, 10 ** 6, 32]}}, "input_size H: expected an integer"),
    "input_size short": ({"pretrained_cfg": {"input_size": [3, 32]}}, "input_size must be [C, H, W]"),
    "mean NaN": (b"NAN", "pretrained_cfg.mean: expected a list of 1 to 16 finite numbers"),
    "std of 2 values": ({"pretrained_cfg": {"std": [0.2, 0.2]}}, "mean/std need 1 or 3 values"),
    "a loading option": ({"model_args": {"checkpoint_path": "/etc/passwd"}}, "option 'checkpoint_path' is refused"),
    "an option that is a table": ({"model_args": {"act_layer": {"a": 1}}}, "expected a number, true/false or a short"),
    "huge model": ({"model_args": {"embed_dim": 40000, "num_heads": 4}}, "more than the 500,000,000 bcu builds"),
    "label names": ({"label_names": ["a"]}, "label_names must be 10 short texts"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_json_is_refused_with_one_line(tmp_path, capsys, case):
    src = tmp_path / "hub"
    _hub_vit(src)
    change, message = BAD_CONFIGS[case]
    if isinstance(change, bytes):
        if change == b"NAN":
            cfg = json.loads((src / "config.json").read_text())
            cfg["pretrained_cfg"]["mean"] = [float("nan")] * 3
            (src / "config.json").write_text(json.dumps(cfg))  # json writes NaN, and Python's json reads it
        else:
            (src / "config.json").write_bytes(change)
    else:
        cfg = json.loads((src / "config.json").read_text())
        for k, v in change.items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
        (src / "config.json").write_text(json.dumps(cfg))
    rc = main(["verify", str(src)])
    assert message in one_error(capsys, rc)


def test_arch_options_and_formats_refused_with_one_line(tmp_path, capsys, model_dir):
    pt = tmp_path / "r.pt"
    torch.save(timm.create_model("resnet18", num_classes=10, in_chans=1).state_dict(), pt)
    base = ["verify", str(pt), "--arch", "timm:resnet18", "--num-classes", "10", "--input-shape", "1,28,28"]
    assert "option 'pretrained' is refused" in one_error(capsys, main(base + ["--arch-opt", "pretrained=true"]))
    assert "use --num-classes" in one_error(capsys, main(base + ["--arch-opt", "num_classes=3"]))
    assert "expected KEY=VALUE" in one_error(capsys, main(base + ["--arch-opt", "patch_size"]))
    assert "timm has no model 'resnet19'" in one_error(capsys, main(base[:3] + ["timm:resnet19"] + base[4:]))
    assert "give --norm or --mean/--std" in one_error(capsys, main(base + ["--norm", "timm", "--mean", "0.5",
                                                                          "--std", "0.2"]))
    assert "--norm torchvision needs a torchvision:NAME" in one_error(capsys, main(base + ["--norm", "torchvision"]))
    # --out-format hub is timm's layout: refused for bcu's own zoo before anything is written
    out = tmp_path / "o"
    rc = main(["cleanse", "--model", str(model_dir), "--data", "synthetic:100", "--out", str(out),
               "--out-format", "hub", *SHORT])
    assert "needs a timm:NAME architecture" in one_error(capsys, rc) and not out.exists()


def test_model_card_and_scan(tmp_path, capsys, data):
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    pt = tmp_path / "m.pt"
    torch.save(net.state_dict(), pt)
    out = tmp_path / "card"
    assert main(["cleanse", "--model", str(pt), "--arch", "timm:resnet18", "--num-classes", "10", "--input-shape",
                 "1,28,28", "--mean", "0.5", "--std", "0.25", "--data", data[0], "--out", str(out), "--scan",
                 "--set", "scan.steps=4", "--set", "scan.images=32", "--test-data", data[1], *SHORT]) == 0
    rep = json.loads((out / "report.json").read_text())
    side = json.loads((out / "model.json").read_text())
    meta = front_matter(out / "README.md")
    assert meta["library_name"] == "bcu" and {"bcu", "backdoor-removal", "timm"} <= set(meta["tags"])
    assert meta["base_model"] == f"sha256:{rep['input']['sha256']}"
    assert meta["bcu"]["model_sha256"] == side["sha256"] and meta["bcu"]["labels_read"] is False
    assert meta["bcu"]["arch"] == "timm:resnet18" and meta["bcu"]["input_shape"] == [1, 28, 28]
    assert set(rep["scan"]) == {"teacher", "cleansed"} and len(rep["scan"]["cleansed"]["classes"]) == 10
    assert rep["scan"]["teacher"]["steps"] == 4 and "scan_flagged" in meta["bcu"]
    text = (out / "README.md").read_text()
    for section in ("## What was done", "## Settings", "## Before and after", "## Evidence that holds without labels",
                    "## The unlabeled images, diagnosed before the cleanse", "## Limitations"):
        assert section in text, section
    assert "teacher: stamp px" in text and "Teacher/student agreement in the last epoch" in text
    assert "| teacher |" in text and "effective number of classes" in text  # before/after and the diagnosis
    # the card must describe these weights: a card of other weights fails bcu verify
    (out / "README.md").write_text(text.replace(side["sha256"], "0" * 64))
    capsys.readouterr()
    assert "the card describes other weights" in one_error(capsys, main(["verify", str(out)]))
    assert "--set scan.* needs --scan" in one_error(capsys, main(
        ["cleanse", "--model", str(out), "--data", data[0], "--out", str(tmp_path / "x"), "--set", "scan.steps=3"]))


@pytest.mark.parametrize("size", [28, 32])
def test_reinit_plan_of_a_timm_vit_goes_by_whole_blocks(size):
    model = create_model("timm:vit_tiny_patch16_224", 10, (1, size, size), img_size=size, patch_size=4)
    layers = plan(model, (1, size, size), ReinitConfig())
    names = [l.name for l in layers]
    assert not any("norm" in n for n in names)  # LayerNorms, like BatchNorms, are never re-initialised
    assert layers[0].name == "net" and layers[0].stage == "stem"  # class token + position embeddings: the stem's ratio
    assert layers[0].numel == model.net.cls_token.numel() + model.net.pos_embed.numel()
    assert layers[-1].name == "net.head" and layers[-1].stage == "head"
    stage_of = {}
    for l in layers[1:-1]:
        block = int(l.name.split(".")[2]) if l.name.startswith("net.blocks.") else 0
        stage_of.setdefault(block, set()).add(l.stage)
    assert all(len(s) == 1 for s in stage_of.values()), stage_of  # every block in one stage, whole
    assert [stage_of[b].pop() for b in range(12)] == ["stage1"] * 3 + ["stage2"] * 3 + ["stage3"] * 3 + ["stage4"] * 3
    ratios = [l.ratio for l in layers[1:-1]]
    assert all(a <= b for a, b in zip(ratios, ratios[1:])) and ratios[0] < ratios[-1]  # deeper blocks lose more
    assert {l.name: l.stage for l in layers}["net.patch_embed.proj"] == "stage1"
