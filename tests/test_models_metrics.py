import inspect

import pytest
import torch
from torch import nn

from bcu.attacks import create_attack
from bcu.checkpoint import load_model, save_model
from bcu.data import ImageSet
from bcu.errors import ConfigError, ModelError
from bcu.metrics import Scores, attack_scores, der
from bcu.models import MODELS, create_model


def _scalable(name: str) -> bool:
    return "width" in inspect.signature(MODELS.get(name)).parameters


@pytest.mark.parametrize("arch", [n for n in MODELS.names() if _scalable(n)])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_builds_and_runs(arch, shape):
    """Every family with a width option, at 1/8 width (cnn-small and cnn4 at full width). The
    fixed-size BackdoorBench/torchvision families are run against the originals' logits in
    tests/test_backdoorbench.py instead."""
    m = create_model(arch, 7, shape, width=0.125) if "cnn" not in arch else create_model(arch, 7, shape)
    assert m(torch.rand(2, *shape)).shape == (2, 7)


def test_unknown_arch_and_option():
    with pytest.raises(ConfigError, match="unknown architecture"):
        create_model("resnet1000")
    with pytest.raises(ConfigError, match="no option"):
        create_model("cnn-small", depth=3)


def test_save_load_round_trip(tmp_path):
    m = create_model("resnet18", 10, (3, 32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), width=0.125)
    side = save_model(m, tmp_path)
    m2, info = load_model(tmp_path)
    assert info["sha256"] == side["sha256"] and m2.spec == m.spec
    x = torch.rand(3, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x), m2(x))
    # a bare .pt state dict loads with --arch and friends
    torch.save(m.net.state_dict(), tmp_path / "bare.pt")
    m3, _ = load_model(tmp_path / "bare.pt", arch="resnet18", num_classes=10, input_shape=(3, 32, 32),
                       mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), width=0.125)
    assert torch.equal(m3(x), m2(x))
    with pytest.raises(ModelError, match="num_classes|output classes"):
        load_model(tmp_path / "bare.pt", arch="resnet18", num_classes=7, input_shape=(3, 32, 32), width=0.125)


class Fixed(nn.Module):
    """Predicts the target class 0 iff the top-left pixel is bright, else the true class via a lookup."""

    def __init__(self, labels_by_value):
        super().__init__()
        self.lookup = labels_by_value

    def forward(self, x):
        out = torch.zeros(x.shape[0], 3)
        for i in range(x.shape[0]):
            cls = 0 if x[i, 0, 0, 0] > 0.9 else self.lookup[round(float(x[i, 0, 1, 1]) * 255)]
            out[i, cls] = 1
        return out


def test_asr_excludes_target_class_and_ra_counts_true_class():
    # images encode their label in pixel (1,1); the "trigger" sets pixel (0,0) to white
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    imgs = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    imgs[:, 0, 1, 1] = torch.tensor([10, 11, 20, 21, 30, 31], dtype=torch.uint8)
    lookup = {10: 0, 11: 0, 20: 1, 21: 1, 30: 2, 31: 1}  # one clean mistake (31 -> 1)
    model = Fixed(lookup)
    test = ImageSet(imgs, labels)
    attack = create_attack("badnets", {"target": 0, "patch_size": 1, "margin": 0, "location": "top-left",
                                       "pattern": "white"}, (1, 4, 4), 3)
    s = attack_scores(model, test, attack)
    assert s.acc == pytest.approx(100 * 5 / 6)
    assert s.asr == 100.0 and s.ra == 0.0  # 4 non-target images, all flipped
    assert len(attack.triggered_test(test)) == 4


class FlipsOnly(Fixed):
    """Like Fixed, but the trigger only works on images whose true class is 1."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 3)
        for i in range(x.shape[0]):
            cls = self.lookup[round(float(x[i, 0, 1, 1]) * 255)]
            out[i, 0 if (x[i, 0, 0, 0] > 0.9 and cls == 1) else cls] = 1
        return out


def test_asr_by_class_splits_the_mean_by_source_class():
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    imgs = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    imgs[:, 0, 1, 1] = torch.tensor([10, 20, 21, 30, 31, 32], dtype=torch.uint8)
    lookup = {10: 0, 20: 1, 21: 1, 30: 2, 31: 2, 32: 2}
    test = ImageSet(imgs, labels, classes=["cat", "dog", "owl"])
    attack = create_attack("badnets", {"target": 0, "patch_size": 1, "margin": 0, "location": "top-left",
                                       "pattern": "white"}, (1, 4, 4), 3)
    model = FlipsOnly(lookup)
    scores = attack_scores(model, test, attack)
    assert scores.asr_by_class == {"dog": 100.0, "owl": 0.0}  # the target class is not scored
    assert scores.asr == pytest.approx(100 * 2 / 5)
    assert attack_scores(model, ImageSet(imgs, labels), attack).asr_by_class == {"1": 100.0, "2": 0.0}


def test_der_sign_and_range():
    before = Scores(acc=90, asr=100)
    assert der(before, Scores(acc=90, asr=0)) == 100.0
    assert der(before, Scores(acc=80, asr=0)) == 95.0  # ACC drop costs, ASR drop earns
    assert der(before, Scores(acc=90, asr=100)) == 50.0
    assert der(before, Scores(acc=95, asr=100)) == 50.0  # gains in ACC are not rewarded
    assert der(Scores(acc=90, asr=10), Scores(acc=90, asr=30)) == 50.0  # ASR rise is not rewarded either
    with pytest.raises(ValueError):
        der(Scores(acc=1), Scores(acc=1))
