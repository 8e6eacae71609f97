"""bcu's method options beyond the paper: the perturbation adversary, clean_fraction, recalibrate_bn,
weight averaging, frozen BatchNorm, reinit profiles, presets, synthesis (data-free cleanse), the
optimiser choice, trigger variants, unlabeled sources of kind none/imbalance, MobileNetV2 and ViT."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bcu.attacks import create_attack
from dataclasses import asdict as to_dict
from bcu.data import ImageSet, make_synthetic
from bcu.defenses import create_defense, run_defense
from bcu.defenses.adversary import AdversaryConfig, Bank, project_mask
from bcu.defenses.bcu import PRESETS, Cleanser, DistillConfig, DistillObjective, WeightAverage, preset
from bcu.defenses.reinit import ReinitConfig, interpolate_ratios, plan, reinitialize
from bcu.defenses.synthesis import SynthesisConfig, _BNStats, synthesize
from bcu.errors import ConfigError, DataError
from bcu.models import create_model
from bcu.train import OptimConfig, Step, predict

# bcu.unlabeled moves to bcu.data.sources: its imports are kept here, in one place
from bcu.data.sources import SourceConfig, build as build_source, resolve as resolve_source


def step(epoch=0, epochs=2, seed=0):
    return Step(epoch=epoch, epochs=epochs, generator=torch.Generator().manual_seed(seed))


class Recorder(nn.Module):
    """A linear classifier that keeps every input it is shown."""

    def __init__(self, pixels=64, classes=3):
        super().__init__()
        self.lin = nn.Linear(pixels, classes)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.lin(x.flatten(1))


def tiny(epochs=1, batch=32, **over):
    """The paper preset (no warp/noise/adversary) on a tiny budget, with ``over`` merged in."""
    return preset("paper", {"optim": {"epochs": epochs, "batch_size": batch}, **over})


def bn_model(seed=0):
    """cnn-small (width 0.5) whose BatchNorm running statistics were set by real images."""
    torch.manual_seed(seed)
    m = create_model("cnn-small", 10, (1, 28, 28), width=0.5)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(make_synthetic(64, seed=seed + 3).images.float() / 255)
    return m.eval()


@pytest.fixture(scope="module")
def teacher(small_teacher):
    return small_teacher


def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# -------------------------------------------------------------------------------------------------
# the adversary: project_mask and Bank


def test_project_mask_is_the_euclidean_projection_onto_box_and_budget():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(6, 1, 5, 5, generator=g) * 4 - 1  # values in [-1, 3]: outside the box both ways
    m[0] = torch.rand(1, 5, 5, generator=g) * 0.1     # already feasible: sum <= 2.5 < budget
    budget = 4.0
    p = project_mask(m, budget)
    assert p.shape == m.shape
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    sums = p.flatten(1).sum(1)
    assert bool((sums <= budget + 1e-4).all())
    assert torch.allclose(p[0], m[0])  # a feasible mask is its own projection
    assert torch.allclose(sums[1:], torch.full((5,), budget), atol=1e-3)  # over budget: the budget is tight
    # no feasible point is closer than the projection
    for _ in range(50):
        q = project_mask(torch.rand(6, 1, 5, 5, generator=g) * 2 - 0.5, budget)
        assert bool(((m - p).flatten(1).norm(dim=1) <= (m - q).flatten(1).norm(dim=1) + 1e-5).all())


@pytest.mark.parametrize("kind", ["patch", "l2"])
def test_bank_apply_perturbs_exactly_the_first_n_images(kind):
    cfg = AdversaryConfig(kind=kind, bank=4, budget=9.0, radius=1.0)
    bank = Bank(cfg, (3, 8, 8), seed=1)
    x = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1
    out = bank.apply(x, 4, torch.Generator().manual_seed(3)).detach()
    assert out.shape == x.shape
    assert torch.equal(out[4:], x[4:])  # bit-identical
    moved = (out[:4] - x[:4]).flatten(1).abs().amax(1)
    assert bool((moved > 0).all())
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    if kind == "patch":  # at most `budget` pixels of mask mass: most pixels are untouched
        changed = (out[:4] != x[:4]).any(1).flatten(1).sum(1)
        assert bool((changed <= 9).all())
    else:
        assert bool(((out[:4] - x[:4]).flatten(1).norm(dim=1) <= 0.1 * cfg.radius + 1e-5).all())
    assert torch.equal(bank.apply(x, 0, torch.Generator()), x)


def test_bank_initial_masks_are_squares_within_budget():
    bank = Bank(AdversaryConfig(kind="patch", bank=5, budget=9.0), (1, 10, 10), seed=0)
    for m in bank.mask:
        assert float(m.sum()) == pytest.approx(9.0)
        rows, cols = torch.nonzero(m[0] > 0, as_tuple=True)
        assert int(rows.max() - rows.min()) == 2 and int(cols.max() - cols.min()) == 2
    assert float(bank.pattern.min()) >= 0 and float(bank.pattern.max()) <= 1


@pytest.mark.parametrize("kind", ["patch", "l2"])
def test_ascent_raises_the_loss_and_stays_in_the_budget(kind):
    """Free ascent: the gradient the step's backward pass leaves is used by the next apply."""
    torch.manual_seed(0)
    w = torch.randn(1, 1, 8, 8)
    cfg = AdversaryConfig(kind=kind, bank=1, budget=6.0, radius=1.5, step=0.2)
    bank = Bank(cfg, (1, 8, 8), seed=0)
    x = torch.full((4, 1, 8, 8), 0.5)
    losses = []
    for i in range(25):
        out = bank.apply(x, 4, torch.Generator().manual_seed(i))
        loss = (out * w).sum()
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[-1] > losses[0] + 1.0
    state = bank.state_dict()  # flushes the last pending step
    if kind == "patch":
        assert float(state["mask"].min()) >= 0 and float(state["mask"].max()) <= 1
        assert float(state["mask"].sum()) <= cfg.budget + 1e-4
        assert float(state["pattern"].min()) >= 0 and float(state["pattern"].max()) <= 1
        # the pattern moved towards the sign of the weights where the mask is
        on = state["mask"][0, 0] > 0.5
        assert bool(((state["pattern"][0, 0][on] > 0.5) == (w[0, 0][on] > 0)).float().mean() > 0.9)
    else:
        assert float(state["delta"].flatten(1).norm(dim=1).max()) <= cfg.radius + 1e-4
        assert float(F.cosine_similarity(state["delta"].flatten(), w.flatten(), 0)) > 0.9


