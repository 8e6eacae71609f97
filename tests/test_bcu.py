"""BCU itself: label-freedom, the distillation objective, and the API on any nn.Module."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcu
from bcu.attacks import create_attack
from bcu.data import make_synthetic, split
from bcu.defenses import DEFENSES, create_defense, run_defense
from bcu.defenses.bcu import Cleanser, DistillObjective, DistillConfig, as_unlabeled, preset
from bcu.errors import DataError
from bcu.metrics import agreement, attack_scores
from bcu.models import create_model
from bcu.train import OptimConfig, Step, fit, cross_entropy_objective


class Boom:
    """Any use of this object as labels raises: proof that nothing reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"labels were read ({name})")

    def __len__(self):
        raise AssertionError("labels were read (len)")

    def __getitem__(self, i):
        raise AssertionError("labels were read (getitem)")


def tiny_config(epochs=2, **over):
    return preset("paper", {"optim": {"epochs": epochs, "batch_size": 64}, **over})


def test_cleanse_never_reads_labels_of_an_imageset():
    ds = make_synthetic(200)
    ds.labels = Boom()  # replaced after construction: any read raises
    model = create_model("cnn-small")
    res = Cleanser(tiny_config()).run(model, ds)
    assert res.history and res.info["epochs_run"] == 2


