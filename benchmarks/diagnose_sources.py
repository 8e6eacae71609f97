"""The label-free diagnosis (bcu.diagnose) of five unlabeled sources against one suspicious model.

    python benchmarks/diagnose_sources.py [--model runs/generalize-dev/teachers/cnn-small__badnets__s0]
        [--sources runs/sources] [--json docs/results/diagnose-fmnist.json]

Sources: Fashion-MNIST test images (the model's own kind), the same restricted to classes 0-4, real
handwritten digits and animal silhouettes (benchmarks/ood_sources.py), and the synthetic task; 5,000
images each (the test split's classes 0-4: all 5,000 of them). Prints one JSON row per source.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bcu.checkpoint import load_model
from bcu.data import load_dataset, make_synthetic
from bcu.diagnose import diagnose
from bcu.output import atomic_write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/generalize-dev/teachers/cnn-small__badnets__s0")
    ap.add_argument("--sources", default="runs/sources", help="folder of digits.npz/animals.npz (ood_sources.py)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, info = load_model(args.model)
    test = load_dataset("fashion-mnist", split="test", labels=True)
    half = test.subset(torch.nonzero(test.labels < 5).flatten())
    sets = {"fashion-mnist test": test.subset(torch.arange(5000)).images, "fashion-mnist classes 0-4": half.images,
            "digits": load_dataset(str(Path(args.sources) / "digits.npz"), labels=False).images,
            "animals": load_dataset(str(Path(args.sources) / "animals.npz"), labels=False).images,
            "synthetic": make_synthetic(5000, tuple(model.spec.input_shape), 10, seed=0).images}
    command = "python " + " ".join(["benchmarks/diagnose_sources.py"] + (argv if argv is not None else sys.argv[1:]))
    rows = []
    for name, x in sets.items():
        d = diagnose(model, x, model.spec.num_classes)
        row = {"model": args.model, "model_sha256": info["sha256"], "source": name, "images": d.images,
               "effective_classes": round(d.effective_classes, 2), "untaught": d.untaught,
               "confidence": round(d.confidence, 3), "bn_shift": None if d.bn_shift is None else round(d.bn_shift, 4),
               "ok": d.ok, "warnings": d.warnings, "command": command}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("warnings", "command", "model_sha256")}))
    if args.json:
        atomic_write_json(Path(args.json), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