def test_bank_state_round_trip_and_mismatch():
    cfg = AdversaryConfig(kind="patch", bank=3, budget=4.0)
    a = Bank(cfg, (1, 6, 6), seed=0)
    x = torch.rand(5, 1, 6, 6)
    (a.apply(x, 5, torch.Generator().manual_seed(0)).sum()).backward()
    state = a.state_dict()
    b = Bank(cfg, (1, 6, 6), seed=99)
    b.load_state_dict(state)
    ya = a.apply(x, 5, torch.Generator().manual_seed(1))
    yb = b.apply(x, 5, torch.Generator().manual_seed(1))
    assert torch.equal(ya, yb)
    with pytest.raises(ValueError, match="does not match"):
        Bank(cfg, (1, 7, 7), seed=0).load_state_dict(state)
    with pytest.raises(ValueError):
        Bank(AdversaryConfig(kind="l2"), (1, 6, 6), seed=0).load_state_dict(state)


def test_adversary_config_validation():
    for bad in ({"bank": 0}, {"fraction": 0.0}, {"budget": 0.0}, {"radius": -1.0}, {"step": 1.5}):
        with pytest.raises(ConfigError):
            AdversaryConfig(kind="patch", **bad)


def test_objective_shows_the_adversary_to_the_student_only():
    t, s = Recorder().eval(), Recorder()
    cfg = DistillConfig(noise_blend=0.0, warp=0.0)
    obj = DistillObjective(t, cfg, AdversaryConfig(kind="patch", fraction=0.25, budget=4.0), (1, 8, 8), seed=0)
    assert obj.bank is not None
    x = torch.rand(8, 1, 8, 8)
    before = obj.bank.mask.clone()
    loss, _ = obj(s, x, None, step())
    assert torch.equal(t.seen[0], x)  # the teacher answers for the clean view
    assert bool((s.seen[0][:2] != x[:2]).flatten(1).any(1).all()) and torch.equal(s.seen[0][2:], x[2:])
    loss.backward()
    obj(s, x, None, step(seed=1))  # the next step ascends the bank with the gradient the first one left
    assert not torch.equal(obj.bank.mask, before)
    assert DistillObjective(t, cfg, AdversaryConfig(kind="none")).bank is None
    with pytest.raises(ConfigError, match="image shape"):
        DistillObjective(t, cfg, AdversaryConfig(kind="l2"))


