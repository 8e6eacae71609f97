"""Baseline defenses: each runs end to end on a tiny backdoored synthetic model, leaves its input
untouched, returns the same architecture, and passes a check specific to the method."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bcu.attacks import create_attack
from bcu.data import make_synthetic
from bcu.defenses import DEFENSES, create_defense, run_defense
from bcu.errors import DataError
from bcu.metrics import attack_scores
from bcu.models import create_model
from bcu.train import OptimConfig

BASELINES = ["ft", "fp", "nad", "anp", "ibau", "mcr", "clp"]
QUICK = {
    "ft": {"optim": {"epochs": 1, "batch_size": 64}},
    "fp": {"optim": {"epochs": 1, "batch_size": 64}},
    "nad": {"teacher": {"epochs": 1, "lr": 0.01}, "optim": {"epochs": 2, "lr": 0.01}},
    "anp": {"iterations": 6, "batch_size": 64, "threshold": 0.99},  # 6 steps move the masks little: prune those that moved
    "ibau": {"rounds": 1, "batch_size": 64},
    "mcr": {"endpoint": {"epochs": 1}, "optim": {"epochs": 1}},
    "clp": {},
}


@pytest.fixture(scope="module")
def backdoored():
    """A cnn-small with a BadNets backdoor on a 16x16 synthetic task, plus clean labelled images."""
    torch.manual_seed(0)
    shape = (1, 16, 16)
    train = make_synthetic(600, shape, 10, seed=0)
    test = make_synthetic(200, shape, 10, seed=1)
    clean = make_synthetic(256, shape, 10, seed=2)
    attack = create_attack("badnets", {"target": 0, "poison_rate": 0.1}, shape, 10)
    model = create_model("cnn-small", 10, shape, mean=(0.5,), std=(0.25,))
    attack.train(model, train, OptimConfig(epochs=4, batch_size=32, lr=0.05), augment_cfg=None, seed=0)
    model.eval()
    return model, clean, test, attack


def _state(m: nn.Module):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_end_to_end(name, backdoored):
    model, clean, test, attack = backdoored
    before = _state(model)
    defense = create_defense(name, QUICK[name])
    result = run_defense(defense, model, clean, seed=0, progress=False)
    out = result.model
    assert out is not model
    assert type(out) is type(model)
    assert [k for k in out.state_dict()] == [k for k in model.state_dict()]
    assert all(out.state_dict()[k].shape == v.shape for k, v in before.items())
    for k, v in model.state_dict().items():  # the input model is unchanged
        assert torch.equal(v, before[k]), f"{name} modified the input model's {k}"
    after = out.state_dict()  # the method did something: a defense that returns its input fails here
    assert any(not torch.equal(after[k], v) for k, v in before.items() if v.is_floating_point()), \
        f"{name} returned the model unchanged"
    s = attack_scores(out, test, attack)
    assert 0 <= s.acc <= 100 and 0 <= s.asr <= 100


@pytest.mark.parametrize("name", [n for n in BASELINES if DEFENSES.get(n).uses_labels])
def test_label_using_defenses_refuse_unlabeled(name, backdoored):
    model, clean, _, _ = backdoored
    defense = create_defense(name, QUICK[name])
    with pytest.raises(DataError):
        run_defense(defense, model, clean.without_labels())
    with pytest.raises(DataError):
        defense.run(model, clean.without_labels())


def test_fp_prunes_last_conv(backdoored):
    from bcu.defenses.fp import last_conv

    model, clean, _, _ = backdoored
    pair = last_conv(model, (1, 16, 16))
    assert pair.conv == "net.features.8" and pair.norm == "net.features.9"  # found by tracing
    res = run_defense(create_defense("fp", {"acc_drop": 100.0, "max_ratio": 0.5, "optim": {"epochs": 1}}), model, clean)
    pruned = res.info["pruned"]
    assert len(pruned) == 32  # all that max_ratio allows when any accuracy drop is accepted
    mods = dict(res.model.named_modules())
    w, g = mods[pair.conv].weight, mods[pair.norm].weight
    assert torch.all(w[pruned] == 0) and torch.all(g[pruned] == 0)  # zero after fine-tuning too
    keep = [i for i in range(64) if i not in pruned]
    assert w[keep].abs().sum() > 0
    # the paper's rule: with no accuracy drop allowed, pruning stops at the first accuracy loss
    strict = run_defense(create_defense("fp", {"acc_drop": 0.0, "finetune": False}), model, clean)
    for row in strict.info["search"][1:-1]:
        assert row["acc"] >= strict.info["acc_unpruned"]


class OddNet(nn.Module):
    """Conv/BN pairs with unusual names, out of definition order, and a conv with no BN."""

    def __init__(self):
        super().__init__()
        self.zeta = nn.BatchNorm2d(8)      # consumes alpha's output
        self.alpha = nn.Conv2d(1, 8, 3, padding=1)
        self.omega = nn.Conv2d(8, 32, 3, padding=1)  # >= 11 channels: a single outlier can pass u = 3
        self.kappa = nn.BatchNorm2d(32)    # consumes omega's output
        self.lonely = nn.Conv2d(32, 4, 1)  # no norm after it
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.zeta(self.alpha(x)))
        x = torch.relu(self.kappa(self.omega(x)))
        x = torch.relu(self.lonely(x))
        return self.fc(x.flatten(1))


def test_clp_pairs_by_tracing_and_prunes_planted_channel():
    from bcu.defenses.tracing import pair_conv_norm

    torch.manual_seed(0)
    net = OddNet().eval()
    pairs = {p.conv: p.norm for p in pair_conv_norm(net, (1, 8, 8))}
    assert pairs == {"alpha": "zeta", "omega": "kappa", "lonely": None}
    with torch.no_grad():
        net.omega.weight[5] *= 50.0  # a channel with a huge Lipschitz upper bound
    before = _state(net)
    res = run_defense(create_defense("clp", {"input_shape": [1, 8, 8]}), net, None)
    pruned = {l["conv"]: l["pruned"] for l in res.info["layers"]}
    assert pruned["omega"] == [5]
    out = res.model
    assert out.kappa.weight[5] == 0 and out.kappa.bias[5] == 0
    assert torch.count_nonzero(out.kappa.weight) == 31
    assert torch.equal(net.kappa.weight, before["kappa.weight"])  # input untouched


def test_anp_masks_in_unit_interval_and_threshold_prunes(backdoored):
    model, clean, _, _ = backdoored
    res = run_defense(create_defense("anp", {"iterations": 10, "batch_size": 64, "threshold": 0.2}), model, clean)
    masks = res.info["masks"]
    allm = torch.cat([torch.tensor(v) for v in masks.values()])
    assert allm.min() >= 0 and allm.max() <= 1
    assert allm.min() < 1  # the masks moved
    mods = dict(res.model.named_modules())
    expect = 0
    for name, vals in masks.items():
        v = torch.tensor(vals)
        low = torch.nonzero(v < 0.2).flatten()
        expect += len(low)
        assert torch.all(mods[name].weight[low] == 0)
    assert res.info["pruned_neurons"] == expect
    # a threshold above every mask prunes every neuron
    everything = run_defense(create_defense("anp", {"iterations": 2, "batch_size": 64, "threshold": 1.0}),
                             model, clean)
    assert everything.info["pruned_neurons"] > 0
    assert everything.info["pruned_neurons"] == sum(
        sum(1 for x in vals if x < 1.0) for vals in everything.info["masks"].values())


def test_mcr_curve_endpoints_are_the_endpoints(backdoored):
    from bcu.defenses.mcr import BezierCurve

    model, _, _, _ = backdoored
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    w0 = {k: v.detach() for k, v in model.named_parameters()}
    w1 = {k: v.detach() for k, v in other.named_parameters()}
    curve = BezierCurve(copy.deepcopy(model), w0, w1)
    with torch.no_grad():
        for p in curve.control.parameters():
            p.add_(1.0)  # a control point away from the chord
    at0, at1, mid = curve.params_at(0.0), curve.params_at(1.0), curve.params_at(0.5)
    for k in w0:
        assert torch.equal(at0[k], w0[k]) and torch.equal(at1[k], w1[k])
    assert not torch.allclose(mid[next(iter(w0))], (w0[next(iter(w0))] + w1[next(iter(w0))]) / 2)


def test_nad_attention_loss_decreases(backdoored):
    from bcu.defenses.tracing import stage_outputs

    model, clean, _, _ = backdoored
    stages = stage_outputs(model, (1, 16, 16))
    assert [s[2][2] for s in stages] == [16, 8, 4, 2]  # one output per resolution, shallow first
    res = run_defense(create_defense("nad", {"teacher": {"epochs": 2, "lr": 0.05},
                                             "optim": {"epochs": 4, "lr": 0.01}}), model, clean)
    at = [row["at"] for row in res.history]
    assert at[-1] < at[0]
    assert len(res.info["stages"]) == 3


def test_ibau_hypergradient_matches_explicit_jacobians():
    """The surrogate's gradient equals the implicit hypergradient computed by hand on a tiny model."""
    from bcu.defenses.ibau import IBAUConfig, IBAUObjective
    from bcu.train import Step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(6, 1, 2, 2)
    y = torch.randint(0, 3, (6,))
    cfg = IBAUConfig(K=5, portion=1.0, inner_lr=0.1)
    pert = torch.randn(1, 1, 2, 2) * 0.1
    obj = IBAUObjective(cfg, pert)
    loss, _ = obj(model, x, y, Step(0, 1, torch.Generator().manual_seed(0)))
    model.zero_grad()
    loss.backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    # by hand: v = sum_{k<K} (J^T)^k g (the K-step fixed-point / Neumann approximation of
    # (I - J^T)^-1 g, J = dT/dd), hypergrad = dLout/dth + (dT/dth)^T v
    params = list(model.parameters())
    d = pert.clone().requires_grad_(True)
    out = nn.functional.cross_entropy(model(x + d), y)
    g_d = torch.autograd.grad(out, d, retain_graph=True)[0].flatten()
    g_th = torch.cat([g.flatten() for g in torch.autograd.grad(out, params)])
    inner = -nn.functional.cross_entropy(model(x + d), y) + cfg.reg * d.pow(2).sum()
    gi = torch.autograd.grad(inner, d, create_graph=True)[0]
    T = (d - cfg.inner_lr * gi).flatten()
    J = torch.stack([torch.autograd.grad(T[i], d, retain_graph=True)[0].flatten() for i in range(4)])
    v = sum(torch.linalg.matrix_power(J.T, k) @ g_d for k in range(cfg.K))
    vt = torch.autograd.grad(T, params, grad_outputs=v)
    want = g_th + torch.cat([g.flatten() for g in vt])
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-3)
