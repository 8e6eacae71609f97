"""How often the label-free scan (bcu.scan) flags the attacker's target class, before and after a
cleanse, and how often it raises a false alarm on a clean model.

    python benchmarks/scan_rates.py --teachers runs/generalize-dev/teachers --archs cnn-small --seeds 0 \
        [--cleanse] [--clean-models 2] [--json docs/results/scan-fmnist.json]

For every backdoored teacher of a bench run (``<arch>__<attack>__s<seed>``: model + attack.json) the
scan runs on 512 of the bench's unlabeled held-out images (the Fashion-MNIST training images the
attacker never saw, held out exactly as `bcu bench` holds them out for the first seed); with
``--cleanse`` the teacher is also cleansed with bcu's default on those images and the cleansed model
scanned. ``--clean-models N`` trains N clean models of the first architecture (5 epochs, as the
teachers) and scans them: a flag there is a false alarm. One JSON row per scanned model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bcu.attacks import load_attack
from bcu.bench import load_config
from bcu.checkpoint import load_model
from bcu.data import load_dataset, pixel_stats, split, take
from bcu.defenses.bcu import Cleanser, preset
from bcu.models import create_model
from bcu.output import atomic_write_json
from bcu.scan import ScanConfig, scan
from bcu.train import OptimConfig, cross_entropy_objective, fit


def row(kind, arch, attack, seed, target, res, extra=None):
    flagged = res.flagged
    return {"model": kind, "arch": arch, "attack": attack, "seed": seed, "target": target,
            "flagged": flagged, "suspect": res.suspect,
            "hit": (flagged == target) if target is not None else None,
            "false_alarm": (flagged is not None and flagged != target),
            "suspect_ratio": res.classes[res.suspect].ratio if res.suspect is not None else None,
            "seconds": round(res.seconds, 1), **(extra or {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/generalize-dev.yaml", help="the bench config of the teachers")
    ap.add_argument("--teachers", default="runs/generalize-dev/teachers")
    ap.add_argument("--archs", default="cnn-small")
    ap.add_argument("--attacks", default=None, help="default: every attack of the config")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--cleanse", action="store_true", help="also cleanse each teacher (bcu default) and scan it")
    ap.add_argument("--clean-models", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    seed0 = int(args.seeds.split(",")[0])
    train, holdout = split(load_dataset(cfg.data, split="train", labels=True), cfg.holdout, seed=seed0)  # as bcu bench
    if cfg.n_train:
        train = take(train, cfg.n_train, seed=seed0)
    unl = holdout.without_labels()
    scan_images = take(unl, 512, seed=0).images
    scfg = ScanConfig()
    rows = []
    command = "python " + " ".join(["benchmarks/scan_rates.py"] + (argv if argv is not None else sys.argv[1:]))
    attacks = args.attacks.split(",") if args.attacks else cfg.attacks
    for arch in args.archs.split(","):
        for attack in attacks:
            for seed in map(int, args.seeds.split(",")):
                d = Path(args.teachers) / f"{arch}__{attack}__s{seed}"
                if not (d / "model.json").is_file():
                    print(f"skip {d}: no teacher", file=sys.stderr)
                    continue
                model, _ = load_model(d)
                atk = load_attack(d).config
                target = int(atk.target) if atk.mode == "all-to-one" else None
                rows.append(row("teacher", arch, attack, seed, target, scan(model, scan_images, scfg)))
                print(json.dumps(rows[-1]), flush=True)
                if args.cleanse:
                    t0 = time.time()
                    cleansed = Cleanser(preset("default")).run(model, unl).model
                    rows.append(row("cleansed", arch, attack, seed, target, scan(cleansed, scan_images, scfg),
                                    {"cleanse_seconds": round(time.time() - t0, 1)}))
                    print(json.dumps(rows[-1]), flush=True)
    arch = args.archs.split(",")[0]
    mean, std = pixel_stats(train.images)
    for k in range(args.clean_models):
        torch.manual_seed(k)
        model = create_model(arch, 10, tuple(train.shape), mean=mean, std=std, **dict(cfg.archs[arch].options))
        fit(model, train, cross_entropy_objective, OptimConfig(epochs=5, batch_size=128, lr=0.05), seed=k,
            progress=False)
        model.eval()
        rows.append(row("clean", arch, None, k, None, scan(model, scan_images, scfg)))
        print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["command"] = command
    if args.json:
        atomic_write_json(Path(args.json), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