# -------------------------------------------------------------------------------------------------
# distill options


def test_clean_fraction_reaches_the_student_unaltered():
    t, s = Recorder().eval(), Recorder()
    x = torch.rand(8, 1, 8, 8)
    DistillObjective(t, DistillConfig(clean_fraction=0.25, noise_blend=0.3, warp=1.0))(s, x, None, step())
    seen = s.seen[0]
    assert torch.equal(seen[6:], x[6:])  # the last quarter: exactly the teacher's view
    assert bool((seen[:6] != x[:6]).flatten(1).any(1).all())
    assert torch.equal(t.seen[0], x)
    with pytest.raises(ConfigError):
        DistillConfig(clean_fraction=1.0)


def test_clean_fraction_larger_than_the_unperturbed_share_with_an_adversary():
    """A bug: adversary.fraction * batch images were asked of a head of fewer images (shape error)."""
    t, s = Recorder().eval(), Recorder()
    obj = DistillObjective(t, DistillConfig(clean_fraction=0.75, noise_blend=0.0, warp=0.0),
                           AdversaryConfig(kind="patch", fraction=0.5, budget=4.0), (1, 8, 8), seed=0)
    x = torch.rand(8, 1, 8, 8)
    loss, _ = obj(s, x, None, step())
    assert torch.isfinite(loss)
    seen = s.seen[0]
    assert torch.equal(seen[2:], x[2:]) and bool((seen[:2] != x[:2]).flatten(1).any(1).all())


def test_recalibrate_bn_sets_running_mean_to_the_clean_images_mean():
    model = bn_model()
    data = make_synthetic(128, seed=4)  # a whole number of batches of 32
    res = Cleanser(tiny(1, 32, distill={"recalibrate_bn": True})).run(model, data)
    student = res.model
    inputs = []
    bn = student.net.features[1]
    h = bn.register_forward_pre_hook(lambda _m, inp: inputs.append(inp[0].detach()))
    predict(student, data.images)  # the first BatchNorm's input does not depend on any other BatchNorm
    h.remove()
    feats = torch.cat(inputs)
    want = feats.mean((0, 2, 3))
    assert torch.allclose(bn.running_mean, want, atol=1e-4)
    # without the option the distillation batches (cropped and flipped) leave other statistics
    plain = Cleanser(tiny(1, 32)).run(model, data).model.net.features[1]
    assert not torch.allclose(plain.running_mean, want, atol=1e-3)


