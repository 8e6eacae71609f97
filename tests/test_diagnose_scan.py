"""bcu.diagnose (label-free checks of unlabeled images against a model) and bcu.scan (a label-free
Neural-Cleanse-style trigger scan), on small trained and hand-built models."""
import copy
import math

import pytest
import torch
from torch import nn

from bcu.data import make_synthetic
from bcu.diagnose import DiagnosisConfig, bn_shift, diagnose
from bcu.errors import DataError
from bcu.scan import ScanConfig, scan
from bcu.train import recalibrate_batchnorm


@pytest.fixture(scope="module")
def teacher(small_teacher):
    return small_teacher


@pytest.fixture(scope="module")
def test_set():
    return make_synthetic(400, seed=1)


class Coded(nn.Module):
    """Predicts class (first pixel value) mod K with a fixed margin: known predictions, no BatchNorm."""

    def __init__(self, k=4, margin=10.0):
        super().__init__()
        self.k, self.margin = k, margin

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 255).round().long() % self.k
        return nn.functional.one_hot(cls, self.k).float() * self.margin


def coded_images(counts):
    cls = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.zeros(len(cls), 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = cls.to(torch.uint8)
    return x


# -------------------------------------------------------------------------------------------------
# diagnose


def test_effective_classes_shares_and_untaught_by_the_documented_rule():
    counts = [50, 30, 16, 4]
    d = diagnose(Coded(4), coded_images(counts))
    assert d.images == 100 and d.num_classes == 4 and d.predicted == counts
    assert d.share == pytest.approx([0.5, 0.3, 0.16, 0.04])
    p = torch.tensor(counts, dtype=torch.float64) / 100
    assert d.effective_classes == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    # a class needs min_share / K of the images (here 5 of 100): 4 images are too few, 16 enough
    assert d.untaught == [3]
    assert any("classes 3" in w for w in d.warnings) and not d.ok
    assert d.bn_shift is None and d.bn_layers == []  # no BatchNorm, no shift
    balanced = diagnose(Coded(4), coded_images([25, 25, 25, 25]))
    assert balanced.effective_classes == pytest.approx(4.0) and balanced.untaught == [] and balanced.ok


def test_confidence_is_the_mean_top1_probability_and_warns_when_low():
    x = coded_images([10, 10, 10, 10])
    sure = diagnose(Coded(4, margin=10.0), x)
    want = math.exp(10) / (math.exp(10) + 3)
    assert sure.confidence == pytest.approx(want, rel=1e-5) and sure.ok
    unsure = diagnose(Coded(4, margin=0.5), x)
    assert unsure.confidence == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 3), rel=1e-5)
    assert any("unsure" in w for w in unsure.warnings)


def test_images_of_one_class_give_one_effective_class(teacher, test_set):
    one = test_set.images[test_set.labels == 3]
    d = diagnose(teacher, one)
    assert d.effective_classes < 1.2
    assert d.untaught == [c for c in range(10) if c != 3]
    assert any("uneven" in w for w in d.warnings) and any("almost none" in w for w in d.warnings)
    full = diagnose(teacher, test_set.images)
    assert full.effective_classes > 8 and full.untaught == [] and full.confidence > 0.6


