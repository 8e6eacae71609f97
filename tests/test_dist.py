"""Two gloo processes on CPU: ``torchrun --nproc-per-node 2 -m bcu cleanse`` (DistributedDataParallel)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bcu.checkpoint import load_model
from bcu.data import load_dataset
from bcu.train import predict

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "BCU_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
# The paper preset: this checks DDP mechanics and quality parity; with the default's T^2 factor,
# lr 0.05 acts like up to 0.8 at T = 4, and 23 steps of 32 images per rank make single runs noisy.
ARGS = ["--epochs", "6", "--batch-size", "64", "--lr", "0.05", "--threads", "1", "--preset", "paper"]


def run(*argv, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def agreement(model, teacher, images) -> float:
    return float((predict(model, images).argmax(1) == predict(teacher, images).argmax(1)).float().mean())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_torchrun_two_processes_cleanse(tmp_path: Path):
    atk = tmp_path / "atk"
    run("-m", "bcu", "attack", "--attack", "badnets", "--data", "synthetic:3000", "--epochs", "3", "--batch-size", "64",
        "--lr", "0.05", "--holdout", "1500", "--out", atk, "--threads", "1")
    out2, out1 = tmp_path / "two", tmp_path / "one"
    r = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bcu", "cleanse",
            "--model", atk, "--data", atk / "unlabeled.npz", "--out", out2, *ARGS)
    assert r.stdout.count("cleansed model written to") == 1  # rank 0 alone writes and reports
    assert not Path(str(out2) + ".partial").exists() and not (out2 / "resume").exists()
    run("-m", "bcu", "cleanse", "--model", atk, "--data", atk / "unlabeled.npz", "--out", out1, *ARGS)

    teacher, _ = load_model(atk)
    two, _ = load_model(out2)
    one, _ = load_model(out1)
    clean = load_dataset("synthetic:3000", "test", labels=False).images
    a2, a1 = agreement(two, teacher, clean), agreement(one, teacher, clean)
    assert a2 > 0.6, (a2, a1)
    assert a2 > a1 - 0.2, (a2, a1)  # the same quality as one process (within small-run noise)

    report = json.loads((out2 / "report.json").read_text())
    # each rank trained half of every epoch; the history counts both halves
    assert report["epochs_run"] == 6 and len(report["history"]) == 6
    assert report["training_images"] == 1500


WORKER = r'''
import json, os, sys, torch
torch.set_num_threads(1)
from bcu import dist
from bcu.data import ImageSet
from bcu.models import create_model
from bcu.train import OptimConfig, fit

n = 150
imgs = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
imgs[:, 0, 0, 0] = torch.arange(n) % 256
imgs[:, 0, 5:20, 5:20] = (torch.arange(n) * 37 % 200).view(n, 1, 1).to(torch.uint8)  # something to learn
seen = []

def objective(model, x, y, step):
    seen.append([int(v) for v in (x[:, 0, 0, 0] * 255).round().long()])
    out = model(x)
    loss = (out - out.detach().mean(0)).pow(2).mean()
    return loss, {"loss": float(loss.detach())}

torch.manual_seed(0)
model = create_model("cnn-small", 10, (1, 28, 28))
hist = fit(model, ImageSet(imgs), objective, OptimConfig(epochs=2, batch_size=20, lr=0.05), seed=5,
           with_labels=False, progress=False)
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
result = {"rank": dist.rank(), "world": dist.world_size(), "seen": seen, "param_sum": float(flat.double().sum()),
          "param_head": flat[:50].tolist(), "loss": [h["loss"] for h in hist]}
dist.shutdown()
# what is still running once the process group is torn down (Linux names its threads in /proc)
tasks = "/proc/self/task"
result["threads_after_shutdown"] = sorted(open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)) \
    if os.path.isdir(tasks) else []
json.dump(result, open(sys.argv[1] + f"/rank{result['rank']}.json", "w"))
'''


def test_ranks_share_each_epoch_and_stay_in_sync(tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # per rank: 150 // 2 = 75 images, batches of 20 // 2 = 10, drop_last -> 7 steps an epoch
    assert len(r0["seen"]) == len(r1["seen"]) == 14 and all(len(b) == 10 for b in r0["seen"] + r1["seen"])
    for epoch in range(2):
        a = [i for b in r0["seen"][7 * epoch:7 * epoch + 7] for i in b]
        b = [i for b in r1["seen"][7 * epoch:7 * epoch + 7] for i in b]
        assert not set(a) & set(b)  # disjoint shards of the same permutation
        assert len(set(a)) == len(a) == 70
    assert r0["seen"][:7] != r0["seen"][7:]  # a new permutation each epoch
    assert r0["param_head"] == r1["param_head"] and r0["param_sum"] == r1["param_sum"]  # DDP kept them equal
    assert r0["loss"] == r1["loss"]  # metrics are reduced over both ranks


def test_shutdown_leaves_no_thread_of_the_process_group_running(tmp_path: Path):
    """Issue 14, finding 13: one fresh-clone `make test` in seven, rank 1 aborted at exit
    ("terminate called without an active exception", SIGABRT; torchrun then SIGTERMs rank 0).
    A core dump showed why: a gloo worker thread destroying a finished broadcast released a
    Python-owned tensor while the main thread was in Py_FinalizeEx; it could not take the GIL and
    the thread exit unwound through C++ into std::terminate. The thread was still there because
    the process group survived destroy_process_group: DistributedDataParallel imports torch._dynamo,
    and imported after init_process_group that import keeps a reference to the group. bcu.dist now
    imports it before init and tears down in order (barrier, collect the DDP wrapper, destroy),
    so gloo joins its threads while the interpreter is fully alive. This checks the deterministic
    half of the race: after dist.shutdown() no gloo thread is left to race the interpreter."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux thread names")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, tmp_path)
    for i in (0, 1):
        threads = json.loads((tmp_path / f"rank{i}.json").read_text())["threads_after_shutdown"]
        assert not [t for t in threads if "gloo" in t], threads