def test_batchnorm_frozen_keeps_the_running_statistics():
    model = bn_model()
    data = make_synthetic(96, seed=4)
    frozen = Cleanser(tiny(2, 32, distill={"batchnorm": "frozen"})).run(model, data).model
    assert all(torch.equal(v, bn_state(frozen)[k]) for k, v in bn_state(model).items())
    w0, w1 = model.state_dict()["net.classifier.3.weight"], frozen.state_dict()["net.classifier.3.weight"]
    assert not torch.equal(w0, w1)  # it did train
    trained = Cleanser(tiny(2, 32)).run(model, data).model
    assert not torch.equal(bn_state(model)["net.features.1.running_mean"],
                           bn_state(trained)["net.features.1.running_mean"])


def test_weight_average_of_known_weights_is_their_mean():
    lin = nn.Linear(2, 1)
    avg = WeightAverage(start_epoch=1)
    assert not avg.apply(lin)  # nothing averaged yet
    values = [1.0, 2.0, 4.0, 9.0]
    for epoch, v in enumerate(values):
        with torch.no_grad():
            lin.weight.fill_(v)
            lin.bias.fill_(-v)
        avg.update(epoch, lin)
    assert avg.count == 3  # epoch 0 is before the start
    with torch.no_grad():
        lin.weight.zero_()
    assert avg.apply(lin)
    assert torch.allclose(lin.weight, torch.full((1, 2), 5.0)) and torch.allclose(lin.bias, torch.tensor([-5.0]))


def test_average_from_averages_the_epochs_from_that_fraction_on(monkeypatch):
    seen = []
    real = WeightAverage.update

    def spy(self, epoch, model):
        if epoch >= self.start:
            seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        real(self, epoch, model)

    monkeypatch.setattr(WeightAverage, "update", spy)
    model = bn_model()
    data = make_synthetic(64, seed=4)
    res = Cleanser(tiny(4, 32, distill={"average_from": 0.5})).run(model, data)
    assert len(seen) == 2  # epochs 3 and 4 of 4
    for k, p in res.model.named_parameters():
        assert torch.allclose(p, (seen[0][k] + seen[1][k]) / 2, atol=1e-6), k
    assert not torch.allclose(seen[0]["net.classifier.3.weight"], seen[1]["net.classifier.3.weight"])


# -------------------------------------------------------------------------------------------------
# reinit profiles


def test_depth_profile_ratios_rise_with_depth():
    m = create_model("mobilenetv2", 10, (3, 32, 32), width=0.25, depth=0.34)
    stages = plan(m, (3, 32, 32), ReinitConfig(scale=1.0, max_ratio=1.0))
    depth = plan(m, (3, 32, 32), ReinitConfig(scale=1.0, max_ratio=1.0, profile="depth"))
    body = depth[1:-1]
    r = [l.ratio for l in body]
    assert all(a <= b + 1e-12 for a, b in zip(r, r[1:]))
    assert r[0] == pytest.approx(0.01) and r[-1] == pytest.approx(0.27)
    assert r == pytest.approx(interpolate_ratios((0.01, 0.03, 0.09, 0.27), len(body)))
    assert (depth[0].ratio, depth[-1].ratio) == (stages[0].ratio, stages[-1].ratio) == (0.01, 0.10)
    assert [l.stage for l in depth] == [l.stage for l in stages]  # stages are still reported
    # the stages profile gives one ratio per stage; depth gives more distinct ones
    assert len({l.ratio for l in stages[1:-1]}) < len(set(r))


def test_uniform_ratio_replaces_profile_and_scale():
    m = create_model("cnn4")
    layers = plan(m, (1, 28, 28), ReinitConfig(uniform=0.3, scale=4.0, overrides={"net.classifier.3": 0.0}))
    by = {l.name: l.ratio for l in layers}
    assert by.pop("net.classifier.3") == 0.0  # overrides still come last
    assert set(by.values()) == {0.3}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    reinitialize(m, (1, 28, 28), ReinitConfig(uniform=0.0))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(ConfigError):
        ReinitConfig(uniform=1.5)


# -------------------------------------------------------------------------------------------------
# presets


