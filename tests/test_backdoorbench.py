"""BackdoorBench's and the BCU authors' checkpoints: architectures, inference, attack_result.pt, authors preset.

The reference key lists and logits in ``tests/fixtures/backdoorbench/families.json`` were written by
``make_fixtures.py`` from the original model files (BackdoorBench, BCU) and torchvision; these tests
need neither.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from bcu.models import MODELS
from bcu.models.backdoorbench import ALIASES, FAMILY_INIT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bb_det import det_input, det_state  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "backdoorbench"
FAMILIES = json.loads((FIXTURES / "families.json").read_text())["families"]


def meta_model(name: str, num_classes: int = 10, shape=(3, 32, 32)) -> torch.nn.Module:
    with torch.device("meta"):
        return MODELS.get(name)(num_classes=num_classes, input_shape=shape)


def key_list(model: torch.nn.Module):
    return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]


# --------------------------------------------------------------------------------------------------
# 1. the architectures, key for key and logit for logit


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - set(ALIASES)))
def test_family_matches_the_original(name):
    """Same keys in the same order with the same shapes and dtypes, and the same logits as the
    original network with the same (deterministic) weights."""
    ref = FAMILIES[name]
    model = meta_model(name)
    assert key_list(model) == ref["keys"], ref["source"]
    model.load_state_dict(det_state(model), strict=True, assign=True)  # meta -> the fixed weights, no copy
    model.eval()
    with torch.no_grad():
        out = model(det_input()).double()
    expect = torch.tensor(ref["logits"], dtype=torch.float64)
    assert out.shape == expect.shape
    assert torch.allclose(out, expect, rtol=1e-4, atol=1e-4 * float(expect.abs().max())), \
        f"{name}: max |diff| {float((out - expect).abs().max())}"


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_are_the_same_network(alias):
    """The authors' vgg16/vgg16bn are copies of torchvision's: the original files give the same keys
    and logits as torchvision's (so the forward test of the target covers them), and bcu builds the
    same module tree for both names."""
    target = ALIASES[alias]
    assert FAMILIES[alias]["keys"] == FAMILIES[target]["keys"]
    assert FAMILIES[alias]["logits"] == FAMILIES[target]["logits"]
    assert repr(meta_model(alias)) == repr(meta_model(target))


def test_fixture_covers_every_registered_family():
    ours = {n for n in MODELS.names() if n.startswith(("backdoorbench:", "bcu-authors:"))}
    assert ours == set(FAMILIES) == set(FAMILY_INIT)


def test_bcus_own_preact_resnet18_is_not_backdoorbenchs():
    """The mismatch the issue reports: bcu's zoo has a final BN that BackdoorBench's lacks."""
    own = set(meta_model("preact-resnet18").state_dict())
    bb = {k for k, _, _ in FAMILIES["backdoorbench:preactresnet18"]["keys"]}
    assert own - bb == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert bb - own == set()


def test_fresh_init_is_each_familys_own():
    """The authors' resnet18_DBD convs are kaiming-normal fan-out (std sqrt(2 / (C_out k k))) and its
    head keeps PyTorch's default; BackdoorBench's PreActResNet18 keeps PyTorch's default throughout."""
    torch.manual_seed(0)
    a = MODELS.get("bcu-authors:resnet18")(num_classes=10, input_shape=(3, 32, 32))
    w = a.layer3[1].conv2.weight
    assert abs(float(w.detach().std()) / math.sqrt(2 / (256 * 9)) - 1) < 0.02
    bound = 1 / math.sqrt(512)
    fc = a.fc.weight.detach()
    assert float(fc.abs().max()) <= bound and abs(float(fc.std()) / (bound / math.sqrt(3)) - 1) < 0.05
    p = MODELS.get("backdoorbench:preactresnet18")(num_classes=10, input_shape=(3, 32, 32))
    w = p.layer3[1].conv2.weight
    assert float(w.detach().abs().max()) <= 1 / math.sqrt(256 * 9) + 1e-7  # kaiming_uniform(a=sqrt 5): U(+-1/sqrt(fan_in))
    ratio = float(a.layer3[1].conv2.weight.detach().std()) / float(w.detach().std())
    assert 2.3 < ratio < 2.6  # the "about 2.45x"


