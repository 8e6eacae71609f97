"""The `authors` preset against the `paper` preset on one small model (CPU): what the authors' code
does differently from what the paper says, measured.

One BadNets-backdoored 1/8-width network (default: the authors' own resnet18_DBD,
``bcu-authors:resnet18``) is trained on Fashion-MNIST images, then cleansed twice from the same
teacher with the same unlabeled images, seeds and epochs: once with ``preset("paper")`` and once
with ``preset("authors")``. The epochs are cut (``--epochs``) to fit a CPU; every other setting is
the preset's. Writes one JSON file::

    python benchmarks/authors_vs_paper.py --out docs/results/authors-vs-paper-fmnist.json

Labels are used to train the backdoored teacher and to score the results, never by the cleanse.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict as to_dict
from pathlib import Path

import torch

from bcu.attacks import create_attack
from bcu.data import AugmentConfig, load_dataset
from bcu.defenses.bcu import Cleanser, preset
from bcu.metrics import attack_scores
from bcu.models import create_model
from bcu.train import OptimConfig
from bcu import seeding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="bcu-authors:resnet18")
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--train-images", type=int, default=4000, help="labelled images the attacker trains on")
    ap.add_argument("--unlabeled", type=int, default=2000, help="unlabeled images of the cleanse (disjoint)")
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--attack-epochs", type=int, default=10)
    ap.add_argument("--poison-rate", type=float, default=0.2)
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20, help="cleanse epochs (both presets; theirs: 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    full = load_dataset("fashion-mnist", split="train", labels=True)
    test = load_dataset("fashion-mnist", split="test", labels=True)
    g = seeding.generator(args.seed)
    perm = torch.randperm(len(full), generator=g)
    train = full.subset(perm[:args.train_images], "fashion-mnist:train")
    unlabeled = full.subset(perm[args.train_images:args.train_images + args.unlabeled], "fashion-mnist:train")
    test = test.subset(torch.arange(args.test_images), "fashion-mnist:test")
    attack = create_attack("badnets", {"target": 0, "poison_rate": args.poison_rate,
                                        "patch_size": args.patch_size, "seed": args.seed}, train.shape, 10)
    seeding.manual_seed(args.seed)
    model = create_model(args.arch, 10, train.shape, mean=(0.2860,), std=(0.3530,), width=args.width)
    optim = OptimConfig(epochs=args.attack_epochs, batch_size=128, lr=0.05)
    attack.train(model, train, optim, augment_cfg=AugmentConfig(crop_pad=2, hflip=False), seed=args.seed,
                 progress=False)
    model.eval()
    teacher = attack_scores(model, test, attack).as_dict()
    print("teacher", teacher, f"{time.time() - t0:.0f}s", flush=True)
    runs = {}
    for name in ("paper", "authors"):
        cfg = preset(name, {"optim": {"epochs": args.epochs}, "seed": args.seed})
        t = time.time()
        res = Cleanser(cfg).run(model, unlabeled.without_labels() if hasattr(unlabeled, "without_labels")
                                else unlabeled, progress=False)
        scores = attack_scores(res.model, test, attack).as_dict()
        reinit = {}
        for layer in res.info["layers"]:
            reinit.setdefault(layer["stage"], {"ratio": layer["ratio"], "params": 0, "dropped": 0})
            reinit[layer["stage"]]["params"] += layer["params"]
            reinit[layer["stage"]]["dropped"] += layer["dropped"]
        runs[name] = {**{k: round(v, 2) for k, v in scores.items() if isinstance(v, float)},
                      "hflip": res.info["hflip"], "seconds": round(time.time() - t, 1),
                      "reinit_by_stage": reinit, "config": to_dict(cfg)}
        print(name, {k: runs[name][k] for k in ("acc", "asr", "ra", "hflip", "seconds")}, flush=True)
    out = {
        "what": "paper vs authors preset, same BadNets teacher, same unlabeled images and seeds",
        "command": "python " + " ".join(sys.argv),
        "arch": args.arch, "width": args.width, "data": "fashion-mnist", "train_images": args.train_images,
        "unlabeled_images": args.unlabeled, "test_images": args.test_images, "attack": attack.describe(),
        "attack_epochs": args.attack_epochs, "cleanse_epochs": args.epochs, "seed": args.seed,
        "teacher": {k: round(v, 2) for k, v in teacher.items() if isinstance(v, float)},
        "runs": runs, "difference_authors_minus_paper": {
            k: round(runs["authors"][k] - runs["paper"][k], 2) for k in ("acc", "asr", "ra")},
        "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