def test_bn_shift_is_zero_on_the_statistics_images_and_large_on_shifted_ones(teacher, test_set):
    model = copy.deepcopy(teacher)
    recalibrate_batchnorm(model, test_set.images, batch_size=len(test_set))  # its statistics: these images
    state = {k: v.clone() for k, v in model.state_dict().items()}
    same = diagnose(model, test_set.images)
    assert same.bn_shift is not None and same.bn_shift < 1e-4
    assert [l["layer"] for l in same.bn_layers] == ["net.features.1", "net.features.5", "net.features.9"]
    assert all(l["kl"] < 1e-4 for l in same.bn_layers)
    assert not any("feature statistics" in w for w in same.warnings)
    dark = diagnose(model, test_set.images // 3)
    assert dark.bn_shift > DiagnosisConfig().max_bn_shift and any("feature statistics" in w for w in dark.warnings)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # diagnose changes nothing
    # bn_shift itself: KL between Gaussians, zero only when both moments match
    layers = bn_shift(model, test_set.images // 3)
    assert layers[0]["kl"] > 0.5 and layers[0]["channels"] == 8


def test_diagnose_caps_the_images_and_refuses_none():
    x = coded_images([40, 40, 40, 40])
    d = diagnose(Coded(4), x, cfg=DiagnosisConfig(images=60))
    assert d.images == 60 and sum(d.predicted) == 60
    assert d.predicted == diagnose(Coded(4), x, cfg=DiagnosisConfig(images=60)).predicted  # the same subset
    with pytest.raises(DataError):
        diagnose(Coded(4), x[:0])


# -------------------------------------------------------------------------------------------------
# scan


class NearestMean(nn.Module):
    """Nearest class mean (no training); with ``target``, logit ``target`` jumps when the top-left 3x3
    corner is bright: a planted BadNets-style backdoor."""

    def __init__(self, means, target=None):
        super().__init__()
        self.register_buffer("means", means.flatten(1))
        self.target = target

    def forward(self, x):
        logits = -20.0 * ((x.flatten(1)[:, None, :] - self.means[None]) ** 2).mean(2)
        if self.target is not None:
            bright = x[:, :, :3, :3].mean((1, 2, 3))
            logits = logits.clone()
            logits[:, self.target] = logits[:, self.target] + 50 * torch.relu(bright - 0.6)
        return logits


@pytest.fixture(scope="module")
def means():
    train = make_synthetic(1000, seed=0)
    return torch.stack([train.images[train.labels == c].float().mean(0) / 255 for c in range(10)])


SCAN = ScanConfig(images=128, batch=16, steps=150)


def test_scan_flags_the_planted_target_and_finds_its_corner(means):
    images = make_synthetic(200, seed=3).images
    model = NearestMean(means, target=4)
    r = scan(model, images, SCAN)
    assert r.flagged == 4 and r.suspect == 4
    c = r.by_class(4)
    assert c.reached and c.flip >= 90 and c.ratio >= SCAN.ratio_threshold and c.index >= SCAN.index_threshold
    others = [x.l1 for x in r.classes if x.cls != 4]
    assert c.l1 < 30 and min(others) > 3 * c.l1
    mask = r.masks[4, 0]
    corner = float(mask[:3, :3].mean())
    outside = (float(mask.sum()) - float(mask[:3, :3].sum())) / (mask.numel() - 9)
    assert corner > 0.4 and corner > 20 * outside  # the stamp sits on the planted corner
    # the stamp works: applied to the images, the model answers 4
    x = images.float() / 255
    stamped = (1 - r.masks[4]) * x + r.masks[4] * r.patterns[4]
    assert float((model(stamped).argmax(1) == 4).float().mean()) > 0.9
    assert "class 4 flagged" in r.summary()


def test_scan_does_not_flag_a_model_without_the_backdoor(means):
    images = make_synthetic(200, seed=3).images
    r = scan(NearestMean(means), images, SCAN)
    assert r.flagged is None
    assert max(c.ratio for c in r.classes if c.ratio is not None) < SCAN.ratio_threshold
    assert r.summary().startswith("no class flagged")


def test_scan_is_deterministic_restores_the_model_and_refuses_bad_inputs(teacher, test_set):
    cfg = ScanConfig(images=32, batch=4, steps=12, min_pool=4)
    flags = [p.requires_grad for p in teacher.parameters()]
    teacher.train()
    a = scan(teacher, test_set.images[:64], cfg)
    b = scan(teacher, test_set.images[:64], cfg)
    assert teacher.training and [p.requires_grad for p in teacher.parameters()] == flags
    teacher.eval()
    assert [c.l1 for c in a.classes] == [c.l1 for c in b.classes] and torch.equal(a.masks, b.masks)
    assert a.images == 32 and a.steps == 12
    with pytest.raises(DataError, match="at least 16"):
        scan(teacher, test_set.images[:8], cfg)
    with pytest.raises(DataError, match="3 classes"):
        scan(Coded(3), coded_images([40, 0, 0]), cfg)  # one class predicted: two left to scan
