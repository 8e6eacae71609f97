"""The two real out-of-distribution image sets of the benchmark (benchmarks/ood_sources.py) build from
the packages `make setup` installs, and load through bcu's ordinary loader."""
import subprocess
import sys
from pathlib import Path

import torch

from bcu.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_ood_sources_build_real_image_sets(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ood_sources.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    digits = load_dataset(str(tmp_path / "digits.npz"), labels=False)
    animals = load_dataset(str(tmp_path / "animals.npz"), labels=False)
    assert len(digits) == 5000 and digits.shape == (1, 28, 28)
    assert len(animals) == 5000 and animals.shape == (1, 28, 28)
    for ds in (digits, animals):  # real images: dark backgrounds, bright strokes, not noise
        x = ds.images.float()
        border = torch.cat([x[:, :, 0, :], x[:, :, -1, :]], dim=2).mean()
        centre = x[:, :, 10:18, 10:18].mean()
        assert border < 20 and centre > 3 * border
    assert not torch.equal(digits.images[:100], animals.images[:100])
