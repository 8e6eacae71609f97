"""``bcu demo``: the embedded default, end to end.

Train a BadNets-backdoored small CNN on Fashion-MNIST, hold out 5,000 training images as the
*unlabeled* set, cleanse with bcu, and print ACC/ASR/RA before and after.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, Optional

from .attacks import create_attack
from .checkpoint import save_model, sha256_file
from .data.augment import AugmentConfig
from .data.imageset import split, take
from .data.load import load_dataset
from .defenses import Cleanser, preset
from .errors import clean
from .metrics import attack_scores, der
from .output import OutputDir, atomic_write_json
from .report import scores_table, write_cleanse_report, write_model_card
from .train import OptimConfig
from .workflows import cleanse_report, command_inputs, save_backdoored, train_backdoored

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
    attack = create_attack("badnets", {**DEMO_ATTACK, "seed": seed}, train_all.shape, train_all.num_classes or 10)
    attack_optim = OptimConfig(epochs=attack_epochs, batch_size=128, lr=0.05)
    cfg = preset(preset_name, {"seed": seed, **({"optim": {"epochs": cleanse_epochs}} if cleanse_epochs else {})})
    print(f"bcu demo: {len(rest)} training images ({clean(data)}), {len(unlabeled)} held out as unlabeled, "
          f"{len(test)} test images; model {DEMO_ARCH}; attack badnets (target {DEMO_ATTACK['target']}, "
          f"{DEMO_ATTACK['poison_rate']:.0%} poisoned)", flush=True)
    with OutputDir(out, overwrite=overwrite, inputs=command_inputs(data), kind="demo") as o:
        done = train_backdoored(rest, attack, DEMO_ARCH, attack_optim, AugmentConfig(), seed=seed, device=device,
                                progress=progress)
        model = done.model
        (o.path / "suspicious").mkdir()
        save_backdoored(o.path / "suspicious", model, attack, {"attack": "badnets"})
        trig = attack.triggered_test(test)
        before = attack_scores(model, test, attack, device, triggered=trig)
        print(f"  attack trained in {done.seconds:.1f}s: ACC {before.acc:.2f}  ASR {before.asr:.2f}", flush=True)

        t0 = time.time()
        result = Cleanser(cfg).run(model, unlabeled.without_labels(), device=device, progress=progress)
        t_cleanse = time.time() - t0
        (o.path / "cleansed").mkdir()
        sidecar = save_model(result.model.cpu(), o.path / "cleansed", extra={"cleansed_by": "bcu"})
        after = attack_scores(result.model, test, attack, device, triggered=trig)
        scores = {"teacher": before.as_dict(), "cleansed": after.as_dict()}
        metrics = {
            **scores,
            "seconds": {"attack": done.seconds, "cleanse": t_cleanse},
            "config": {"data": data, "arch": DEMO_ARCH, "seed": seed, "train_images": len(rest),
                       "unlabeled_images": len(unlabeled),
                       "attack": {"name": "badnets", **dataclasses.asdict(attack.config)},
                       "attack_optim": dataclasses.asdict(attack_optim), "preset": preset_name,
                       "cleanse": dataclasses.asdict(cfg)},
        }
        atomic_write_json(o.path / "metrics.json", metrics)
        report = cleanse_report(command="bcu demo", model="suspicious/",
                                model_sha256=sha256_file(o.path / "suspicious" / "model.safetensors"), data=data,
                                images=len(unlabeled), data_sha256=unlabeled.fingerprint(),
                                output_sha256=sidecar["sha256"], scores=scores, der_value=der(before, after),
                                result=result)
        report["model"] = dataclasses.asdict(result.model.spec) | {"format": "bcu"}
        write_cleanse_report(o.path, report, result.history)
        write_model_card(o.path / "cleansed", report)
        final = o.commit()
    print(f"  cleansed in {t_cleanse:.1f}s ({result.info['epochs_run']} epochs on unlabeled images)\n")
    print(scores_table({"backdoored (teacher)": metrics["teacher"], "cleansed (bcu)": metrics["cleansed"]}))
    print(f"\nwritten to {clean(final)}/ (metrics.json, report.md, curves.png, suspicious/, cleansed/)")
    return metrics
