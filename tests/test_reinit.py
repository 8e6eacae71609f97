import math

import pytest
import torch
from torch import nn

from bcu.defenses.reinit import ReinitConfig, interpolate_ratios, plan, reinitialize
from bcu.defenses.tracing import is_norm, trace_layers, weight_layers
from bcu.models import create_model

PAPER = {"stem": 0.01, "stage1": 0.01, "stage2": 0.03, "stage3": 0.09, "stage4": 0.27, "head": 0.10}


def _paper_stage_of(name: str) -> str:
    # the authors' mapping is by ResNet-18 attribute names; bcu's is by tracing: they must agree
    for s in ("layer1", "layer2", "layer3", "layer4"):
        if f".{s}." in f".{name}":
            return "stage" + s[-1]
    return "head" if name.endswith("linear") else "stem"


@pytest.mark.parametrize("arch", ["resnet18", "preact-resnet18"])
def test_resnet18_mapping_equals_the_paper(arch):
    m = create_model(arch, 10, (3, 32, 32), width=0.125)
    layers = plan(m, (3, 32, 32), ReinitConfig(scale=1.0, max_ratio=1.0))  # the paper preset
    convs_and_fc = [n for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert sorted(l.name for l in layers) == sorted(convs_and_fc)
    for l in layers:
        assert l.stage == _paper_stage_of(l.name), l.name
        assert l.ratio == pytest.approx(PAPER[l.stage]), l.name


def test_interpolation_keeps_paper_values_and_is_monotone():
    r = (0.01, 0.03, 0.09, 0.27)
    assert interpolate_ratios(r, 4) == list(r)
    assert interpolate_ratios(r, 2) == pytest.approx([0.01, 0.27])
    seven = interpolate_ratios(r, 7)
    assert seven[0] == pytest.approx(0.01) and seven[-1] == pytest.approx(0.27)
    assert all(a < b for a, b in zip(seven, seven[1:]))
    assert interpolate_ratios((0.0, 0.5), 3) == pytest.approx([0.0, 0.25, 0.5])


def test_measured_drop_fraction_matches_ratio_and_norms_untouched():
    torch.manual_seed(0)
    teacher = create_model("resnet18", 10, (3, 32, 32), width=0.25)
    # make running stats non-trivial so "untouched" is a real check
    teacher.train()
    with torch.no_grad():
        teacher(torch.rand(8, 3, 32, 32))
    student = create_model("resnet18", 10, (3, 32, 32), width=0.25)
    student.load_state_dict(teacher.state_dict())
    cfg = ReinitConfig(scale=2.0, seed=3)
    layers = reinitialize(student, (3, 32, 32), cfg)
    mods_t, mods_s = dict(teacher.named_modules()), dict(student.named_modules())
    for l in layers:
        n = l.numel
        tol = 4 * math.sqrt(l.ratio * (1 - l.ratio) / n) + 1.0 / n  # 4 sigma of a binomial proportion
        assert abs(l.dropped_fraction - l.ratio) <= tol, (l.name, l.dropped_fraction, l.ratio)
        changed = sum(int((p_s != p_t).sum()) for p_s, p_t in zip(mods_s[l.name].parameters(recurse=False),
                                                                   mods_t[l.name].parameters(recurse=False)))
        assert changed <= l.dropped  # kept weights are the teacher's exactly (no rescaling)
    for name, mod in teacher.named_modules():
        if is_norm(mod):
            for (k, a), (_, b) in zip(mod.state_dict().items(), mods_s[name].state_dict().items()):
                assert torch.equal(a, b), f"{name}.{k} changed"


def test_dropped_weights_come_from_a_fresh_default_init():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(7.0)  # far outside any default init range
    layers = reinitialize(m, (1, 8, 8), ReinitConfig(stem=0.5, head=0.5, seed=1))
    w = m[0].weight
    fresh = w[w != 7.0]
    assert len(fresh) == layers[0].dropped - int((m[0].bias != 7.0).sum())
    bound = 1 / math.sqrt(1 * 3 * 3)  # kaiming_uniform(a=sqrt(5)) bound of Conv2d's default init
    assert fresh.abs().max() <= bound + 1e-6


def test_works_on_any_module_with_unusual_structure():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.norm_thing = nn.GroupNorm(2, 8)
            self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, stride=2, padding=1) for _ in range(3)])
            self.ln = nn.LayerNorm(8)
            self.out = nn.Linear(8, 5)

        def forward(self, x):
            x = self.norm_thing(self.a(x)).relu()
            for b in self.blocks:
                x = b(x).relu()
            return self.out(self.ln(x.mean((2, 3))))

    m = Odd()
    layers = trace_layers(m, (3, 16, 16))
    assert [l.name for l in layers] == ["a", "blocks.0", "blocks.1", "blocks.2", "out"]
    assert "norm_thing" not in weight_layers(m) and "ln" not in weight_layers(m)
    planned = plan(m, (3, 16, 16))
    assert [l.stage for l in planned] == ["stem", "stage1", "stage2", "stage3", "head"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    reinitialize(m, (3, 16, 16), ReinitConfig(scale=3.0))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items() if k.startswith(("norm_thing", "ln")))


def test_overrides_scale_and_cap():
    m = create_model("cnn-small")
    layers = plan(m, (1, 28, 28), ReinitConfig(scale=4.0, max_ratio=0.9, overrides={"net.classifier.3": 1.0}))
    by = {l.name: l for l in layers}
    assert by["net.features.0"].ratio == pytest.approx(0.04)
    assert by["net.features.8"].ratio == pytest.approx(0.9)  # 0.27 * 4 capped
    assert by["net.classifier.3"].ratio == 1.0


def test_same_seed_same_masks():
    a, b = create_model("cnn-small"), create_model("cnn-small")
    b.load_state_dict(a.state_dict())
    reinitialize(a, (1, 28, 28), ReinitConfig(seed=5))
    reinitialize(b, (1, 28, 28), ReinitConfig(seed=5))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
