"""Peak memory of a streaming cleanse: a folder of small PNGs, ``bcu cleanse --stream``, one epoch.

Writes ``--images`` 28x28 grayscale PNGs into a temporary folder, saves an (untrained) cnn-small
as the suspicious model, then runs ``bcu cleanse --data FOLDER --stream --epochs 1`` in a child
process and prints ONE JSON object with that child's peak resident set size
(``resource.getrusage``: ``peak_rss_mib`` of the cleanse process, ``peak_rss_workers_mib`` of its
largest DataLoader worker). ``--compare-resident`` also runs the same cleanse without ``--stream``.

    flock /tmp/bcu-heavy.lock env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory.py
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
sys.path.insert(0, SRC)

CHILD = r"""
import json, resource, sys, time
t0 = time.time()
from bcu.cli import main
rc = main(sys.argv[1:])
self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("MEMJSON " + json.dumps({"rc": rc, "peak_rss_mib": round(self_kib / 1024, 1),
                               "peak_rss_workers_mib": round(kids_kib / 1024, 1),
                               "seconds": round(time.time() - t0, 1)}))
"""


def write_pngs(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    from bcu.data import make_synthetic

    folder.mkdir(parents=True, exist_ok=True)
    chunk = 5000
    for s in range(0, n, chunk):  # a few thousand at a time: the generator itself stays small
        d = make_synthetic(min(chunk, n - s), (1, 28, 28), 10, seed=seed + s)
        arr = d.images[:, 0].numpy()
        for i in range(arr.shape[0]):
            Image.fromarray(arr[i]).save(folder / f"{s + i:06d}.png", compress_level=1)


def run_cleanse(model: Path, data: Path, out: Path, stream: bool, threads: int, workers: int, batch: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BCU_PROGRESS": "0", "BCU_STREAM_WORKERS": str(workers),
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = ["cleanse", "--model", str(model), "--data", str(data), "--out", str(out), "--overwrite",
            "--epochs", "1", "--batch-size", str(batch), "--threads", str(threads), "--no-progress"]
    if stream:
        argv.append("--stream")
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("MEMJSON ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"cleanse failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(line[len("MEMJSON "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--workers", type=int, default=2, help="DataLoader reader processes")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--compare-resident", action="store_true", help="also run without --stream")
    ap.add_argument("--dir", help="use/keep this folder instead of a temporary one")
    args = ap.parse_args(argv)

    import torch

    from bcu.checkpoint import save_model
    from bcu.models import create_model

    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bcu-mem-"))
    try:
        imgs = tmp / "images"
        t0 = time.time()
        if not imgs.is_dir() or len(list(imgs.glob("*.png"))) != args.images:
            shutil.rmtree(imgs, ignore_errors=True)
            write_pngs(imgs, args.images)
        gen_s = time.time() - t0
        torch.manual_seed(0)
        (tmp / "model").mkdir(exist_ok=True)
        save_model(create_model("cnn-small", 10, (1, 28, 28)), tmp / "model")
        du = sum(f.stat().st_size for f in imgs.iterdir())
        result = {"images": args.images, "png_bytes": du, "decoded_mib": round(args.images * 784 / 2**20, 1),
                  "generate_seconds": round(gen_s, 1)}
        result["stream"] = run_cleanse(tmp / "model", imgs, tmp / "out-stream", True, args.threads, args.workers,
                                       args.batch_size)
        if args.compare_resident:
            result["resident"] = run_cleanse(tmp / "model", imgs, tmp / "out-resident", False, args.threads,
                                             args.workers, args.batch_size)
        result["config"] = {"model": "cnn-small", "input_shape": [1, 28, 28], "epochs": 1,
                            "batch_size": args.batch_size, "threads": args.threads, "workers": args.workers,
                            "torch": torch.__version__, "cores": os.cpu_count()}
        print(json.dumps(result))
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
