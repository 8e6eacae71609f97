"""``bcu demo``: the embedded default, end to end.

Train a BadNets-backdoored small CNN on Fashion-MNIST, hold out 5,000 training images as the
*unlabeled* set, cleanse with bcu, and print ACC/ASR/RA before and after.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .attacks import create_attack
from .checkpoint import OutputDir, atomic_write_json, save_model
from .config import to_dict
from .data import AugmentConfig, load_dataset, split, take
from .defenses.bcu import Cleanser, preset
from .errors import clean
from .metrics import attack_scores
from .models import create_model
from .report import scores_table, write_cleanse_report
from .train import OptimConfig
from . import seeding

DEMO_ARCH = "cnn-small"
DEMO_ATTACK = {"target": 0, "poison_rate": 0.1}


def run_demo(out: Path = Path("runs/demo"), overwrite: bool = False, attack_epochs: int = 5,
             cleanse_epochs: Optional[int] = None, preset_name: str = "default", seed: int = 0,
             data: str = "fashion-mnist", n_train: Optional[int] = None, n_unlabeled: int = 5000,
             progress: Optional[bool] = None, device: str = "cpu") -> Dict[str, Any]:
    """Run the demo; returns the metrics written to ``out/metrics.json``."""
    train_all = load_dataset(data, "train")
    test = load_dataset(data, "test")
    rest, unlabeled = split(train_all, min(n_unlabeled, len(train_all) // 2), seed=seed)
    if n_train:
        rest = take(rest, n_train, seed=seed)
    k = train_all.num_classes or 10
    attack = create_attack("badnets", {**DEMO_ATTACK, "seed": seed}, train_all.shape, k)
    pix = rest.images.float() / 255
    mean = tuple(float(v) for v in pix.mean((0, 2, 3)))
    std = tuple(float(v) for v in pix.std((0, 2, 3)))
    del pix
    seeding.manual_seed(seed)
    model = create_model(DEMO_ARCH, k, train_all.shape, mean=mean, std=std, classes=train_all.classes)
    attack_optim = OptimConfig(epochs=attack_epochs, batch_size=128, lr=0.05)
    cfg = preset(preset_name, {"seed": seed, **({"optim": {"epochs": cleanse_epochs}} if cleanse_epochs else {})})
    print(f"bcu demo: {len(rest)} training images ({clean(data)}), {len(unlabeled)} held out as unlabeled, "
          f"{len(test)} test images; model {DEMO_ARCH}; attack badnets (target {DEMO_ATTACK['target']}, "
          f"{DEMO_ATTACK['poison_rate']:.0%} poisoned)", flush=True)
    from .cli import _inputs

    with OutputDir(out, overwrite=overwrite, inputs=_inputs(data), kind="demo") as o:
        t0 = time.time()
        attack.train(model, rest, attack_optim, augment_cfg=AugmentConfig(), seed=seed, device=device,
                     progress=progress)
        t_attack = time.time() - t0
        (o.path / "suspicious").mkdir()
        save_model(model.cpu(), o.path / "suspicious", extra={"attack": "badnets"})
        attack.save(o.path / "suspicious")
        trig = attack.triggered_test(test)
        before = attack_scores(model, test, attack, device, triggered=trig)
        print(f"  attack trained in {t_attack:.1f}s: ACC {before.acc:.2f}  ASR {before.asr:.2f}", flush=True)

        t0 = time.time()
        result = Cleanser(cfg).run(model, unlabeled.without_labels(), device=device, progress=progress)
        t_cleanse = time.time() - t0
        (o.path / "cleansed").mkdir()
        sidecar = save_model(result.model.cpu(), o.path / "cleansed", extra={"cleansed_by": "bcu"})
        after = attack_scores(result.model, test, attack, device, triggered=trig)
        metrics = {
            "teacher": before.as_dict(),
            "cleansed": after.as_dict(),
            "seconds": {"attack": t_attack, "cleanse": t_cleanse},
            "config": {"data": data, "arch": DEMO_ARCH, "seed": seed, "train_images": len(rest),
                       "unlabeled_images": len(unlabeled), "attack": {"name": "badnets", **to_dict(attack.config)},
                       "attack_optim": to_dict(attack_optim), "preset": preset_name, "cleanse": to_dict(cfg)},
        }
        atomic_write_json(o.path / "metrics.json", metrics)
        from .metrics import der

        report = {"command": "bcu demo", "input": {"model": "suspicious/", "sha256": "", "data": data,
                                                    "images": len(unlabeled),
                                                    "data_sha256": unlabeled.fingerprint(), "labels_read": False},
                  "output": {"sha256": sidecar["sha256"]},
                  "scores": {"teacher": before.as_dict(), "cleansed": after.as_dict()},
                  "der": der(before, after), **result.info, "history": result.history}
        from .checkpoint import sha256_file

        report["input"]["sha256"] = sha256_file(o.path / "suspicious" / "model.safetensors")
        write_cleanse_report(o.path, report, result.history)
        final = o.commit()
    print(f"  cleansed in {t_cleanse:.1f}s ({result.info['epochs_run']} epochs on unlabeled images)\n")
    print(scores_table({"backdoored (teacher)": metrics["teacher"], "cleansed (bcu)": metrics["cleansed"]}))
    print(f"\nwritten to {clean(final)}/ (metrics.json, report.md, curves.png, suspicious/, cleansed/)")
    return metrics