def test_cleanse_accepts_a_dataset_that_yields_images_only():
    imgs = make_synthetic(150).images

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(imgs)

        def __getitem__(self, i):
            return imgs[i]

        @property
        def targets(self):
            raise AssertionError("labels were read")

    model = create_model("cnn-small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = bcu.cleanse(model, Images(), tiny_config(1))
    assert isinstance(out, nn.Module) and out is not model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is untouched
    assert any(not torch.equal(v, before[k]) for k, v in out.state_dict().items() if v.is_floating_point())


def test_distillation_objective_refuses_labels_and_matches_kl():
    t = create_model("cnn-small").eval()
    s = create_model("cnn-small")
    obj = DistillObjective(t, DistillConfig(t_squared=False, mixup_alpha=0.0, noise_blend=0.0, warp=0.0))
    x = torch.rand(8, 1, 28, 28)
    step = Step(epoch=1, epochs=4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        obj(s, x, torch.zeros(8, dtype=torch.long), step)
    loss, metrics = obj(s, x, None, step)
    T = 1 + 3 * 2 / 4
    p_t = F.softmax(t(x) / T, 1)
    want = (p_t * (p_t.log() - F.log_softmax(s(x) / T, 1))).sum(1).mean()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-4) and metrics["T"] == T
    plain_t2 = DistillConfig(t_squared=True, mixup_alpha=0.0, noise_blend=0.0, warp=0.0)
    scaled, _ = DistillObjective(t, plain_t2)(s, x, None, step)
    assert float(scaled.detach()) == pytest.approx(T * T * float(want.detach()), rel=1e-4)


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(784, 10)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.lin(x.flatten(1))


def test_noise_blend_reaches_the_student_only():
    t, s = Recorder().eval(), Recorder()
    x = torch.rand(8, 1, 28, 28)
    step = Step(epoch=0, epochs=4, generator=torch.Generator().manual_seed(0))
    DistillObjective(t, DistillConfig(noise_blend=0.3, warp=0.0))(s, x, None, step)
    assert torch.equal(t.seen[0], x)  # the teacher labels the clean view
    moved = (s.seen[0] - x).abs().flatten(1).amax(1)
    assert float(moved.min()) > 0 and float(moved.max()) <= 0.3 + 1e-6
    t.seen.clear(), s.seen.clear()
    DistillObjective(t, DistillConfig(noise_blend=0.0, warp=0.0))(s, x, None, step)
    assert torch.equal(s.seen[0], x) and torch.equal(t.seen[0], x)
    with pytest.raises(Exception, match="noise_blend"):
        DistillConfig(noise_blend=1.5)


def test_warp_reaches_the_student_only():
    t, s = Recorder().eval(), Recorder()
    x = torch.rand(8, 1, 28, 28)
    step = Step(epoch=0, epochs=4, generator=torch.Generator().manual_seed(0))
    DistillObjective(t, DistillConfig(noise_blend=0.0, warp=1.0))(s, x, None, step)
    assert torch.equal(t.seen[0], x)
    assert float((s.seen[0] - x).abs().flatten(1).mean(1).min()) > 0
    with pytest.raises(Exception, match="warp"):
        DistillConfig(warp=-1)


def test_run_seed_offsets_the_configured_seeds():
    """A bench cell's seed must change bcu's masks; seed 0 runs the config as written."""
    m = create_model("cnn-small")
    data = make_synthetic(128)
    bcu_ = create_defense("bcu", {"optim": {"epochs": 1, "batch_size": 64}})
    r0 = run_defense(bcu_, m, data, seed=0)
    r0b = Cleanser(bcu_.config).run(m, data.without_labels())
    r1 = run_defense(bcu_, m, data, seed=1)
    assert r0.info["config"]["seed"] == 0 and r1.info["config"]["seed"] == 1
    assert r1.info["config"]["reinit"]["seed"] == bcu_.config.reinit.seed + 1
    w0, w0b, w1 = (r.model.state_dict()["net.classifier.3.weight"] for r in (r0, r0b, r1))
    assert torch.equal(w0, w0b) and not torch.equal(w0, w1)
    assert bcu_.config.seed == 0  # the defense's own config is untouched


def test_distillation_makes_student_agree_with_teacher():
    train, _ = make_synthetic(1500), None
    teacher = create_model("cnn-small")
    fit(teacher, train, cross_entropy_objective, OptimConfig(epochs=2, batch_size=64, lr=0.05), progress=False)
    unl = make_synthetic(600, seed=5)
    cfg = tiny_config(6, reinit={"scale": 4.0, "max_ratio": 0.9})
    student_before = create_model("cnn-small")
    student_before.load_state_dict(teacher.state_dict())
    from bcu.defenses.reinit import reinitialize

    reinitialize(student_before, (1, 28, 28), cfg.reinit)
    res = Cleanser(cfg).run(teacher, unl)
    probe = make_synthetic(300, seed=9).images
    assert agreement(res.model, teacher, probe) > agreement(student_before, teacher, probe) + 10
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_input_model_is_not_modified():
    m = create_model("cnn-small")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    Cleanser(tiny_config(1)).run(m, make_synthetic(128))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_user_module_without_spec_and_float_tensor_input():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4))
    x = torch.rand(130, 3, 16, 16)
    out = bcu.cleanse(net, x, {"optim": {"epochs": 1, "batch_size": 64}})
    assert out(x[:2]).shape == (2, 4) and out is not net


def test_bad_unlabeled_inputs():
    m = create_model("cnn-small")
    with pytest.raises(DataError, match="fewer than one batch"):
        Cleanser(tiny_config()).run(m, make_synthetic(10))
    with pytest.raises(DataError, match="expects 1x28x28"):
        Cleanser(tiny_config()).run(m, make_synthetic(100, (3, 28, 28)))
    with pytest.raises(DataError, match="size"):
        Cleanser(tiny_config()).run(m, make_synthetic(100, (1, 32, 32)))
    with pytest.raises(DataError):
        as_unlabeled(torch.full((4, 1, 5, 5), 3.0))


def test_label_free_stopping_rule_stops_and_reports():
    teacher = create_model("cnn-small")
    cfg = tiny_config(40, stop={"rule": "plateau", "patience": 2, "min_epochs": 2, "monitor_size": 50})
    res = Cleanser(cfg).run(teacher, make_synthetic(300))
    assert res.info["stopped_early"] and res.info["epochs_run"] < 40
    assert res.info["training_images"] == 250  # the watched slice is held out of training
    assert "monitor_agree" in res.history[-1]


