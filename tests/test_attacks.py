"""The attack suite: trigger contract, determinism, clean-label invariants, known trigger pixels,
artifact round trips, all-to-all labels, both image shapes, and the WaNet/IAD training loops.

Tiny synthetic data at one thread; the whole file runs in well under a minute.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bcu.attacks import ATTACKS, create_attack, load_attack, quantize
from bcu.checkpoint import load_model
from bcu.cli import main
from bcu.data import load_dataset, make_synthetic, to_float
from bcu.errors import ConfigError, DataError
from bcu.metrics import attack_scores
from bcu.models import create_model
from bcu.train import OptimConfig, Step

ALL = ["badnets", "blended", "sig", "lc", "wanet", "inputaware"]
SHAPES = [(1, 28, 28), (3, 32, 32)]
FAST = {"inputaware": {"mask_epochs": 1, "gen_channels": 4},
        "lc": {"surrogate_epochs": 1, "pgd_steps": 2, "surrogate_pgd_steps": 1}}
TINY = OptimConfig(epochs=1, batch_size=50, lr=0.05)


def make(name, shape=(1, 28, 28), **over):
    return create_attack(name, {**FAST.get(name, {}), **over}, shape, 10)


def batch(shape, n=6, seed=0):
    return to_float(make_synthetic(n, shape, 10, seed=seed).images)


@pytest.fixture(scope="module")
def small():
    return {s: make_synthetic(200, s, 10, seed=3) for s in SHAPES}


def tiny_model(shape):
    torch.manual_seed(0)
    return create_model("cnn-small", 10, shape, mean=(0.5,) * shape[0], std=(0.25,) * shape[0], width=0.5)


def test_all_attacks_registered():
    assert set(ALL) <= set(ATTACKS.names())


# -- the trigger contract ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ALL)
def test_trigger_contract(name, shape):
    a = make(name, shape)
    x = batch(shape)
    y = a.apply(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert (y - x).abs().max() > 1e-3, "the trigger changes nothing"
    assert torch.equal(a.apply(x), y), "apply is not deterministic"
    # batched: one image alone gets the same trigger as inside a batch
    assert torch.allclose(a.apply(x[2:3]), y[2:3], atol=1e-5)
    if name not in ("badnets", "blended"):  # the new attacks name a size mismatch in one line
        with pytest.raises(DataError):
            a.apply(torch.rand(2, shape[0], shape[1] + 4, shape[2] + 4))


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_trigger_and_poison(name, small):
    train = small[(1, 28, 28)]
    a, b = make(name, seed=5), make(name, seed=5)
    x = batch((1, 28, 28))
    assert torch.equal(a.apply(x), b.apply(x))
    if a.poisoning == "per-batch":  # poisoned as each batch is drawn: the same batch, the same poison
        with pytest.raises(ConfigError):
            a.poison(train)
        xb, yb = to_float(train.images[:16]), train.labels[:16]
        ra = a.poison_batch(xb, yb, torch.Generator().manual_seed(3))
        rb = b.poison_batch(xb, yb, torch.Generator().manual_seed(3))
        assert all(torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(ra, rb))
        return
    if name in ("lc",):
        model = tiny_model((1, 28, 28))
        pa, ia = a.poison(train, model)
        pb, ib = b.poison(train, model)
    else:
        pa, ia = a.poison(train)
        pb, ib = b.poison(train)
    assert torch.equal(ia, ib) and torch.equal(pa.images, pb.images) and torch.equal(pa.labels, pb.labels)
    assert torch.equal(train.images, small[(1, 28, 28)].images)  # input untouched


@pytest.mark.parametrize("name", ["blended", "wanet", "inputaware"])
def test_seed_changes_random_trigger(name):
    x = batch((1, 28, 28))
    assert not torch.equal(make(name, seed=0).apply(x), make(name, seed=1).apply(x))


# -- poisoning: labels ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sig", "lc"])
def test_clean_label_never_changes_labels(name, small):
    train = small[(1, 28, 28)]
    a = make(name, target=3, poison_rate=0.05)
    assert a.kind == "clean-label"
    args = (tiny_model((1, 28, 28)),) if name == "lc" else ()
    poisoned, idx = a.poison(train, *args)
    assert torch.equal(poisoned.labels, train.labels)
    assert len(idx) == min(10, int((train.labels == 3).sum())) and len(idx) > 0
    assert bool((train.labels[idx] == 3).all())
    changed = (poisoned.images != train.images).flatten(1).any(1)
    assert bool(changed[idx].all())
    assert not bool(changed[train.labels != 3].any()), "a non-target image was modified"
    with pytest.raises(ConfigError):
        make(name, mode="all-to-all")


@pytest.mark.parametrize("name", ["badnets", "blended", "wanet", "inputaware"])
def test_dirty_label_all_to_one_and_all_to_all(name, small):
    train = small[(1, 28, 28)]
    a = make(name, target=2)
    if a.poisoning == "per-batch":  # the poisoned share of each batch is relabelled as it is drawn
        x, y = to_float(train.images[:40]), train.labels[:40]
        n_bd = int(40 * a.config.poison_rate)
        assert n_bd >= 1
        for mode, want in (("all-to-one", torch.full_like(y[:n_bd], 2)), ("all-to-all", (y[:n_bd] + 1) % 10)):
            out = make(name, target=2, mode=mode).poison_batch(x, y, torch.Generator().manual_seed(0))
            assert torch.equal(out[1][:n_bd], want) and torch.equal(out[1][n_bd:], y[n_bd:])
        return
    poisoned, idx = a.poison(train)
    assert bool((poisoned.labels[idx] == 2).all()) and bool((train.labels[idx] != 2).all())
    assert len(idx) == 20
    b = make(name, mode="all-to-all")
    poisoned, idx = b.poison(train)
    assert torch.equal(poisoned.labels[idx], (train.labels[idx] + 1) % 10)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(poisoned.labels[keep], train.labels[keep])
    assert len(b.triggered_test(train)) == len(train)  # all-to-all: every class counts for ASR


@pytest.mark.parametrize("name", ALL)
def test_triggered_test_excludes_target(name, small):
    test = small[(1, 28, 28)]
    trig = make(name, target=4).triggered_test(test)
    assert len(trig) == int((test.labels != 4).sum()) and bool((trig.labels != 4).all())


# -- known triggers on hand-built inputs ------------------------------------------------------------

def test_badnets_patch_pixels():
    a = make("badnets")  # 3x3 checkerboard, bottom-right, margin 1
    y = a.apply(torch.full((1, 1, 28, 28), 0.5))[0, 0]
    patch = y[24:27, 24:27]
    expected = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(patch, expected)
    y[24:27, 24:27] = 0.5
    assert bool((y == 0.5).all())


def test_blended_formula():
    a = make("blended", (3, 32, 32), alpha=0.2)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pat = a.buffers["pattern"]
    assert torch.allclose(a.apply(x), 0.8 * x + 0.2 * pat)
    assert torch.allclose(make("blended", (3, 32, 32), alpha=0.2, test_alpha=0.5).apply(x), 0.5 * x + 0.5 * pat)


def test_sig_sinusoid_values():
    a = make("sig", (3, 32, 32), delta=20, frequency=6, test_delta=None)
    y = a.apply(torch.full((1, 3, 32, 32), 0.5))[0]
    j = torch.arange(32, dtype=torch.float64)
    row = 0.5 + 20 / 255 * torch.sin(2 * math.pi * j * 6 / 32)
    for c in range(3):
        for i in (0, 17, 31):
            assert torch.allclose(y[c, i].double(), row, atol=1e-6)
    # clipping at the pixel range, and the stronger test-time signal
    assert float(a.apply(torch.ones(1, 3, 32, 32)).max()) == 1.0
    b = make("sig", (3, 32, 32), delta=20, test_delta=40)
    yb = b.apply(torch.full((1, 3, 32, 32), 0.5))[0, 0, 0].double()
    assert torch.allclose(yb, 0.5 + 40 / 255 * torch.sin(2 * math.pi * j * 6 / 32), atol=1e-6)
    # training images carry delta, not test_delta
    train = make_synthetic(100, (3, 32, 32), 10, seed=0)
    poisoned, idx = b.poison(train)
    want = quantize(a._add(to_float(train.images[idx]), 1.0))
    assert torch.equal(poisoned.images[idx], want)


def test_lc_corner_pattern_and_amplitude():
    a = make("lc")
    y = a.apply(torch.full((1, 1, 28, 28), 0.5))[0, 0]
    left = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 1]])  # Turner et al.'s all-corners trigger
    assert torch.equal(y[:3, :3], left) and torch.equal(y[-3:, :3], left)
    assert torch.equal(y[:3, -3:], left.flip(1)) and torch.equal(y[-3:, -3:], left.flip(1))
    inner = y.clone()
    for r in (slice(0, 3), slice(25, 28)):
        for c in (slice(0, 3), slice(25, 28)):
            inner[r, c] = 0.5
    assert bool((inner == 0.5).all())
    red = make("lc", amplitude=16 / 255).stamp(torch.full((1, 1, 28, 28), 0.5), 16 / 255)[0, 0]
    assert torch.allclose(red[:3, :3], 0.5 + 16 / 255 * (2 * left - 1))
    one = make("lc", trigger="bottom-right").apply(torch.full((1, 1, 28, 28), 0.5))[0, 0]
    assert torch.equal(one[-3:, -3:], left.flip(1)) and bool((one[:3, :3] == 0.5).all())


def test_lc_pgd_stays_in_the_ball_and_raises_the_loss(small):
    train = small[(1, 28, 28)]
    model = tiny_model((1, 28, 28))
    from bcu.train import cross_entropy_objective, fit

    fit(model, train, cross_entropy_objective, OptimConfig(epochs=2, batch_size=50, lr=0.05), progress=False)
    a = make("lc", pgd_steps=5, epsilon=8)
    x, y = to_float(train.images[:40]), train.labels[:40]
    hard = a.harden(model, x, y)
    assert float((hard - x).abs().max()) <= 8 / 255 + 1e-6 and float(hard.min()) >= 0 and float(hard.max()) <= 1
    with torch.no_grad():
        model.eval()
        assert F.cross_entropy(model(hard), y) > F.cross_entropy(model(x), y) + 0.1
    # the poisoned training images are the hardened images with the trigger on top
    poisoned, idx = a.poison(train, model)
    want = quantize(a.stamp(a.harden(model, to_float(train.images[idx]), train.labels[idx]), 1.0))
    assert torch.equal(poisoned.images[idx], want)


def test_lc_l2_pgd_stays_in_the_ball_and_raises_the_loss(small):
    """The L2 variant: every perturbation within its per-image L2 ball and the [0, 1] box, the
    default step 2.5 epsilon / steps, deterministic from the seed, and harder than the clean image."""
    train = small[(1, 28, 28)]
    model = tiny_model((1, 28, 28))
    from bcu.train import cross_entropy_objective, fit

    fit(model, train, cross_entropy_objective, OptimConfig(epochs=2, batch_size=50, lr=0.05), progress=False)
    a = make("lc", norm="l2", pgd_steps=5, epsilon=300)
    assert a.config.step == pytest.approx(2.5 * 300 / 5) and make("lc").config.step == 2.0
    x, y = to_float(train.images[:40]), train.labels[:40]
    hard = a.harden(model, x, y)
    norms = (hard - x).flatten(1).norm(dim=1)
    assert float(norms.max()) <= 300 / 255 + 1e-4 and float(norms.min()) > 0
    assert float((hard - x).abs().max()) > 16 / 255  # L2 concentrates: some pixels move more than L-inf 16 allows
    assert float(hard.min()) >= 0 and float(hard.max()) <= 1
    assert torch.equal(hard, a.harden(model, x, y))
    with torch.no_grad():
        model.eval()
        assert F.cross_entropy(model(hard), y) > F.cross_entropy(model(x), y) + 0.1
    with pytest.raises(ConfigError):
        make("lc", norm="l2", epsilon=0)
    with pytest.raises(ConfigError):
        make("lc", epsilon=300)  # an L-inf bound above the pixel range


def test_wanet_warp_matches_the_paper_construction():
    a = make("wanet", (3, 32, 32), k=4, s=0.5)
    g = torch.Generator().manual_seed(0)
    ins = torch.rand(1, 2, 4, 4, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=32, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    lin = torch.linspace(-1, 1, 32)
    xx, yy = torch.meshgrid(lin, lin, indexing="xy")
    grid = (torch.stack((xx, yy), 2)[None] + 0.5 * noise / 32).clamp(-1, 1)
    assert torch.allclose(a.buffers["grid"], grid, atol=1e-6)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert torch.allclose(a.apply(x), F.grid_sample(x, grid.expand(2, -1, -1, -1), align_corners=True), atol=1e-6)
    const = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(a.apply(const), const, atol=1e-6)  # a warp moves pixels, it adds nothing
    assert float((a.buffers["grid"] - torch.stack((xx, yy), 2)[None]).abs().max()) > 0  # a real displacement


def test_wanet_batch_recipe():
    a = make("wanet", target=1)
    x, y = batch((1, 28, 28), n=50), torch.arange(50) % 10
    xb, yb = a.poison_batch(x, y, torch.Generator().manual_seed(0))
    nb, nc = a.batch_counts(50)
    assert (nb, nc) == (5, 10)
    assert torch.equal(xb[:nb], a.apply(x[:nb])) and bool((yb[:nb] == 1).all())
    assert not torch.allclose(xb[nb:nb + nc], a.apply(x[nb:nb + nc]))  # noise mode: a different warp
    assert torch.equal(yb[nb:], y[nb:]) and torch.equal(xb[nb + nc:], x[nb + nc:])
    b = make("wanet", mode="all-to-all")
    _, yb = b.poison_batch(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(yb[:5], (y[:5] + 1) % 10)


def test_inputaware_trigger_formula_and_batch_recipe():
    from bcu.attacks.inputaware import threshold

    a = make("inputaware", (3, 32, 32), target=7)
    x = batch((3, 32, 32), n=20)
    with torch.no_grad():
        p, m = a.generator(x), threshold(a.mask_net(x))
    assert torch.allclose(a.apply(x), x + (p - x) * m, atol=1e-6)
    assert m.shape == (20, 1, 32, 32) and float(m.min()) >= 0 and float(m.max()) <= 1
    y = torch.arange(20) % 10
    xb, yb, div, nb = a.poison_batch(x, y, torch.Generator().manual_seed(0))
    assert nb == 2 and bool((yb[:2] == 7).all()) and torch.equal(yb[2:], y[2:])
    assert torch.equal(xb[4:], x[4:]) and torch.isfinite(div)
    b = make("inputaware", (3, 32, 32), mode="all-to-all")
    _, yb, _, _ = b.poison_batch(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(yb[:2], (y[:2] + 1) % 10)


# -- artifacts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["badnets", "blended", "sig", "lc", "wanet"])
def test_artifact_round_trip(name, shape, tmp_path):
    a = make(name, shape, target=1, seed=3)
    # tamper with the stored tensors so the test fails unless they really travel through the file
    g = torch.Generator().manual_seed(9)
    for k, v in a.buffers.items():
        a.buffers[k] = (v + 0.01 * torch.rand(v.shape, generator=g)).clamp(-1, 1)
    a.save(tmp_path)
    b = load_attack(tmp_path)
    assert type(b) is type(a) and b.config == a.config and b.image_shape == a.image_shape
    x = batch(shape)
    assert torch.equal(b.apply(x), a.apply(x))
    assert not torch.equal(make(name, shape, target=1, seed=3).apply(x), a.apply(x))


def test_inputaware_trains_and_round_trips(small, tmp_path):
    train = small[(1, 28, 28)]
    a = make("inputaware")
    fresh = make("inputaware")
    model = tiny_model((1, 28, 28))
    history = a.train(model, train, TINY, augment_cfg=None, progress=False)
    assert [h.get("phase") for h in history] == ["mask", None]
    assert all(math.isfinite(v) for h in history for v in h.values() if isinstance(v, float))
    x = batch((1, 28, 28))
    assert not torch.equal(a.apply(x), fresh.apply(x)), "training left the generators unchanged"
    a.save(tmp_path)
    b = load_attack(tmp_path)
    assert torch.equal(b.apply(x), a.apply(x))
    assert torch.equal(b.apply(x), b.apply(x))
    # the generators were trained on CPU in place; training again from a fresh attack is reproducible
    c = make("inputaware")
    c.train(tiny_model((1, 28, 28)), train, TINY, augment_cfg=None, progress=False)
    assert torch.equal(c.apply(x), a.apply(x))


def test_wanet_trains_one_epoch(small):
    train = small[(3, 32, 32)]
    a = make("wanet", (3, 32, 32))
    model = tiny_model((3, 32, 32))
    before = [p.detach().clone() for p in model.parameters()]
    history = a.train(model, train, TINY, augment_cfg=None, progress=False)
    assert len(history) == 1 and "asr" in history[0] and math.isfinite(history[0]["loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with pytest.raises(ConfigError):
        make("wanet", (3, 32, 32), poison_rate=0.01).train(model, train, TINY, augment_cfg=None, progress=False)


def test_lc_adversarial_surrogate_trains_on_pgd_examples(small, monkeypatch):
    """An adversarially trained surrogate's objective sees PGD examples, not the batch."""
    from bcu.attacks import lc as lc_mod

    train = small[(1, 28, 28)]
    a = make("lc", surrogate="adversarial", surrogate_epsilon=8, surrogate_pgd_steps=2)
    assert isinstance(a.surrogate_objective(), lc_mod.AdversarialTraining)
    assert make("lc").surrogate_objective() is lc_mod.cross_entropy_objective
    calls = []
    real = lc_mod.pgd_linf

    def spy(model, x, y, eps, step, steps, generator):
        out = real(model, x, y, eps, step, steps, generator)
        calls.append((eps, step, steps, float((out - x).abs().max())))
        return out

    monkeypatch.setattr(lc_mod, "pgd_linf", spy)
    model = tiny_model((1, 28, 28))
    before = [p.clone() for p in model.parameters()]
    obj = a.surrogate_objective()
    step = Step(epoch=0, epochs=1, generator=torch.Generator().manual_seed(0))
    x, y = to_float(train.images[:32]), train.labels[:32]
    loss, stats = obj(model.train(), x, y, step)
    loss.backward()
    assert model.training and math.isfinite(float(loss.detach())) and "adv_acc" in stats
    eps, st, steps, moved = calls[0]
    assert eps == pytest.approx(8 / 255) and steps == 2 and st == pytest.approx(2.5 * eps / 2)
    assert 0 < moved <= eps + 1e-6
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # PGD itself changes no weight
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(DataError):
        obj(model, x, None, step)
    with pytest.raises(ConfigError):
        make("lc", surrogate_pgd_steps=0)


