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
    assert float(a.fc.weight.detach().abs().max()) <= bound and abs(float(a.fc.weight.detach().std()) / (bound / math.sqrt(3)) - 1) < 0.05
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
    assert got.arch == "backdoorbench:vgg16_bn" and got.same_as == ["bcu-authors:vgg16bn"]
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


def test_unknown_keys_are_refused_with_the_closest_family():
    from bcu.errors import ModelError
    from bcu.models.infer import infer_architecture

    state = dict(meta_model("backdoorbench:preactresnet18").state_dict())
    state["extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ModelError) as e:
        infer_architecture(state, "x.pt")
    msg = str(e.value)
    assert "\n" not in msg and "pass --arch" in msg and "closest: backdoorbench:preactresnet18, 1 key differs" in msg
