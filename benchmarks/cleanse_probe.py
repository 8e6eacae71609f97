"""Cleanse one cached `bcu bench` teacher with bcu overrides and print one JSON line (ACC/ASR/RA).

Uses the teacher, unlabeled images and test split that `bcu bench` stored for (attack, seed), so
a variant of bcu can be tried on exactly the cell that misbehaved:

    python benchmarks/cleanse_probe.py --attack wanet --seed 2 --set distill.warp=0.5

The cleanse runs with its config's own seeds (``--set seed=...`` to change them); labels are used
only by the evaluation after the cleanse.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bcu.bench import _split_data, ensure_teacher, load_config, source_images
from bcu.config import parse_overrides
from bcu.defenses.bcu import Cleanser, preset
from bcu.metrics import attack_scores, rate_by_class
from bcu.train import predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/bench-fmnist.yaml")
    ap.add_argument("--out", default="runs/bench-fmnist", help="the bench run directory (teachers are reused)")
    ap.add_argument("--arch", default=None, help="architecture of the grid (default: its first)")
    ap.add_argument("--attack", required=True)
    ap.add_argument("--seed", type=int, required=True, help="the bench seed of the teacher and its data split")
    ap.add_argument("--unlabeled", default="in-dist")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="bcu config overrides")
    args = ap.parse_args()
    cfg = load_config(args.config)
    out = Path(args.out)
    arch = args.arch or next(iter(cfg.archs))
    model, attack, before = ensure_teacher(cfg, out, arch, args.attack, args.seed)
    _, _, test = _split_data(cfg, args.seed)
    data = source_images(cfg, out, args.unlabeled, args.seed, tuple(model.spec.input_shape), model.spec.num_classes)
    over = parse_overrides(args.set)
    t0 = time.time()
    res = Cleanser(preset(args.preset, over)).run(model, data.without_labels(), progress=False)
    seconds = time.time() - t0
    after = attack_scores(res.model, test, attack)
    print(json.dumps({"arch": arch, "attack": args.attack, "seed": args.seed, "unlabeled": args.unlabeled,
                      "preset": args.preset,
                      "overrides": over, "teacher": {"acc": round(before["acc"], 2), "asr": round(before["asr"], 2)},
                      "acc": round(after.acc, 2), "asr": round(after.asr, 2), "ra": round(after.ra, 2),
                      "seconds": round(seconds, 1),
                      "teacher_asr_by_class": {k: round(v, 2) for k, v in before["asr_by_class"].items()},
                      "asr_by_class": {k: round(v, 2) for k, v in after.asr_by_class.items()},
                      "untriggered_to_target_by_class": to_target_by_class(res.model, test, attack)}), flush=True)


def to_target_by_class(model, test, attack) -> dict:
    """Percent of *untriggered* non-target test images of each class that the model puts in the
    target class: the floor under that class's ASR that owes nothing to the trigger."""
    nontarget = test.subset(torch.nonzero(test.labels != attack.config.target).flatten())
    pred = predict(model, nontarget.images, 1024, "cpu").argmax(1)
    hit = pred == attack.target_labels(nontarget.labels)
    return {k: round(v, 2) for k, v in rate_by_class(hit, nontarget.labels, test.classes).items()}


if __name__ == "__main__":
    main()