def test_lc_train_fits_a_surrogate_and_keeps_labels(small, monkeypatch):
    train = small[(1, 28, 28)]
    a = make("lc")
    seen = {}
    orig = a.poison

    def spy(data, model=None):
        seen["model"] = model
        out = orig(data, model)
        seen["labels_kept"] = torch.equal(out[0].labels, data.labels)
        return out

    monkeypatch.setattr(a, "poison", spy)
    model = tiny_model((1, 28, 28))
    a.train(model, train, TINY, augment_cfg=None, progress=False)
    assert seen["model"] is not None and seen["model"] is not model and seen["labels_kept"]


def test_config_errors():
    for name, bad in [("sig", {"delta": 0}), ("lc", {"epsilon": -1}), ("wanet", {"k": 1}),
                      ("wanet", {"poison_rate": 0.5, "cross_ratio": 2}), ("inputaware", {"mask_density": 0}),
                      ("inputaware", {"poison_rate": 0.6, "cross_rate": 0.5}), ("sig", {"bogus": 1})]:
        with pytest.raises(ConfigError):
            make(name, **bad)
    with pytest.raises(ConfigError):
        create_attack("wanet", {"k": 30}, (1, 28, 28), 10)


# -- CLI --------------------------------------------------------------------------------------------

def test_cli_lists_new_attacks(capsys):
    assert main(["attack", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ALL:
        assert f"{name} [" in out
    for opt in ("delta = 40.0", "test_delta = 60.0", "epsilon = 16.0", "poison_rate = 0.05", "k = 4", "s = 0.5",
                "cross_ratio = 2.0", "mask_density = 0.032"):
        assert opt in out


@pytest.mark.parametrize("name", ["sig", "wanet", "inputaware"])
def test_cli_attack_command(name, tmp_path):
    out = tmp_path / name
    sets = ["--set", "attack.mask_epochs=1", "--set", "attack.gen_channels=4"] if name == "inputaware" else []
    rc = main(["attack", "--attack", name, "--data", "synthetic:300", "--arch", "cnn-small", "--epochs", "1",
               "--batch-size", "50", "--holdout", "50", "--out", str(out), "--threads", "1", *sets])
    assert rc == 0
    assert (out / "attack.json").is_file() and (out / "attack.safetensors").is_file()
    loaded = load_attack(out)
    assert loaded.name == name
    x = batch((1, 28, 28))
    assert not torch.equal(loaded.apply(x), x)  # a trigger, not the identity
    # the saved model and trigger are the trained ones: scoring them again gives metrics.json's numbers
    model, _ = load_model(out)
    again = attack_scores(model, load_dataset("synthetic:300", split="test", labels=True), loaded)
    saved = json.loads((out / "metrics.json").read_text())
    assert (again.acc, again.asr, again.ra) == pytest.approx((saved["acc"], saved["asr"], saved["ra"]), abs=1e-6)


def test_trigger_for_another_image_shape_is_a_clear_error():
    from bcu.attacks import create_attack
    from bcu.data import make_synthetic
    from bcu.errors import DataError

    attack = create_attack("badnets", {}, (1, 28, 28), 10)
    with pytest.raises(DataError, match="trigger was made for 1x28x28"):
        attack.triggered_test(make_synthetic(20, (3, 32, 32)))
