"""Cleanse time per image-epoch of bcu's presets on one model: is the default within 1.5x of bcu 0.1's?

    python benchmarks/cleanse_time.py [--arch cnn-small] [--images 5000] [--epochs 3] [--rounds 2]
        [--presets default,v1,paper] [--json docs/results/cleanse-time.json]

Runs ``Cleanser(preset).run`` on resident synthetic images (the real loop: augmentation, adversary,
teacher + student step, monitor), the presets interleaved round by round so that a load change on the
machine hits all of them alike; the first epoch of every run is a warm-up and is not counted. Prints
one JSON object: milliseconds per 1,000 image-epochs for each preset (median over rounds) and each
preset's ratio to ``v1`` (bcu 0.1's defaults).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from bcu.data import make_synthetic
from bcu.defenses.bcu import Cleanser, preset
from bcu.models import create_model
from bcu.output import atomic_write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="cnn-small")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--presets", default="default,v1,paper")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (1, 28, 28)
    torch.manual_seed(0)
    model = create_model(args.arch, 10, shape)
    data = make_synthetic(args.images, shape, 10, seed=0).without_labels()
    names = [p.strip() for p in args.presets.split(",") if p.strip()]
    per: dict = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            cfg = preset(n, {"optim": {"epochs": args.epochs}})
            res = Cleanser(cfg).run(copy.deepcopy(model), data, progress=False)
            trained = res.info["training_images"]
            secs = [row["seconds"] for row in res.history][1:] or [row["seconds"] for row in res.history]
            per[n].append(1000 * 1000 * sum(secs) / (trained * len(secs)))  # ms per 1,000 image-epochs
    ms = {n: statistics.median(v) for n, v in per.items()}
    out = {"arch": args.arch, "images": args.images, "epochs": args.epochs, "rounds": args.rounds,
           "threads": args.threads, "ms_per_1000_image_epochs": ms, "all_rounds": per,
           "ratio_to_v1": {n: ms[n] / ms["v1"] for n in ms} if "v1" in ms else None,
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "command": "python " + " ".join(["benchmarks/cleanse_time.py"] + (argv if argv is not None else sys.argv[1:]))}
    print(json.dumps(out))
    if args.json:
        atomic_write_json(Path(args.json), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