# --------------------------------------------------------------------------------------------------
# 2. architecture inference from a bare state dict


def _own_families():
    from bcu.models.infer import SAME_NETWORK

    return [n for n in MODELS.names() if n not in SAME_NETWORK]


@pytest.mark.parametrize("name", _own_families())
def test_every_registered_family_is_recognised_from_its_keys(name):
    """bcu's own zoo and the BackdoorBench/authors families, at other class and channel counts (and
    another width where the family has one): exactly one network fits, with the values it was built with."""
    import inspect

    from bcu.models.infer import infer_architecture

    factory = MODELS.get(name)
    kw = {"width": 0.25} if "width" in inspect.signature(factory).parameters else {}
    shape = tuple(inspect.signature(factory).parameters["input_shape"].default)
    shape = (1 if shape[0] == 3 else 3, *shape[1:])
    with torch.device("meta"):
        net = factory(num_classes=43, input_shape=shape, **kw)
    got = infer_architecture(net.state_dict())
    assert (got.arch, got.num_classes, got.input_shape[0], got.kwargs) == (name, 43, shape[0], kw)
    assert got.input_shape[1:] == shape[1:]
    assert got.arch in got.describe() and "43 classes" in got.describe()


def test_aliases_are_reported_as_one_network():
    from bcu.models.infer import infer_architecture

    got = infer_architecture(meta_model("bcu-authors:vgg16bn").state_dict())
    assert got.arch == "backdoorbench:vgg16_bn" and got.same_as == ["bcu-authors:vgg16bn", "torchvision:vgg16_bn"]
    assert "assumed" in got.describe()  # VGG's weights do not record the input size


def test_two_networks_with_the_same_keys_are_refused_as_ambiguous():
    from bcu.errors import ModelError
    from bcu.models import backdoorbench as bb
    from bcu.models.infer import infer_architecture

    def twin(num_classes: int = 10, input_shape=(3, 32, 32)):
        """Same keys as BackdoorBench's PreActResNet18, another network."""
        return bb.BBPreActResNet((2, 2, 2, 2), num_classes, input_shape[0])

    MODELS.register("test:preact-twin")(twin)
    try:
        with pytest.raises(ModelError, match="fit backdoorbench:preactresnet18 and test:preact-twin; pass --arch"):
            infer_architecture(meta_model("backdoorbench:preactresnet18").state_dict())
    finally:
        MODELS._items.pop("test:preact-twin")
        MODELS._help.pop("test:preact-twin")


def test_torchvision_names_are_candidates_where_torchvision_is_installed():
    """torchvision (installed by `make setup`): its classifiers are inference candidates through the
    ``torchvision:`` model source, recognised from their keys, and those that are a BackdoorBench
    family's network are reported once, under the BackdoorBench name."""
    import torchvision

    from bcu.models import external
    from bcu.models.infer import infer_architecture

    assert "torchvision:resnet34" in external.inference_candidates()
    with torch.device("meta"):
        r34 = torchvision.models.resnet34(num_classes=7)
    got = infer_architecture(r34.state_dict())
    assert (got.arch, got.num_classes, got.input_shape) == ("torchvision:resnet34", 7, (3, 224, 224))
    got = infer_architecture(meta_model("backdoorbench:resnet18").state_dict())
    assert got.arch == "backdoorbench:resnet18" and "torchvision:resnet18" in got.same_as


