"""Evidence for the attack suite: every attack trained on Fashion-MNIST with cnn-small.

The recipe is the demo's (``bcu demo`` / ``bcu attack``): hold out 5,000 training images with
``bcu.data.split(train, 5000, seed)``, train on the rest with ``OptimConfig(epochs=5,
batch_size=128, lr=0.05)`` and ``AugmentConfig()`` (crop + flip), target class 0, every attack's
own default poison rate (0.1; 0.05 for the clean-label SIG and LC, half of the target class) and
options at their defaults unless ``--poison-rate`` or ``--set`` say otherwise. A clean model is trained
the same way for each seed. Prints one JSON object per (attack, seed) and merges the rows into
``--out`` (a row with the same attack, seed and command is replaced)::

    flock /tmp/bcu-heavy.lock env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/attacks.py \\
        --attacks badnets,blended,sig,lc,wanet,inputaware --seeds 0 --out docs/results/attacks-fmnist.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from bcu.attacks import ATTACKS, create_attack
from bcu.config import parse_overrides
from bcu.data import AugmentConfig, load_dataset, split
from bcu.metrics import accuracy, attack_scores
from bcu.models import create_model
from bcu.train import OptimConfig, cross_entropy_objective, fit

ARCH = "cnn-small"
HOLDOUT = 5000


def new_model(rest, seed: int):
    pix = rest.images.float() / 255
    mean = tuple(float(v) for v in pix.mean((0, 2, 3)))
    std = tuple(float(v) for v in pix.std((0, 2, 3)))
    torch.manual_seed(seed)
    return create_model(ARCH, rest.num_classes or 10, rest.shape, mean=mean, std=std, classes=rest.classes)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attacks", default=",".join(ATTACKS.names()))
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--poison-rate", type=float, default=None, help="every attack's rate (default: its own)")
    p.add_argument("--set", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="an attack option, e.g. --set inputaware.mask_epochs=2")
    p.add_argument("--no-augment", action="store_true",
                   help="train the clean and the backdoored models without crop + flip (Turner et al.'s released "
                        "config trains without augmentation)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--table", type=Path, help="print the rows of this results file as a Markdown table and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    for n in names:
        ATTACKS.get(n)
    overrides: Dict[str, Dict[str, Any]] = parse_overrides(args.set)
    train_all = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    optim = OptimConfig(epochs=args.epochs, batch_size=128, lr=0.05)
    augment = None if args.no_augment else AugmentConfig()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rest, _ = split(train_all, HOLDOUT, seed=seed)
        t0 = time.time()
        clean = new_model(rest, seed)
        fit(clean, rest, cross_entropy_objective, optim, augment_cfg=augment, seed=seed, progress=False)
        clean_acc = accuracy(clean, test)
        print(json.dumps({"clean_model": True, "seed": seed, "acc": clean_acc, "seconds": time.time() - t0}),
              flush=True)
        for name in names:
            opts = {"target": 0, "seed": seed, **overrides.get(name, {})}
            if args.poison_rate is not None:
                opts.setdefault("poison_rate", args.poison_rate)
            attack = create_attack(name, opts, rest.shape, rest.num_classes or 10)
            model = new_model(rest, seed)
            t0 = time.time()
            attack.train(model, rest, optim, augment_cfg=augment, seed=seed, progress=False)
            seconds = time.time() - t0
            s = attack_scores(model, test, attack)
            sets = [f"--set {shlex.quote(f'{name}.{k}={v}')}" for k, v in overrides.get(name, {}).items()]
            cmd = ("flock /tmp/bcu-heavy.lock env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/attacks.py "
                   f"--attacks {name} --seeds {seed} --epochs {args.epochs} "
                   + (f"--poison-rate {args.poison_rate} " if args.poison_rate is not None else "")
                   + ("--no-augment " if args.no_augment else "")
                   + " ".join(sets)).strip()
            row = {"attack": name, "clean_acc": round(clean_acc, 2), "acc": round(s.acc, 2), "asr": round(s.asr, 2),
                   "ra": round(s.ra, 2), "poison_rate": attack.config.poison_rate, "seconds": round(seconds, 1),
                   "seed": seed,
                   "kind": attack.kind, "epochs": args.epochs, "augment": not args.no_augment,
                   "config": dataclasses.asdict(attack.config), "command": cmd,
                   "asr_by_class": {k: round(v, 2) for k, v in s.asr_by_class.items()}}
            if attack.kind == "clean-label":
                row["poisoned_images"] = int(len(attack.poison_indices(rest)))
                # clean-label attacks teach "target class = trigger": clean target images can suffer
                target_test = test.subset(torch.nonzero(test.labels == attack.config.target).flatten())
                row["target_class_acc"] = round(accuracy(model, target_test), 2)
                row["clean_target_class_acc"] = round(accuracy(clean, target_test), 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.out:
                merge(args.out, [row])
    return 0


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| attack | epochs | seed | clean ACC | ACC | ASR | RA | poison rate | seconds | command |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attack']} | {r.get('epochs', 5)} | {r['seed']} | {r['clean_acc']:.2f} | {r['acc']:.2f} | "
                     f"{r['asr']:.2f} | "
                     f"{r['ra']:.2f} | {r['poison_rate']} | {r['seconds']:.0f} | `{r['command']}` |")
    return "\n".join(lines)


def merge(path: Path, rows: List[Dict[str, Any]]) -> None:
    old = json.loads(path.read_text()) if path.is_file() else []
    keys = {(r["attack"], r["seed"], r["command"]) for r in rows}  # the same run again replaces its row
    order = {n: i for i, n in enumerate(["badnets", "blended", "sig", "lc", "wanet", "inputaware"])}
    out = [r for r in old if (r["attack"], r["seed"], r["command"]) not in keys] + rows
    out.sort(key=lambda r: (order.get(r["attack"], 99), r["attack"], r.get("epochs", 5), r["seed"], r["command"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