def test_presets_spell_out_the_method_options_and_differ_where_documented():
    paper, v1, default = preset("paper"), preset("v1"), preset("default")
    assert to_dict(default) == to_dict(type(default)())  # the default preset is the dataclass defaults
    assert v1.reinit.scale == 4.0 and v1.distill.warp == 0.5 and v1.distill.noise_blend == 0.2
    assert paper.reinit.scale == 1.0 and paper.distill.warp == 0.0 and paper.distill.noise_blend == 0.0
    for name in ("paper", "v1"):  # every option bcu added is set explicitly (a new default cannot leak in)
        p = PRESETS[name]
        assert {"profile", "uniform"} <= set(p["reinit"])
        assert {"clean_fraction", "recalibrate_bn", "average_from", "batchnorm"} <= set(p["distill"])
        assert p["optim"]["optimizer"] == "sgd" and p["adversary"]["kind"] == "none" and p["synthesis"]["mix"] == 0
    c = preset("v1", {"distill": {"batchnorm": "frozen"}})
    assert c.distill.batchnorm == "frozen" and c.distill.warp == 0.5  # overrides merge into the preset


def test_defense_options_may_name_a_preset():
    d = create_defense("bcu", {"preset": "paper", "optim": {"epochs": 3}})
    assert to_dict(d.config) == to_dict(preset("paper", {"optim": {"epochs": 3}}))
    assert to_dict(create_defense("kd", {"preset": "v1"}).config) == to_dict(preset("v1"))
    assert to_dict(create_defense("bcu", {}).config) == to_dict(preset("default"))
    with pytest.raises(ConfigError, match="unknown preset"):
        create_defense("bcu", {"preset": "fast"})
    with pytest.raises(ConfigError, match="preset must be a name"):
        create_defense("bcu", {"preset": 3})


# -------------------------------------------------------------------------------------------------
# synthesis (data-free cleanse)


SYN = SynthesisConfig(images=20, batch=10, steps=40, lr=0.1)


def test_synthesized_images_are_balanced_and_match_the_batchnorm_statistics(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [p.requires_grad for p in teacher.parameters()]
    imgs = synthesize(teacher, (1, 28, 28), 10, SYN, seed=0)
    assert imgs.dtype == torch.uint8 and imgs.shape == (20, 1, 28, 28)  # uint8: [0, 1] once divided by 255
    assert torch.equal(imgs, synthesize(teacher, (1, 28, 28), 10, SYN, seed=0))  # deterministic
    assert not torch.equal(imgs, synthesize(teacher, (1, 28, 28), 10, SYN, seed=1))
    pred = predict(teacher, imgs).argmax(1)
    assert torch.bincount(pred, minlength=10).tolist() == [2] * 10  # every class taught, evenly
    stats = _BNStats(teacher)

    def bn_loss(x):
        with torch.no_grad():
            teacher(x)
        return float(stats.take())

    noise = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert bn_loss(imgs.float() / 255) < 0.5 * bn_loss(noise)
    stats.remove()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # teacher untouched
    assert [p.requires_grad for p in teacher.parameters()] == flags and not teacher.training


def test_synthesize_odd_count_and_model_without_batchnorm():
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
    imgs = synthesize(net, (2, 6, 6), 4, SynthesisConfig(images=7, batch=3, steps=5), seed=0)
    assert imgs.shape == (7, 2, 6, 6)  # the last batch of one image is padded, then trimmed


def test_cleanse_without_images_synthesizes_them():
    model = bn_model()
    cfg = tiny(1, 16, synthesis={"images": 32, "batch": 16, "steps": 5})
    res = Cleanser(cfg).run(model, None)
    assert res.info["synthesized_images"] == 32 and res.info["unlabeled_images"] == 0
    assert res.info["training_images"] == 32 and res.info["epochs_run"] == 1
    d = create_defense("bcu", {"preset": "paper", "optim": {"epochs": 1, "batch_size": 16},
                               "synthesis": {"images": 32, "batch": 16, "steps": 5}})
    assert d.synthesizes
    assert run_defense(d, model, None).info["synthesized_images"] == 32
    with pytest.raises(DataError, match="needs images"):
        run_defense(create_defense("ft"), model, None)
    with pytest.raises(DataError, match="input shape"):  # a bare module has no .spec to synthesize for
        Cleanser(cfg).run(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), None)