def test_unknown_keys_are_refused_with_the_closest_family():
    from bcu.errors import ModelError
    from bcu.models.infer import infer_architecture

    state = dict(meta_model("backdoorbench:preactresnet18").state_dict())
    state["extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ModelError) as e:
        infer_architecture(state, "x.pt")
    msg = str(e.value)
    assert "\n" not in msg and "pass --arch" in msg and "closest: backdoorbench:preactresnet18, 1 key differs" in msg


# --------------------------------------------------------------------------------------------------
# 3. attack_result.pt: the layouts, and a malicious variant of every field

import functools  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

from bcu.errors import DataError  # noqa: E402


@functools.lru_cache(maxsize=1)
def _preact_state():
    return det_state(meta_model("backdoorbench:preactresnet18", 10))


def small_preact_state():
    """A BackdoorBench PreActResNet18 state dict (real keys and shapes, fixed values)."""
    return dict(_preact_state())


def pil_images(n: int, side: int = 8, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def v1_result(n: int = 6, side: int = 8, state=None, **over):
    """BackdoorBench v1.x / the authors' layout (prepro_cls_DatasetBD): lists of PIL images."""
    d = {"model_name": "preactresnet18", "num_classes": 10, "model": state if state is not None else small_preact_state(),
         "data_path": "../../../../data/cifar10", "img_size": (side, side, 3), "clean_data": "cifar10",
         "bd_train": {"x": None, "y": None, "original_index": None},
         "bd_test": {"x": pil_images(n, side), "y": np.zeros(n, dtype=np.int64), "original_index": np.arange(n),
                     "original_targets": (np.arange(n) % 9 + 1).astype(np.int64)}}
    d.update(over)
    return d


def save(obj, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(obj, folder / "attack_result.pt")
    return folder / "attack_result.pt"


def test_v1_layout_reads_model_and_poisoned_set(tmp_path):
    from collections import OrderedDict

    from bcu.attack_result import read_attack_result

    state = OrderedDict(("module." + k, v) for k, v in small_preact_state().items())  # DataParallel prefix
    d = v1_result(state=state)
    res = read_attack_result(save(d, tmp_path))
    assert (res.model_name, res.num_classes, res.input_shape, res.layout) == ("preactresnet18", 10, (3, 8, 8), "v1-pil")
    ref = small_preact_state()
    assert list(res.state) == list(ref) and all(torch.equal(res.state[k], ref[k]) for k in ref)
    bd = res.bd_test
    assert bd.images.dtype == torch.uint8 and bd.images.shape == (6, 3, 8, 8)
    assert np.array_equal(bd.images[3].permute(1, 2, 0).numpy(), np.asarray(d["bd_test"]["x"][3]))
    assert bd.targets.tolist() == [0] * 6 and bd.original_targets.tolist() == [1, 2, 3, 4, 5, 6]
    assert res.normalization == ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))


def test_oldest_and_v2_layouts(tmp_path):
    """v1.0 (float tensors of 0-255) and v2.x (retrieve_state() with PNG files beside the file,
    numpy.int64 indices, and the in-memory variant)."""
    from bcu.attack_result import read_attack_result

    imgs = pil_images(4)
    arr = np.stack([np.asarray(i) for i in imgs])
    old = v1_result(bd_test={"x": torch.tensor(arr).permute(0, 3, 1, 2).float(), "y": torch.zeros(4, dtype=torch.long),
                             "original_targets": torch.arange(1, 5)})
    res = read_attack_result(save(old, tmp_path / "old"))
    assert res.layout == "v1.0-tensor" and torch.equal(res.bd_test.images, torch.from_numpy(arr).permute(0, 3, 1, 2))
    folder = tmp_path / "v2"
    entries = {}
    for i, im in enumerate(imgs):
        (folder / "bd_test_dataset" / str(i + 1)).mkdir(parents=True, exist_ok=True)
        im.save(folder / "bd_test_dataset" / str(i + 1) / f"{i}.png")
        entries[np.int64(i)] = {"path": f"./record/run/bd_test_dataset/{i + 1}/{i}.png", "other_info": [0, i + 1]}
    state = {"bd_data_container": {"save_folder_path": "./record/run/bd_test_dataset", "data_dict": entries,
                                   "save_file_format": ".png"},
             "getitem_all": True, "getitem_all_switch": False, "original_index_array": np.arange(4),
             "poison_indicator": np.ones(4), "save_folder_path": "./record/run/bd_test_dataset"}
    res = read_attack_result(save(v1_result(bd_test=state, bd_train=None), folder))
    assert res.layout == "v2-folder" and torch.equal(res.bd_test.images, torch.from_numpy(arr).permute(0, 3, 1, 2))
    assert res.bd_test.original_targets.tolist() == [1, 2, 3, 4]
    (folder / "bd_test_dataset" / "3" / "2.png").unlink()
    with pytest.raises(DataError, match=r"bd_test_dataset/3/2.png does not exist"):
        read_attack_result(folder / "attack_result.pt")
    entries[np.int64(0)]["path"] = "./record/run/../../x.png"  # never read outside the result's folder
    with pytest.raises(DataError, match="is not <folder>/<label>/<index>.png"):
        read_attack_result(save(v1_result(bd_test=state), folder))
    ram = dict(state, bd_data_container={"data_dict": {i: (im, 0, i + 1) for i, im in enumerate(imgs)}})
    res = read_attack_result(save(v1_result(bd_test=ram), tmp_path / "ram"))
    assert res.layout == "v2-memory" and torch.equal(res.bd_test.images, torch.from_numpy(arr).permute(0, 3, 1, 2))


class Evil:
    """Unpickling this runs a shell command (it writes a marker file)."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvilEval:
    def __reduce__(self):
        return (eval, (f"open({Evil.marker!r}, 'w')",))


def _evil_variants(tmp_path: Path):
    """A malicious value in every field (and in every nested field of bd_test and the state dict)."""
    evil = Evil()
    d = v1_result(n=2, state={"conv1.weight": torch.zeros(2, 3, 3, 3)})  # refused before the model matters
    bd = d["bd_test"]
    yield "model_name", dict(d, model_name=evil)
    yield "num_classes", dict(d, num_classes=EvilEval())
    yield "model", dict(d, model=evil)
    yield "model tensor", dict(d, model=dict(d["model"], **{"conv1.weight": evil}))
    yield "data_path", dict(d, data_path=evil)
    yield "img_size", dict(d, img_size=(8, evil, 3))
    yield "clean_data", dict(d, clean_data=evil)
    yield "bd_train", dict(d, bd_train={"x": [evil], "y": None, "original_index": None})
    yield "bd_test", dict(d, bd_test=evil)
    yield "bd_test.x", dict(d, bd_test=dict(bd, x=[bd["x"][0], evil]))
    yield "bd_test.y", dict(d, bd_test=dict(bd, y=evil))
    yield "bd_test.original_index", dict(d, bd_test=dict(bd, original_index=evil))
    yield "bd_test.original_targets", dict(d, bd_test=dict(bd, original_targets=evil))
    yield "bd_test v2 entry", dict(d, bd_test={"bd_data_container": {"data_dict": {0: evil}}})
    yield "top level", evil
    yield "object array", dict(d, bd_test=dict(bd, y=np.array([evil, 1], dtype=object)))


def test_a_malicious_attack_result_runs_no_code(tmp_path):
    from bcu.attack_result import read_attack_result

    Evil.marker = str(tmp_path / "PWNED")
    n = 0
    for field_name, obj in _evil_variants(tmp_path):
        p = save(obj, tmp_path / f"v{n}")
        n += 1
        with pytest.raises(DataError) as e:
            read_attack_result(p)
        assert "\n" not in str(e.value) and "refusing" in str(e.value), (field_name, str(e.value))
        assert not Path(Evil.marker).exists(), field_name
    assert n == 16


class Forged:
    """Pickles as ``func(*args)`` then ``BUILD state``: the globals of a real file with forged values."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def forged_image(state):
    """A real PIL image that pickles with a forged state (as a crafted file would hold it)."""
    from PIL import Image

    im = Image.new("RGB", (2, 2))
    im.__getstate__ = lambda: state
    return im


def _forged():
    import warnings
    from collections import OrderedDict

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own _reconstruct (numpy 1 or 2 module path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = torch.zeros(10).storage()
    yield ("an array declaring 10^12 entries",
           Forged(reconstruct, (np.ndarray, (0,), b"b"), (1, (10 ** 6, 10 ** 6), np.dtype("i8"), False, b"")),
           "whose data hold 0 bytes")
    yield "a 1000x1000 PIL image of 2 bytes", forged_image([{}, "RGB", (1000, 1000), None, b"xx"]), "data hold 2 bytes"
    yield "a PIL image of mode P", forged_image([{}, "P", (1, 1), None, b"x"]), "mode"
    yield ("a tensor beyond its storage",
           Forged(torch._utils._rebuild_tensor_v2, (storage, 0, (10 ** 6,), (1,), False, OrderedDict())),
           "beyond its storage")
    yield ("bytes(10^12)", Forged(bytes, (10 ** 12,)), "bytes() with arguments")


def test_not_a_torch_zip_and_poisoned_images_of_another_size(tmp_path):
    from types import SimpleNamespace

    from bcu.attack_result import read_attack_result
    from bcu.workflows import stored_poisoned_set

    (tmp_path / "attack_result.pt").write_bytes(b"\x80\x02}q\x00.")  # a bare (legacy-style) pickle
    with pytest.raises(DataError, match="is not a torch zip file"):
        read_attack_result(tmp_path / "attack_result.pt")
    p = save(v1_result(n=2, side=8, state={"conv1.weight": torch.zeros(2, 3, 3, 3)}), tmp_path / "r")
    with pytest.raises(DataError, match=r"poisoned images are 3x8x8 but the model expects 3x32x32"):
        stored_poisoned_set(str(p), SimpleNamespace(spec=SimpleNamespace(input_shape=(3, 32, 32))))


@pytest.mark.parametrize("what, value, message", list(_forged()), ids=[w for w, _, _ in _forged()])
def test_forged_values_are_refused_before_allocation(tmp_path, what, value, message):
    """Allowed globals with forged arguments: refused by the checks, before anything is allocated."""
    from bcu.attack_result import read_attack_result

    d = v1_result(n=2, state={"conv1.weight": torch.zeros(2, 3, 3, 3)})
    d["bd_test"]["x"] = [d["bd_test"]["x"][0], value]
    with pytest.raises(DataError) as e:
        read_attack_result(save(d, tmp_path))
    assert "\n" not in str(e.value) and message in str(e.value), str(e.value)


# --------------------------------------------------------------------------------------------------
# 4. the `authors` preset: their re-init rule, their fresh init, their flip rule


def _authors_reinit(arch: str, fresh: str = "family", **kw):
    import dataclasses

    from bcu.defenses.bcu import preset
    from bcu.defenses.reinit import reinitialize
    from bcu.models import create_model

    cfg = dataclasses.replace(preset("authors").reinit, fresh=fresh)
    m = create_model(arch, 10, (3, 32, 32), **kw)
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    layers = {l.name: l for l in reinitialize(m, (3, 32, 32), cfg)}
    return before, m.net.state_dict(), layers


def test_authors_rule_gives_preactresnets_head_the_stems_ratio():
    before, after, layers = _authors_reinit("backdoorbench:preactresnet18", width=0.25)
    assert layers["linear.weight"].ratio == layers["conv1.weight"].ratio == 0.01  # the head quirk
    assert layers["layer4.1.conv2.weight"].ratio == 0.27 and layers["layer2.0.shortcut.0.weight"].ratio == 0.03
    assert not any("bn" in k for k in layers)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any("bn" in k for k in changed) and changed <= set(layers)
    frac = layers["layer4.1.conv2.weight"].dropped_fraction
    assert 0.26 < frac < 0.28


def test_authors_rule_mixes_torchvision_downsample_batchnorm_and_fc_gets_its_ratio():
    _, _, layers = _authors_reinit("backdoorbench:resnet18")
    assert layers["layer3.0.downsample.1.weight"].ratio == 0.09  # a BN parameter with no 'bn' in its key
    assert layers["fc.weight"].ratio == 0.10
    _, _, layers = _authors_reinit("bcu-authors:resnet18", width=0.25)
    assert not any("shortcut.1" in k for k in layers) and layers["layer3.0.shortcut.0.weight"].ratio == 0.09


def test_authors_fresh_values_come_from_the_familys_own_init():
    """Replaced entries of resnet18_DBD's layer4 are kaiming fan-out (about 2.45x the std of PyTorch's default)."""
    stds = {}
    for fresh in ("family", "layer"):
        before, after, _ = _authors_reinit("bcu-authors:resnet18", fresh, width=0.25)
        k = "layer4.1.conv2.weight"  # 128 -> 128 channels at this width
        hit = before[k] != after[k]
        stds[fresh] = float(after[k][hit].std())
    assert abs(stds["family"] / math.sqrt(2 / (128 * 9)) - 1) < 0.05
    assert abs(stds["layer"] / (1 / math.sqrt(3 * 128 * 9)) - 1) < 0.05


def test_authors_flip_rule_and_presets_spell_out_the_new_options():
    from dataclasses import asdict as to_dict

    from bcu.data import ImageSet
    from bcu.defenses.bcu import dataset_name, preset

    a, p = preset("authors"), preset("paper")
    assert a.hflip_only == ["cifar10"] and a.keep_last_batch and a.reinit.rule == "names" and a.reinit.fresh == "family"
    assert p.hflip_only is None and not p.keep_last_batch and p.reinit.rule == "depth"
    assert {k: v for k, v in to_dict(a).items() if k not in ("reinit", "hflip_only", "keep_last_batch")} == \
        {k: v for k, v in to_dict(p).items() if k not in ("reinit", "hflip_only", "keep_last_batch")}
    img = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    assert dataset_name(ImageSet(img, None, None, "cifar10:train")) == "cifar10"
    assert dataset_name(ImageSet(img, None, None, "/data/fashion-mnist")) == "fashion-mnist"
    assert dataset_name(ImageSet(img, None, [str(i) for i in range(10)], "cifar:train")) == "cifar10"
    assert dataset_name(ImageSet(img, None, [str(i) for i in range(100)], "cifar:train")) == "cifar100"


# --------------------------------------------------------------------------------------------------
# 5. end to end through the CLI: no --arch, no download, no torchvision


def _unlabeled_npz(path: Path, n: int = 16, side: int = 4) -> Path:
    rng = np.random.default_rng(1)
    np.savez(path, x=rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8))
    return path


def test_cli_cleanses_and_evaluates_a_backdoorbench_attack_result(tmp_path, capsys):
    """`bcu cleanse --model attack_result.pt` (BackdoorBench PreActResNet18 keys, bd_test of PIL
    images) without --arch, scored on the stored poisoned set, then `bcu evaluate --attack
    attack_result.pt` on the cleansed model with no --data."""
    from bcu.cli import main

    result = save(v1_result(n=8, side=4), tmp_path / "record" / "badnet_run")
    unl = _unlabeled_npz(tmp_path / "unl.npz")
    out = tmp_path / "clean"
    assert main(["cleanse", "--model", str(result), "--data", str(unl), "--out", str(out), "--attack", str(result),
                 "--preset", "authors", "--epochs", "1", "--batch-size", "8", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "inferred architecture backdoorbench:preactresnet18" in err and "'cifar10'" in err
    side = json.loads((out / "model.json").read_text())
    assert side["arch"] == "backdoorbench:preactresnet18" and side["input_shape"] == [3, 4, 4]
    assert side["mean"] == [0.4914, 0.4822, 0.4465]
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == {"teacher", "cleansed"} and 0 <= report["scores"]["teacher"]["asr"] <= 100
    assert report["config"]["reinit"]["rule"] == "names" and report["hflip"] is False  # npz: not cifar10
    assert {l["name"]: l["ratio"] for l in report["layers"]}["linear.weight"] == 0.01
    js = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(out), "--attack", str(result), "--json", str(js)]) == 0
    ev = json.loads(js.read_text())
    assert ev["attack"]["poisoned_images"] == 8 and "acc" not in ev
    assert ev["asr"] == pytest.approx(report["scores"]["cleansed"]["asr"]) and ev["ra"] == pytest.approx(
        report["scores"]["cleansed"]["ra"])


def test_stored_attack_scores_count_hits_on_the_stored_targets():
    """ASR = share classified as the stored bd targets, RA = share classified as the original labels."""
    from bcu.attack_result import PoisonedSet, stored_attack_scores

    class ByPixel(torch.nn.Module):  # predicts the class written in the first pixel
        def forward(self, x):
            return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 10).float()

    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([0, 0, 3, 5])
    got = stored_attack_scores(ByPixel(), PoisonedSet(images, torch.zeros(4, dtype=torch.long),
                                                     torch.tensor([1, 2, 3, 4])))
    assert got == {"asr": 50.0, "ra": 25.0, "poisoned_images": 4}