def test_registry_variants_and_label_stripping():
    assert {"bcu", "kd", "re"} <= set(DEFENSES.names())
    assert not DEFENSES.get("bcu").uses_labels
    ds = make_synthetic(128)
    ds_labels = ds.labels
    m = create_model("cnn-small")
    kd = create_defense("kd", {"optim": {"epochs": 1, "batch_size": 64}})
    res = run_defense(kd, m, ds)
    assert res.info["layers"] == []
    re_only = create_defense("re")
    res = run_defense(re_only, m, ds)
    assert res.history == [] and res.info["layers"]
    assert ds.labels is ds_labels


@pytest.mark.slow
def test_bcu_removes_a_backdoor_that_plain_kd_keeps(synth):
    """End to end on synthetic data: a BadNets backdoor survives KD but not BCU."""
    data = make_synthetic(4000, seed=0)
    test = make_synthetic(600, seed=1)
    rest, unl = split(data, 1000, seed=0)
    attack = create_attack("badnets", {"target": 0, "poison_rate": 0.1, "patch_size": 4}, (1, 28, 28), 10)
    torch.manual_seed(0)
    model = create_model("cnn-small")
    attack.train(model, rest, OptimConfig(epochs=4, batch_size=64, lr=0.05), augment_cfg=None, progress=False)
    before = attack_scores(model, test, attack)
    assert before.asr > 90 and before.acc > 80
    kd = Cleanser(preset("paper", {"optim": {"epochs": 12, "batch_size": 128}, "reinit": {"scale": 0.0}})).run(
        model, unl).model
    cleansed = Cleanser(preset("default", {"optim": {"epochs": 12, "batch_size": 128}})).run(model, unl).model
    kd_s, bcu_s = attack_scores(kd, test, attack), attack_scores(cleansed, test, attack)
    assert kd_s.asr > 60, kd_s
    assert bcu_s.asr < 20 and bcu_s.acc > before.acc - 15, bcu_s


def test_monitor_restore_replays_the_plateau_counters():
    from bcu.defenses.bcu import Monitor, StopConfig

    cfg = StopConfig(rule="plateau", patience=2, min_epochs=1)
    empty = torch.zeros(0, 1, 28, 28, dtype=torch.uint8)
    live, resumed = Monitor(None, empty, cfg, "cpu"), Monitor(None, empty, cfg, "cpu")
    rows = [(50.0, 1.0), (60.0, 0.8), (60.05, 0.79), (60.0, 0.80)]
    history = []
    for e, (a, k) in enumerate(rows):
        stop = live._update(e, a, k)
        history.append({"epoch": e + 1, "monitor_agree": a, "monitor_kl": k})
    resumed.restore(history)
    assert (live.best, live.best_loss, live.bad) == (resumed.best, resumed.best_loss, resumed.bad)
    assert stop and resumed.bad == 2


def test_cleanse_accepts_a_dataloader_and_a_path(tmp_path):
    """PyTorch habits: a DataLoader of (image, label) batches (labels dropped) or a path."""
    import numpy as np

    from bcu.defenses.bcu import as_unlabeled

    ds = make_synthetic(96, seed=1)
    x = ds.images.float() / 255
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, ds.labels), batch_size=40)
    got = as_unlabeled(loader)
    assert got.labels is None and torch.equal(got.images, ds.images)
    p = tmp_path / "u.npz"
    np.savez(p, x=ds.images.numpy(), y=ds.labels.numpy())
    got = as_unlabeled(p)
    assert got.labels is None and torch.equal(got.images, ds.images)
    out = bcu.cleanse(create_model("cnn-small"), loader, tiny_config(1, optim={"epochs": 1, "batch_size": 32}))
    assert isinstance(out, nn.Module) and not out.training
    with pytest.raises(DataError):
        as_unlabeled(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0]), batch_size=4))
