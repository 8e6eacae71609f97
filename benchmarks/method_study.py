"""The method study behind bcu's defaults (docs/method.md).

Trains one BadNets-backdoored teacher on Fashion-MNIST (the demo's setting), then cleanses it
with each named variant and prints one JSON object per variant (ACC/ASR/RA after, seconds).

    python benchmarks/method_study.py --variants paper,paper-x4 --out docs/results/method-study.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from bcu.attacks import create_attack
from bcu.checkpoint import load_model, save_model
from bcu.config import deep_merge
from bcu.data import AugmentConfig, load_dataset, split, take
from bcu.defenses.bcu import Cleanser, preset
from bcu.metrics import attack_scores
from bcu.models import create_model
from bcu.train import OptimConfig

E = 100
VARIANTS = {
    # name: (preset, overrides)
    "kd": ("paper", {"reinit": {"scale": 0.0}}),
    "paper": ("paper", {}),
    "paper-x2": ("paper", {"reinit": {"scale": 2.0}}),
    "paper-x4": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9}}),
    "deep-full": ("paper", {"reinit": {"overrides": {"net.features.8": 1.0, "net.classifier.*": 1.0}}}),
    "head-full": ("paper", {"reinit": {"overrides": {"net.classifier.*": 1.0}}}),
    "paper-x4-mix": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9}, "distill": {"mixup_alpha": 1.0}}),
    "deep-full-mix": ("paper", {"reinit": {"overrides": {"net.features.8": 1.0, "net.classifier.*": 1.0}},
                                "distill": {"mixup_alpha": 1.0}}),
    "paper-x4-t2": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9}, "distill": {"t_squared": True}}),
    "paper-x4-lr05": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9}, "optim": {"lr": 0.05}}),
    "paper-x3": ("paper", {"reinit": {"scale": 3.0, "max_ratio": 0.9}}),
    "only-conv3": ("paper", {"reinit": {"overrides": {"net.features.8": 0.9}}}),
    "only-fc1": ("paper", {"reinit": {"overrides": {"net.classifier.1": 0.9}}}),
    "only-head": ("paper", {"reinit": {"overrides": {"net.classifier.3": 1.0}}}),
    "paper-x4-e200": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9}, "optim": {"epochs": 200}}),
    "paper-x4-mix-e300": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9}, "distill": {"mixup_alpha": 1.0},
                                    "optim": {"epochs": 300}}),
    "x4-t2-e200": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9}, "distill": {"t_squared": True},
                             "optim": {"epochs": 200}}),
    "x4-t2-lr02": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9}, "distill": {"t_squared": True},
                             "optim": {"lr": 0.02}}),
    "x3-t2": ("paper", {"reinit": {"scale": 3.0, "max_ratio": 0.9}, "distill": {"t_squared": True}}),
    "x4-t2-mix": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9}, "distill": {"t_squared": True,
                                                                                   "mixup_alpha": 1.0}}),
    "x8-t2-mix": ("paper", {"reinit": {"scale": 8.0, "max_ratio": 0.9}, "distill": {"t_squared": True,
                                                                                   "mixup_alpha": 1.0}}),
    "all90-t2-mix": ("paper", {"reinit": {"stem": 0.9, "stages": [0.9], "head": 0.9, "max_ratio": 0.9},
                               "distill": {"t_squared": True, "mixup_alpha": 1.0}}),
    "x4-T1-mix": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9},
                            "distill": {"t_start": 1.0, "t_end": 1.0, "mixup_alpha": 1.0}}),
    "x4-T1-mix-lr05": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9}, "optim": {"lr": 0.05},
                                 "distill": {"t_start": 1.0, "t_end": 1.0, "mixup_alpha": 1.0}}),
    "x8-t2": ("paper", {"reinit": {"scale": 8.0, "max_ratio": 0.9}, "distill": {"t_squared": True}}),
    "all90-t2": ("paper", {"reinit": {"stem": 0.9, "stages": [0.9], "head": 0.9, "max_ratio": 0.9},
                           "distill": {"t_squared": True}}),
    "x4-T1-lr05": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9}, "optim": {"lr": 0.05},
                             "distill": {"t_start": 1.0, "t_end": 1.0}}),
    "x4-t2-tend2": ("paper", {"reinit": {"scale": 4.0, "max_ratio": 0.9},
                              "distill": {"t_squared": True, "t_end": 2.0}}),
    "default": ("default", {}),
    "no-noise": ("default", {"distill": {"noise_blend": 0.0}}),
    "x4-t2-noise10": ("default", {"distill": {"noise_blend": 0.1}}),
    "x4-t2-noise20": ("default", {"distill": {"noise_blend": 0.2}}),
    "x4-t2-noise30": ("default", {"distill": {"noise_blend": 0.3}}),
    "x4-t2-noise50": ("default", {"distill": {"noise_blend": 0.5}}),
}


def teacher(out: Path, arch: str, epochs: int, n_train: int, seed: int, attack_name: str = "badnets",
            attack_options: dict | None = None):
    train_all = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    rest, unlabeled = split(train_all, 5000, seed=seed)
    rest = take(rest, n_train, seed=seed)
    attack = create_attack(attack_name, {"target": 0, "seed": seed, **(attack_options or {})}, train_all.shape,
                           10)  # its default rate unless attack_options say otherwise
    if (out / "model.safetensors").exists():
        model, _ = load_model(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        model = create_model(arch, 10, train_all.shape, mean=(0.2860,), std=(0.3530,))
        t0 = time.time()
        attack.train(model, rest, OptimConfig(epochs=epochs, batch_size=128, lr=0.05), augment_cfg=AugmentConfig(),
                     seed=seed, progress=False)
        print(json.dumps({"teacher_seconds": time.time() - t0}), file=sys.stderr)
        save_model(model, out)
    return model, unlabeled, test, attack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--arch", default="cnn-small")
    ap.add_argument("--attack", default="badnets", help="attack of the teacher (its default settings, target 0)")
    ap.add_argument("--teacher-epochs", type=int, default=5)
    ap.add_argument("--n-train", type=int, default=55000)
    ap.add_argument("--epochs", type=int, default=E)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="runs/method-study")
    ap.add_argument("--set", action="append", default=[], help="extra overrides key=value for every variant")
    ap.add_argument("--attack-set", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the teacher's attack, e.g. pattern_image=benchmarks/assets/cat.png")
    ap.add_argument("--out", default=None, help="append results to this JSON list")
    args = ap.parse_args()
    from bcu.config import parse_overrides

    tag = "" if args.attack == "badnets" else f"-{args.attack}"
    attack_options = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.attack_set)}
    if attack_options:
        tag += "-" + hashlib.sha256(json.dumps(attack_options, sort_keys=True).encode()).hexdigest()[:8]
    wd = Path(args.workdir) / f"{args.arch}-s{args.seed}-e{args.teacher_epochs}-n{args.n_train}{tag}"
    model, unlabeled, test, attack = teacher(wd, args.arch, args.teacher_epochs, args.n_train, args.seed,
                                             args.attack, attack_options)
    trig = attack.triggered_test(test)
    before = attack_scores(model, test, attack, triggered=trig)
    rows = []
    extra = parse_overrides(args.set)
    for name in args.variants.split(","):
        base, over = VARIANTS[name] if name in VARIANTS else ("paper", {})
        over = deep_merge(deep_merge({"optim": {"epochs": args.epochs}, "seed": args.seed}, over), extra)
        cfg = preset(base, over)
        t0 = time.time()
        res = Cleanser(cfg).run(model, unlabeled, progress=False)
        after = attack_scores(res.model, test, attack, triggered=trig)
        row = {"variant": name, "attack": args.attack, "attack_options": attack_options, "overrides": over,
               "arch": args.arch, "seed": args.seed,
               "teacher": before.as_dict(), "acc": after.acc, "asr": after.asr, "ra": after.ra,
               "seconds": time.time() - t0,
               "final_agree": res.history[-1].get("monitor_agree") if res.history else None}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        p = Path(args.out)
        old = json.loads(p.read_text()) if p.exists() else []
        p.write_text(json.dumps(old + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