def test_synthesis_mix_adds_images_to_the_real_ones():
    model = bn_model()
    real = make_synthetic(40, seed=4)
    res = Cleanser(tiny(1, 16, synthesis={"mix": 0.5, "batch": 10, "steps": 3})).run(model, real)
    assert (res.info["unlabeled_images"], res.info["synthesized_images"], res.info["training_images"]) == (40, 20, 60)


# -------------------------------------------------------------------------------------------------
# the optimiser


def test_optimizer_choice_builds_the_named_torch_optimizer():
    p = [nn.Parameter(torch.ones(3))]
    sgd = OptimConfig(optimizer="sgd", lr=0.1, momentum=0.8, nesterov=True).build(p)
    assert type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["nesterov"]
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        opt = OptimConfig(optimizer=name, lr=0.1, betas=(0.5, 0.9), weight_decay=0.5).build(p)
        assert type(opt) is cls
        assert tuple(opt.param_groups[0]["betas"]) == (0.5, 0.9) and opt.param_groups[0]["weight_decay"] == 0.5
    with pytest.raises(ConfigError, match="betas"):
        OptimConfig(optimizer="adam", betas=(0.9, 1.0))


def test_adam_couples_and_adamw_decouples_the_weight_decay():
    """With a zero gradient Adam's L2 term is normalised into a full lr step; AdamW shrinks by lr*wd."""
    out = {}
    for name in ("adam", "adamw"):
        p = nn.Parameter(torch.ones(1))
        opt = OptimConfig(optimizer=name, lr=0.1, weight_decay=0.5).build([p])
        p.grad = torch.zeros(1)
        opt.step()
        out[name] = float(p.detach())
    assert out["adam"] == pytest.approx(0.9, abs=1e-4)
    assert out["adamw"] == pytest.approx(0.95, abs=1e-6)


# -------------------------------------------------------------------------------------------------
# trigger variants


def test_badnets_patch_width_changes_exactly_that_rectangle():
    shape = (2, 10, 12)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0)) * 0.5
    for loc, rows, cols in (("top-left", (1, 3), (1, 6)), ("bottom-right", (7, 9), (6, 11))):
        a = create_attack("badnets", {"patch_size": 2, "patch_width": 5, "location": loc, "margin": 1,
                                      "pattern": "white"}, shape, 10)
        changed = (a.apply(x) != x).any(1).any(0)
        want = torch.zeros(10, 12, dtype=torch.bool)
        want[rows[0]:rows[1], cols[0]:cols[1]] = True
        assert torch.equal(changed, want), loc
    line = create_attack("badnets", {"patch_size": 1, "patch_width": 12, "margin": 0, "pattern": "white"}, shape, 10)
    assert torch.equal(line.buffers["mask"][0].sum(1), torch.tensor([0.0] * 9 + [12.0]))  # a full-width line
    with pytest.raises(ConfigError, match="does not fit"):
        create_attack("badnets", {"patch_size": 2, "patch_width": 12, "margin": 1}, shape, 10)


