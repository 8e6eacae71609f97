"""Images per second of one cleanse configuration: the real loop, the bare step, a naive pipeline.

Prints ONE JSON object:

* ``real_ips``  -- ``Cleanser(...).run`` on resident data (the real cleanse loop: batch gathering,
  batch augmentation, teacher + student step, per-epoch monitor), images trained / seconds summed
  over full epochs (the first epoch is a warm-up and not counted when there are two or more);
  ``real_ips_no_monitor`` the same with ``stop.monitor_size=0`` (no per-epoch prediction of
  ``monitor_images`` images: the loop alone, comparable with the two below);
* ``bare_ips``  -- the same model's bare step on one resident random batch, no data path: teacher
  forward + student forward/backward/update through the same objective, memory format and optimiser;
* ``naive_ips`` -- a per-sample pipeline as most reference code has it: a ``torch.utils.data.Dataset``
  that turns each image into a PIL image, pads it by 4, crops a random window, flips at random and
  converts it to a float tensor (torchvision's RandomCrop(padding=4) + RandomHorizontalFlip +
  ToTensor, written with PIL/numpy), batched by a DataLoader with shuffling and workers; the
  teacher runs under plain ``torch.no_grad()``; the step is otherwise the same;
* ``config``    -- model, batch size, threads, images, torch version, CPU.

    flock /tmp/bcu-heavy.lock env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/throughput.py
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bcu.data import make_synthetic  # noqa: E402
from bcu.defenses.bcu import Cleanser, DistillObjective, preset  # noqa: E402
from bcu.models import create_model  # noqa: E402
from bcu.train import Step, autocast_for, epoch_generator, memory_format_for  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class NaiveCropFlip(torch.utils.data.Dataset):
    """Per-sample PIL/numpy augmentation, the way torchvision transforms do it."""

    def __init__(self, images: np.ndarray, pad: int = 4) -> None:
        self.images = images  # (N, H, W) or (N, H, W, C) uint8, as datasets are usually stored
        self.pad = pad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image, ImageOps

        img = Image.fromarray(self.images[i])
        w, h = img.size
        img = ImageOps.expand(img, border=self.pad, fill=0)  # RandomCrop(padding=4): zero padding
        top, left = np.random.randint(0, 2 * self.pad + 1, size=2)
        img = img.crop((int(left), int(top), int(left) + w, int(top) + h))
        if np.random.rand() < 0.5:  # RandomHorizontalFlip
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32) / 255.0  # ToTensor
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="cnn-small")
    ap.add_argument("--width", type=float, default=None, help="width multiplier (e.g. 0.25 for resnet18)")
    ap.add_argument("--shape", default=None, help="C,H,W (default 1,28,28; 3,32,32 for resnets and vgg)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=3, help="real loop epochs (the first is warm-up when >= 2)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--naive-workers", type=int, default=2, help="DataLoader workers of the naive pipeline")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.shape:
        shape = tuple(int(v) for v in args.shape.replace("x", ",").split(","))
    else:
        shape = (1, 28, 28) if args.arch.startswith("cnn") else (3, 32, 32)
    kw = {"width": args.width} if args.width is not None else {}
    torch.manual_seed(0)
    model = create_model(args.arch, 10, shape, **kw)
    data = make_synthetic(args.images, shape, 10, seed=0).without_labels()
    bs = args.batch_size
    steps_per_epoch = args.images // bs
    if steps_per_epoch < 1:
        ap.error("--images must be at least one batch")
    cfg = preset("paper", {"optim": {"epochs": args.epochs, "batch_size": bs}})

    # ---- real: the cleanse loop itself (with its per-epoch monitor, as configured; and without it)
    def real(c) -> tuple:
        res = Cleanser(c).run(copy.deepcopy(model), data, progress=False)
        secs = [row["seconds"] for row in res.history]
        timed = secs[1:] if len(secs) >= 2 else secs
        return steps_per_epoch * bs * len(timed) / sum(timed), timed

    real_ips, timed = real(cfg)
    real_nomon_ips, _ = real(preset("paper", {"optim": {"epochs": args.epochs, "batch_size": bs},
                                              "stop": {"monitor_size": 0}}))

    # ---- bare: the same step on one resident random batch
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    fmt = memory_format_for(teacher, None)
    teacher.to(memory_format=fmt)
    student = copy.deepcopy(model).to(memory_format=fmt).train()
    objective = DistillObjective(teacher, cfg.distill)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    step = Step(0, args.epochs, epoch_generator(0, 0))
    x = torch.rand((bs,) + shape).contiguous(memory_format=fmt)
    dev = torch.device("cpu")

    def bare_step():
        with autocast_for(dev):
            loss, _ = objective(student, x, None, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        bare_step()
    n_bare = steps_per_epoch * len(timed)
    t0 = time.perf_counter()
    for _ in range(n_bare):
        bare_step()
    bare_ips = n_bare * bs / (time.perf_counter() - t0)

    # ---- naive: per-sample PIL transforms through a DataLoader, teacher under no_grad
    naive_ips = None
    if not args.skip_naive:
        imgs = data.images.numpy()
        imgs = imgs[:, 0] if shape[0] == 1 else imgs.transpose(0, 2, 3, 1)
        ds = NaiveCropFlip(np.ascontiguousarray(imgs))
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True,
                                             num_workers=args.naive_workers,
                                             persistent_workers=args.naive_workers > 0)
        student2 = copy.deepcopy(model).to(memory_format=fmt).train()
        opt2 = torch.optim.SGD(student2.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        T = cfg.distill.temperature(0, args.epochs)
        import torch.nn.functional as F

        def naive_epoch() -> int:
            n = 0
            for xb in loader:
                xb = xb.contiguous(memory_format=fmt)
                with torch.no_grad():
                    t_logits = teacher(xb).float()
                s_logits = student2(xb).float()
                loss = F.kl_div(F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1),
                                reduction="batchmean", log_target=True)
                opt2.zero_grad(set_to_none=True)
                loss.backward()
                opt2.step()
                float(loss.detach())
                n += xb.shape[0]
            return n

        if args.epochs >= 2:
            naive_epoch()  # warm-up (worker start-up), as for the real loop
        t0 = time.perf_counter()
        n = sum(naive_epoch() for _ in range(len(timed)))
        naive_ips = n / (time.perf_counter() - t0)

    out = {
        "real_ips": round(real_ips, 1), "bare_ips": round(bare_ips, 1),
        "naive_ips": None if naive_ips is None else round(naive_ips, 1),
        "real_over_bare": round(real_ips / bare_ips, 3),
        "real_ips_no_monitor": round(real_nomon_ips, 1),
        "monitor_images": min(cfg.stop.monitor_size, args.images // 5),
        "config": {"model": args.arch, "width": args.width, "input_shape": list(shape),
                   "params": sum(p.numel() for p in model.parameters()), "batch_size": bs,
                   "threads": torch.get_num_threads(), "images": args.images, "epochs": args.epochs,
                   "timed_epochs": len(timed), "memory_format": str(fmt).replace("torch.", ""),
                   "naive_workers": args.naive_workers, "torch": torch.__version__, "cpu": cpu_name(),
                   "cores": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