def test_cli_cleanses_the_authors_resnet18_state_dict_without_arch(tmp_path, capsys):
    """The authors' on-disk formats: a bare resnet18_DBD state dict, and their defense_result.pt
    ({'model_name', 'model', 'asr', 'acc', 'ra'}); both recognised from their keys."""
    from bcu.cli import main

    torch.manual_seed(0)
    net = MODELS.get("bcu-authors:resnet18")(num_classes=10, input_shape=(3, 4, 4))
    bare = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), bare)
    wrapped = tmp_path / "defense_result.pt"
    torch.save({"model_name": "resnet18", "model": net.state_dict(), "asr": torch.tensor(0.9), "acc": torch.tensor(0.8),
                "ra": -1}, wrapped)
    unl = _unlabeled_npz(tmp_path / "unl.npz")
    out = tmp_path / "out"
    assert main(["cleanse", "--model", str(wrapped), "--data", str(unl), "--out", str(out), "--input-shape", "3,4,4",
                 "--epochs", "1", "--batch-size", "8", "--no-progress"]) == 0
    assert "inferred architecture bcu-authors:resnet18 from the weights' keys" in capsys.readouterr().err
    assert json.loads((out / "model.json").read_text())["arch"] == "bcu-authors:resnet18"
    assert main(["verify", str(bare)]) == 0
    captured = capsys.readouterr()
    assert "inferred architecture bcu-authors:resnet18" in captured.err and "bcu-authors:resnet18" in captured.out
    assert main(["evaluate", "--model", str(bare), "--input-shape", "3,4,4"]) == 2  # no --data, no attack result
    assert "bcu: error: bcu evaluate needs --data (labelled test images), unless --attack is an attack_result.pt" \
        in capsys.readouterr().err


def test_cli_refuses_a_malicious_attack_result_and_an_ambiguous_state_dict(tmp_path, capsys):
    from bcu.cli import main

    Evil.marker = str(tmp_path / "PWNED")
    bad = save(v1_result(n=2, model_name=Evil()), tmp_path / "evil")
    unl = _unlabeled_npz(tmp_path / "unl.npz")
    assert main(["cleanse", "--model", str(bad), "--data", str(unl), "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("bcu: error: ") and "refusing to load posix.system" in err and "\n" not in err
    assert not Path(Evil.marker).exists() and not (tmp_path / "o").exists()
    assert main(["evaluate", "--model", str(bad), "--attack", str(bad)]) == 3
    assert "refusing to load posix.system" in capsys.readouterr().err and not Path(Evil.marker).exists()
    odd = tmp_path / "odd.pt"
    torch.save({"w": torch.zeros(3)}, odd)
    assert main(["evaluate", "--model", str(odd), "--data", str(unl)]) == 3
    err = capsys.readouterr().err.strip()
    assert "cannot tell the architecture" in err and "pass --arch" in err and "\n" not in err