def test_blended_rings_differ_from_noise_and_are_deterministic_per_seed():
    shape = (3, 16, 16)
    ring = lambda seed, **o: create_attack("blended", {"pattern": "rings", "seed": seed, **o}, shape, 10).buffers["pattern"]
    noise = create_attack("blended", {"pattern": "noise", "seed": 0}, shape, 10).buffers["pattern"]
    r0 = ring(0)
    assert torch.equal(r0, ring(0)) and not torch.equal(r0, ring(1))
    assert not torch.equal(r0, ring(0, rings_period=3.0))
    assert float(r0.min()) >= 0 and float(r0.max()) <= 1
    assert torch.equal(r0[0], r0[1]) and torch.equal(r0[0], r0[2])  # the same on every channel
    def neighbour_corr(p):  # correlation of horizontally adjacent pixels
        a, b = p[:, :, 1:].flatten(), p[:, :, :-1].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert neighbour_corr(r0) > 0.3 and abs(neighbour_corr(noise)) < 0.2  # rings are smooth, noise is not
    # concentric, as documented: 0.5 + 0.5 cos(2 pi r / period) around a centre in the middle half
    grid = torch.arange(3.75, 11.25 + 1e-9, 0.05)
    cy, cx = grid.view(-1, 1, 1, 1), grid.view(1, -1, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    fit = 0.5 + 0.5 * torch.cos(2 * math.pi * ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() / 6.0)
    assert float((fit - r0[0]).abs().amax((2, 3)).min()) < 0.05
    assert float((fit - noise[0]).abs().amax((2, 3)).min()) > 0.5


@pytest.mark.parametrize("orientation", ["horizontal", "vertical"])
def test_sig_orientation(orientation):
    shape = (2, 8, 12)
    a = create_attack("sig", {"orientation": orientation, "delta": 40.0, "frequency": 2.0, "test_delta": None},
                      shape, 10)
    s = a.buffers["signal"]
    assert torch.equal(s[0], s[1])
    if orientation == "vertical":  # varies along the height only, period H / f
        assert torch.equal(s, s[:, :, :1].expand_as(s))
        want = 40 / 255 * torch.sin(2 * math.pi * torch.arange(8.0) * 2 / 8)
        assert torch.allclose(s[0, :, 0], want, atol=1e-6)
    else:  # along the width only
        assert torch.equal(s, s[:, :1, :].expand_as(s))
        want = 40 / 255 * torch.sin(2 * math.pi * torch.arange(12.0) * 2 / 12)
        assert torch.allclose(s[0, 0, :], want, atol=1e-6)
    out = a.apply(torch.full((1, *shape), 0.5))
    assert torch.allclose(out[0], 0.5 + s)


# -------------------------------------------------------------------------------------------------
# unlabeled sources


def _holdout(per_class=50, k=10):
    labels = torch.arange(k).repeat_interleave(per_class)
    images = (labels.view(-1, 1, 1, 1) * 20 + torch.arange(len(labels)).view(-1, 1, 1, 1) % 7).to(torch.uint8)
    return ImageSet(images.expand(-1, 1, 4, 4).contiguous(), labels, None, "holdout")


def test_source_of_kind_none_gives_no_images():
    src = resolve_source("nothing", {"nothing": {"kind": "none"}})
    assert src.kind == "none"
    assert build_source(src, _holdout(), (1, 4, 4)) is None
    with pytest.raises(ConfigError):
        SourceConfig(kind="none", imbalance=10.0)


def test_imbalanced_source_counts_fall_with_the_class_index():
    data = _holdout(50)
    src = SourceConfig(kind="holdout", imbalance=10.0)
    out = build_source(src, data, (1, 4, 4), seed=0, num_classes=10)
    counts = torch.bincount(out.labels, minlength=10).tolist()
    assert counts == [max(1, round(50 * 10.0 ** (-c / 9))) for c in range(10)]
    assert counts[0] == 50 and counts[-1] == 5
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[0] > counts[4] > counts[-1]
    again = build_source(src, data, (1, 4, 4), seed=0, num_classes=10)
    assert torch.equal(out.images, again.images)
    other = build_source(src, data, (1, 4, 4), seed=1, num_classes=10)
    assert torch.bincount(other.labels, minlength=10).tolist() == counts and not torch.equal(out.images, other.images)
    with pytest.raises(DataError, match="labels"):
        build_source(src, ImageSet(data.images, None), (1, 4, 4))
    with pytest.raises(ConfigError):
        SourceConfig(kind="holdout", imbalance=0.5)
    with pytest.raises(ConfigError):
        SourceConfig(kind="synthetic", imbalance=10.0)


# -------------------------------------------------------------------------------------------------
# models: MobileNetV2 and ViT options (every registered model builds and runs in test_models_metrics)


def test_mobilenetv2_width_depth_and_stem_stride():
    def blocks(m):
        return sum(type(b).__name__ == "InvertedResidual" for b in m.net.features)

    full = create_model("mobilenetv2", 10, (3, 32, 32), width=0.25)
    half = create_model("mobilenetv2", 10, (3, 32, 32), width=0.25, depth=0.5)
    assert blocks(full) == 17  # the paper's 1+2+3+4+3+3+1
    assert blocks(half) == 1 + 1 + 2 + 2 + 2 + 2 + 1  # ceil(n / 2), at least one per stage
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    assert n_params(create_model("mobilenetv2", 10, (3, 32, 32), width=0.5)) > 2 * n_params(full)
    depthwise = [m for m in full.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    sizes = {}
    for stride in (1, 2):
        m = create_model("mobilenetv2", 10, (3, 32, 32), width=0.25, stem_stride=stride).eval()
        sizes[stride] = tuple(m.net.features(torch.rand(1, 3, 32, 32)).shape[2:])
    assert sizes == {1: (4, 4), 2: (2, 2)}
    with pytest.raises(ConfigError):
        create_model("mobilenetv2", 10, (3, 32, 32), stem_stride=3)


def test_vit_options():
    m = create_model("vit", 10, (1, 28, 28), patch=7, dim=30, heads=4, depth=3, width=1.0)
    assert m.net.pos_embed.shape == (1, 16 + 1, 32)  # 4x4 patches + the class token; dim rounded to 4 heads
    assert len(m.net.blocks) == 3 and m.net.patch_embed.proj.kernel_size == (7, 7)
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert create_model("vit", 10, (1, 28, 28), dim=32, heads=4, width=0.5).net.head.in_features == 16
    with pytest.raises(ConfigError, match="patches"):
        create_model("vit", 10, (1, 28, 28), patch=5)


def test_vit_reinit_plan_covers_attention_and_mlp_and_keeps_layernorm():
    torch.manual_seed(0)
    m = create_model("vit", 10, (1, 28, 28), dim=32, heads=2, depth=2)
    layers = plan(m, (1, 28, 28), ReinitConfig(scale=1.0, max_ratio=1.0))
    names = [l.name for l in layers]
    for b in (0, 1):
        for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert f"net.blocks.{b}.{part}" in names
    assert "net.patch_embed.proj" in names
    assert not any("norm" in n for n in names)
    # the classifier is the head (ratio 0.10), whatever module owns the class token / position embeddings
    head = layers[-1]
    assert head.name == "net.head" and head.stage == "head" and head.ratio == pytest.approx(0.10)
    owner = next(l for l in layers if l.name == "net")  # cls_token and pos_embed are planned with the stem
    assert owner.stage == "stem" and owner.numel == m.net.pos_embed.numel() + m.net.cls_token.numel()
    r = [l.ratio for l in layers[1:-1]]
    assert all(a <= b for a, b in zip(r, r[1:])) and r[0] < r[-1]  # deeper blocks lose more
    before = {k: v.clone() for k, v in m.state_dict().items()}
    reinitialize(m, (1, 28, 28), ReinitConfig(uniform=0.5))
    after = m.state_dict()
    for k, v in before.items():
        if "norm" in k:
            assert torch.equal(v, after[k]), k  # LayerNorms untouched
        else:
            assert not torch.equal(v, after[k]), k  # every other parameter, embeddings included, re-drawn
