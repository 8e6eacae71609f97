"""``bcu``: the command-line interface (a thin layer over the Python API)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import __version__
from .errors import BcuError, ConfigError, DataError, Interrupted, clean
from . import seeding


# --------------------------------------------------------------------------------------------------
# shared option groups


class _Parser(argparse.ArgumentParser):
    """argparse with bcu's error contract: a usage mistake is one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def _shape(text: str):
    try:
        vals = tuple(int(v) for v in text.replace("x", ",").split(","))
        if len(vals) != 3 or min(vals) <= 0:
            raise ValueError
        return vals
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}") from None


def _seed(text: str) -> int:
    from .seeding import SEED_MAX, SEED_MIN

    try:
        v = int(text) if len(text) <= 40 else None
    except ValueError:
        v = None
    if v is None or not SEED_MIN <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2^63, 2^63 - 1], got {text[:40]!r}")
    return v


def _floats(text: str):
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="force progress bars on")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a sidecar supplies these; give them for a bare .pt state dict)")
    g.add_argument("--arch", help="architecture name from `bcu list models`")
    g.add_argument("--num-classes", type=int)
    g.add_argument("--input-shape", type=_shape, help="C,H,W")
    g.add_argument("--mean", type=_floats, help="per-channel input mean, e.g. 0.4914,0.4822,0.4465")
    g.add_argument("--std", type=_floats, help="per-channel input std")
    g.add_argument("--width", type=float, help="width multiplier of the architecture")


def add_output(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    p.add_argument("--out", required=default is None, default=default, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/TOML/JSON file of options (see docs/configuration.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set distill.mixup_alpha=1.0 (repeatable)")


def load_model_from_args(args: argparse.Namespace, path: Optional[str] = None):
    from .checkpoint import load_model

    kwargs = {"width": args.width} if getattr(args, "width", None) is not None else {}
    return load_model(path or args.model, arch=getattr(args, "arch", None), num_classes=getattr(args, "num_classes", None),
                      input_shape=getattr(args, "input_shape", None), mean=getattr(args, "mean", None),
                      std=getattr(args, "std", None), **kwargs)


def cleanse_config_from_args(args: argparse.Namespace):
    """preset <- config file <- --set <- explicit flags."""
    from .config import deep_merge, load_file, parse_overrides
    from .defenses.bcu import preset

    over: Dict[str, Any] = {}
    name = args.preset
    if args.config:
        data = load_file(args.config)
        name = data.pop("preset", name)
        over = deep_merge(over, data)
    over = deep_merge(over, parse_overrides(args.set))
    flags = {"optim": {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                         ("lr", args.lr)) if v is not None}}
    if args.seed is not None:
        flags["seed"] = args.seed
    over = deep_merge(over, flags)
    return preset(name, over)


def attack_from_spec(spec: str, overrides: Dict[str, Any], image_shape, num_classes: int):
    """An attack from an artifact folder/JSON written by `bcu attack`, or a registered name."""
    from .attacks import create_attack, load_attack

    p = Path(spec)
    if p.exists():
        if p.is_dir() and not (p / "attack.json").is_file():
            raise DataError(f"{p} holds no attack.json (write one with `bcu attack`)")
        attack = load_attack(p)
        if overrides:
            raise ConfigError("attack options cannot be changed for a saved attack artifact")
        return attack
    return create_attack(spec, overrides, image_shape, num_classes)


def _interrupted(e: BaseException, staging: Path) -> Interrupted:
    """The Ctrl-C message: how to go on, and only promise --resume when a checkpoint exists."""
    if (staging / "resume" / "state.pt").is_file():
        return Interrupted(f"{e}; progress is kept in {staging}: run the same command with --resume to continue")
    return Interrupted(f"{e}; nothing resumable was saved yet: run the same command again")


def _check_images(model, data, where: str) -> None:
    """Images of the wrong channel count or size are refused before any output is written."""
    if len(data) == 0:
        raise DataError(f"{where} holds no images")
    c, h, w = (int(v) for v in model.spec.input_shape)
    dc, dh, dw = data.shape
    if (c, h, w) != (dc, dh, dw):
        what = "channel count" if c != dc else "image size"
        raise DataError(f"{where}: images are {dc}x{dh}x{dw} (CxHxW) but the model expects {c}x{h}x{w}: "
                        f"wrong {what}")


def _setup_runtime(args: argparse.Namespace) -> None:
    from . import runtime

    runtime.setup(getattr(args, "device", "cpu"), getattr(args, "threads", None))


def _inputs(*specs: Any, models: Sequence[Any] = ()) -> List[str]:
    """The paths a command reads: data specs that are paths (or name Fashion-MNIST's folder),
    config files, attack artifacts, and each model's weights file and sidecar. No output may be,
    or contain, one of them (bcu.output)."""
    from .checkpoint import resolve_model_path
    from .data import fashion_mnist_dir
    from .errors import ModelError

    out: List[str] = []
    for spec in specs:
        if spec is None:
            continue
        s = str(spec)
        if s.lower() in ("fashion-mnist", "fmnist", "fashion_mnist"):
            try:
                out.append(str(fashion_mnist_dir()))
            except DataError:
                pass
        elif os.path.lexists(s):
            out.append(s)
    for m in models:
        if m is None:
            continue
        out.append(str(m))
        try:
            w, side = resolve_model_path(m)
            out += [str(w)] + ([str(side)] if side is not None else [])
        except ModelError:
            pass
    return out


# --------------------------------------------------------------------------------------------------
# commands


def cmd_list(args: argparse.Namespace) -> int:
    from . import config as C
    from .attacks import ATTACKS
    from .defenses import DEFENSES
    from .models import MODELS

    what = args.what or "all"
    if what in ("models", "all"):
        print("models:")
        for n in MODELS.names():
            print(f"  {n:18s} {MODELS.help(n)}")
    if what in ("attacks", "all"):
        print("attacks:")
        for n in ATTACKS.names():
            cls = ATTACKS.get(n)
            print(f"  {n:18s} [{cls.kind}] {ATTACKS.help(n)}")
            if args.verbose:
                for line in C.describe(cls.Config):
                    print(f"      {line}")
    if what in ("defenses", "all"):
        print("defenses:")
        for n in DEFENSES.names():
            cls = DEFENSES.get(n)
            tag = "labels" if cls.uses_labels and cls.uses_data else ("data-free" if not cls.uses_data else "label-free")
            print(f"  {n:18s} [{tag}] {DEFENSES.help(n)}")
    return 0


def cmd_cleanse(args: argparse.Namespace) -> int:
    from .checkpoint import OutputDir, save_model, sha256_bytes
    from .data import load_dataset
    from .defenses.bcu import Cleanser
    from .report import write_cleanse_report

    _setup_runtime(args)
    cfg = cleanse_config_from_args(args)
    model, info = load_model_from_args(args)
    if getattr(args, "stream", False):  # images stay on disk, read batch by batch (docs/performance.md)
        from .stream import load_stream

        data = load_stream(args.data, split=args.split, labels=False)
    else:
        data = load_dataset(args.data, split=args.split, labels=False, progress=args.progress)
    if args.max_images is not None:
        if args.max_images < 1:
            raise ConfigError(f"--max-images must be >= 1, got {args.max_images}")
        from .data import take

        data = take(data, args.max_images, seed=cfg.seed)  # ImageSet or stream: both have subset()
    _check_images(model, data, args.data)
    from . import dist

    args.device = dist.device_for(args.device)  # under torchrun: one GPU per process
    if not dist.is_main():  # torchrun: ranks > 0 train their shard, rank 0 alone writes (docs/distributed.md)
        dist.init(args.device)
        Cleanser(cfg).run(model, data, device=args.device, progress=False)
        dist.barrier()
        dist.shutdown()
        return 0
    scores = {}
    test = attack = trig = None
    if args.test_data:
        test = load_dataset(args.test_data, split="test", labels=True)
        _check_images(model, test, args.test_data)
        if args.attack:
            attack = attack_from_spec(args.attack, {}, model.spec.input_shape, model.spec.num_classes)
    from .config import to_dict
    from .train import resume_fingerprint

    inputs = _inputs(args.data, args.test_data, args.attack, args.config, models=[args.model])
    data_sha = data.fingerprint()
    fingerprint = {"command": "cleanse", "model_sha256": info["sha256"], "data_sha256": data_sha,
                   "images": len(data), "config": to_dict(cfg)}
    with OutputDir(args.out, overwrite=args.overwrite, resume=args.resume, inputs=inputs, kind="cleanse") as out, \
            resume_fingerprint(fingerprint):
        try:
            result = Cleanser(cfg).run(model, data, device=args.device, progress=args.progress,
                                       resume_dir=out.path / "resume")
        except Interrupted as e:
            raise _interrupted(e, out.path) from None
        sidecar = save_model(result.model.cpu(), out.path, extra={"cleansed_by": "bcu", "teacher_sha256": info["sha256"]})
        if test is not None:
            from .metrics import accuracy, attack_scores, der

            if attack is not None:
                trig = attack.triggered_test(test)
                before = attack_scores(model, test, attack, args.device, triggered=trig)
                after = attack_scores(result.model, test, attack, args.device, triggered=trig)
                scores = {"teacher": before.as_dict(), "cleansed": after.as_dict()}
            else:
                scores = {"teacher": {"acc": accuracy(model, test, args.device)},
                          "cleansed": {"acc": accuracy(result.model, test, args.device)}}
        report = {
            "bcu_version": __version__, "command": "bcu " + " ".join(sys.argv[1:]),
            "input": {"model": str(args.model), "sha256": info["sha256"], "data": str(args.data),
                      "images": len(data), "data_sha256": data_sha, "labels_read": False},
            "output": {"sha256": sidecar["sha256"]},
            "scores": scores or None,
            "der": (der(before, after) if attack is not None and test is not None else None),
            **result.info, "history": result.history,
        }
        write_cleanse_report(out.path, report, result.history)
        final = out.commit()
    dist.barrier()
    dist.shutdown()
    print(f"cleansed model written to {clean(final)}/ (report: {clean(final)}/report.md)")
    if scores:
        from .report import scores_table

        print(scores_table(scores))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import parse_overrides
    from .data import load_dataset
    from .metrics import accuracy, attack_scores, der
    from .output import OutputFile
    from .report import scores_table

    _setup_runtime(args)
    json_out = None
    if args.json:  # checked before the work: an existing file, a link, the model's own sidecar... are refused
        json_out = OutputFile(args.json, overwrite=args.overwrite, flag="--json",
                              inputs=_inputs(args.data, args.attack, models=[args.model, args.original])).check()
    model, info = load_model_from_args(args)
    test = load_dataset(args.data, split=args.split, labels=True)
    if test.shape != tuple(model.spec.input_shape):
        raise DataError(f"test images are {'x'.join(map(str, test.shape))} but the model expects "
                        f"{'x'.join(map(str, model.spec.input_shape))}")
    result: Dict[str, Any] = {"model": str(args.model), "sha256": info["sha256"], "data": str(args.data)}
    named = {}
    if args.attack:
        attack = attack_from_spec(args.attack, parse_overrides(args.set).get("attack", {}),
                                  model.spec.input_shape, model.spec.num_classes)
        trig = attack.triggered_test(test)
        after = attack_scores(model, test, attack, args.device, triggered=trig)
        named["model"] = after.as_dict()
        result.update(after.as_dict())
        result["asr_by_class"] = after.asr_by_class
        result["attack"] = attack.describe()
        if args.original:
            orig, _ = load_model_from_args(args, args.original)
            before = attack_scores(orig, test, attack, args.device, triggered=trig)
            named = {"original": before.as_dict(), **named}
            result["original"] = before.as_dict()
            result["der"] = der(before, after)
    else:
        result["acc"] = accuracy(model, test, args.device)
        named["model"] = {"acc": result["acc"]}
    print(scores_table(named))
    if "der" in result:
        print(f"DER: {result['der']:.2f}")
    if json_out is not None:
        json_out.write_json(result)
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    import numpy as np

    from .attacks import ATTACKS
    from .checkpoint import OutputDir, atomic_write_bytes, atomic_write_json, save_model
    from .config import describe, parse_overrides
    from .data import AugmentConfig, load_dataset, split
    from .metrics import attack_scores
    from .models import create_model
    from .train import OptimConfig

    if args.list or not args.attack:
        if not args.list:
            raise ConfigError("--attack is required (see `bcu attack --list`)")
        for n in ATTACKS.names():
            cls = ATTACKS.get(n)
            print(f"{n} [{cls.kind}]: {ATTACKS.help(n)}")
            for line in describe(cls.Config):
                print(f"    {line}")
        return 0
    if not args.out:
        raise ConfigError("--out is required")
    _setup_runtime(args)
    over = parse_overrides(args.set)
    attack_over = over.pop("attack", {})
    for k in ("target", "poison_rate"):
        if getattr(args, k) is not None:
            attack_over[k] = getattr(args, k)
    attack_over.setdefault("seed", args.seed)
    train = load_dataset(args.data, split="train", labels=True, progress=args.progress)
    num_classes = train.num_classes or 10
    from .attacks import create_attack

    attack = create_attack(args.attack, attack_over, train.shape, num_classes)
    from .config import from_dict

    optim = from_dict(OptimConfig, {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                                    **over.pop("optim", {})})
    augment = from_dict(AugmentConfig, over.pop("augment", {}))
    if over:
        raise ConfigError(f"unknown option {next(iter(over))} (use attack.*, optim.*, augment.*)")
    holdout = None
    if args.holdout:
        train, holdout = split(train, args.holdout, seed=args.seed)
    import torch

    seeding.manual_seed(args.seed)
    kwargs = {"width": args.width} if args.width else {}
    mean = args.mean or tuple(float(v) for v in (train.images.float() / 255).mean((0, 2, 3)))
    std = args.std or tuple(float(v) for v in (train.images.float() / 255).std((0, 2, 3)))
    model = create_model(args.arch, num_classes, train.shape, mean=mean, std=std, classes=train.classes, **kwargs)
    from .config import to_dict
    from .train import resume_fingerprint

    fingerprint = {"command": "attack", "attack": args.attack, "attack_config": to_dict(attack.config),
                   "data_sha256": train.fingerprint(), "images": len(train), "holdout": args.holdout,
                   "arch": args.arch, "width": args.width, "mean": list(mean), "std": list(std),
                   "optim": to_dict(optim), "augment": to_dict(augment), "seed": args.seed}
    with OutputDir(args.out, overwrite=args.overwrite, resume=args.resume, inputs=_inputs(args.data),
                   kind="attack") as out, resume_fingerprint(fingerprint):
        t0 = time.time()
        try:
            history = attack.train(model, train, optim, augment_cfg=augment, seed=args.seed, device=args.device,
                                   resume_dir=out.path / "resume", progress=args.progress)
        except Interrupted as e:
            raise _interrupted(e, out.path) from None
        seconds = time.time() - t0
        save_model(model.cpu(), out.path, extra={"attack": args.attack})
        attack.save(out.path)
        metrics: Dict[str, Any] = {"attack": args.attack, "seconds": seconds, "train_images": len(train),
                                   "history": history}
        if holdout is not None:
            buf = __import__("io").BytesIO()
            np.savez(buf, x=holdout.images.numpy(), y=holdout.labels.numpy())
            atomic_write_bytes(out.path / "unlabeled.npz", buf.getvalue())
            metrics["holdout_images"] = len(holdout)
        try:
            test = load_dataset(args.data, split="test", labels=True)
        except DataError:
            test = None
        if test is not None:
            metrics.update(attack_scores(model, test, attack, args.device).as_dict())
        atomic_write_json(out.path / "metrics.json", metrics)
        final = out.commit()
    shown = clean(final)
    print(f"backdoored model written to {shown}/" + (f" (held-out images: {shown}/unlabeled.npz)" if holdout else ""))
    if test is not None:
        from .report import scores_table

        print(scores_table({args.attack: {k: metrics[k] for k in ("acc", "asr", "ra")}}))
    return 0


def cmd_defend(args: argparse.Namespace) -> int:
    """Run any registered defense (label-using ones read the data's labels; bcu never does)."""
    from .checkpoint import OutputDir, atomic_write_json, save_model
    from .config import deep_merge, load_file, parse_overrides
    from .data import load_dataset
    from .defenses import DEFENSES, create_defense, run_defense

    _setup_runtime(args)
    cls = DEFENSES.get(args.defense)
    over: Dict[str, Any] = load_file(args.config) if args.config else {}
    over = deep_merge(over, parse_overrides(args.set))
    defense = create_defense(args.defense, over)
    model, info = load_model_from_args(args)
    data = None
    if cls.uses_data:
        if not args.data:
            raise ConfigError(f"defense {args.defense!r} needs --data")
        data = load_dataset(args.data, split=args.split, labels=cls.uses_labels, progress=args.progress)
        _check_images(model, data, args.data)
    from .config import to_dict
    from .train import resume_fingerprint

    data_sha = data.fingerprint() if data is not None else None
    fingerprint = {"command": "defend", "defense": args.defense, "config": to_dict(defense.config),
                   "model_sha256": info["sha256"], "data_sha256": data_sha, "seed": args.seed}
    with OutputDir(args.out, overwrite=args.overwrite, resume=args.resume, kind="defend",
                   inputs=_inputs(args.data, args.config, models=[args.model])) as out, resume_fingerprint(fingerprint):
        try:
            result = run_defense(defense, model, data, device=args.device, seed=args.seed, progress=args.progress,
                                 resume_dir=out.path / "resume")
        except Interrupted as e:
            raise _interrupted(e, out.path) from None
        sidecar = save_model(result.model.cpu(), out.path, extra={"defense": args.defense,
                                                                  "input_sha256": info["sha256"]})
        atomic_write_json(out.path / "report.json", {
            "defense": args.defense, "uses_labels": cls.uses_labels, "input": {"model": str(args.model),
            "sha256": info["sha256"], "data": args.data,
            "data_sha256": data_sha},
            "output": {"sha256": sidecar["sha256"]},
            "info": result.info, "history": result.history})
        final = out.commit()
    print(f"{args.defense}: repaired model written to {clean(final)}/")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .errors import ModelError

    model, info = load_model_from_args(args)
    spec = model.spec
    if info["sidecar"] and not info["sidecar"].get("sha256"):
        raise ModelError(f"sidecar of {info['path']} records no sha256: the weights cannot be verified")
    what = "matches its sidecar" if info["sidecar"] else "(no sidecar: architecture checked, no hash to compare)"
    print(f"ok: {clean(info['path'])} sha256 {info['sha256']} {what}; architecture {spec.arch}, "
          f"{spec.num_classes} classes, input {'x'.join(map(str, spec.input_shape))}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _setup_runtime(args)
    run_demo(out=Path(args.out), overwrite=args.overwrite, attack_epochs=args.attack_epochs,
             cleanse_epochs=args.epochs, preset_name=args.preset, seed=args.seed, data=args.data,
             n_train=args.n_train, progress=args.progress, device=args.device)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run (or continue) a benchmark grid from a config file; write results.{json,csv,md} and plots."""
    from .bench import load_config, run_bench

    _setup_runtime(args)
    cfg = load_config(args.config)
    if args.device != "cpu":
        cfg.device = args.device
    split_ = (lambda t: [v.strip() for v in t.split(",") if v.strip()] if t else None)
    seeds = [int(v) for v in split_(args.seeds)] if args.seeds else None
    out = Path(args.out or f"runs/bench-{cfg.name}")
    stats = run_bench(cfg, out, config_path=args.config, workers=args.workers, threads=args.threads,
                      attacks=split_(args.attacks), defenses=split_(args.defenses), seeds=seeds,
                      unlabeled=split_(args.unlabeled), archs=split_(args.archs), progress=bool(args.progress),
                      teachers_only=args.teachers_only)
    if args.teachers_only:
        print(f"bench: {stats['computed']} teachers trained, {stats['cached']} reused, in {out}/teachers/")
        return 0
    print(f"bench: {stats['computed']} cells computed, {stats['cached']} reused, {stats['rows']} results in "
          f"{clean(out)}/results.md (+ results.json, results.csv, acc_asr.png)")
    return 0


# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bcu", description="Label-free backdoor cleansing of image classifiers.")
    p.add_argument("--version", action="version", version=f"bcu {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="backdoor a Fashion-MNIST model, cleanse it, print before/after")
    add_output(d, "runs/demo")
    d.add_argument("--data", default="fashion-mnist", help="data set name or path (default: fashion-mnist)")
    d.add_argument("--preset", default="default", help="cleanse preset: default or paper")
    d.add_argument("--epochs", type=int, default=None, help="cleanse epochs (default: the preset's)")
    d.add_argument("--attack-epochs", type=int, default=5)
    d.add_argument("--n-train", type=int, default=None, help="train the backdoored model on this many images")
    d.add_argument("--seed", type=_seed, default=0)
    add_runtime(d)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("cleanse", help="cleanse a suspicious model with unlabeled images")
    c.add_argument("--model", required=True, help="model folder, .safetensors (+ sidecar) or .pt/.pth state dict")
    c.add_argument("--data", required=True, help="unlabeled images: folder, .npz, idx folder, CIFAR folder, fashion-mnist")
    c.add_argument("--split", default="train", choices=["train", "test"], help="which split of a split data set")
    add_output(c)
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    c.add_argument("--preset", default="default", help="default or paper")
    add_config(c)
    c.add_argument("--epochs", type=int)
    c.add_argument("--batch-size", type=int)
    c.add_argument("--lr", type=float)
    c.add_argument("--seed", type=_seed)
    c.add_argument("--test-data", help="optional labelled test set, to put ACC/ASR in the report (never used to train)")
    c.add_argument("--attack", help="optional attack artifact or name, for ASR in the report")
    c.add_argument("--max-images", type=int, help="use a deterministic random subset of this many images")
    c.add_argument("--stream", action="store_true", help="read --data from disk batch by batch (image folders, "
                   ".npy, uncompressed .npz) instead of loading it all into memory")
    add_model_options(c)
    add_runtime(c)
    c.set_defaults(func=cmd_cleanse)

    e = sub.add_parser("evaluate", help="ACC, ASR, RA (and DER against the original model)")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True, help="labelled test data")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--attack", help="attack artifact folder (from `bcu attack`) or attack name")
    e.add_argument("--set", action="append", default=[], metavar="attack.KEY=VALUE")
    e.add_argument("--original", help="the model before defense, for DER")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    add_model_options(e)
    add_runtime(e)
    e.set_defaults(func=cmd_evaluate)

    a = sub.add_parser("attack", help="train a backdoored model")
    a.add_argument("--attack", help="attack name (see --list)")
    a.add_argument("--list", action="store_true", help="list attacks and their options")
    a.add_argument("--data", default="fashion-mnist")
    a.add_argument("--arch", default="cnn-small")
    a.add_argument("--width", type=float)
    a.add_argument("--mean", type=_floats)
    a.add_argument("--std", type=_floats)
    a.add_argument("--out")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--resume", action="store_true")
    a.add_argument("--target", type=int)
    a.add_argument("--poison-rate", type=float)
    a.add_argument("--epochs", type=int, default=5)
    a.add_argument("--batch-size", type=int, default=128)
    a.add_argument("--lr", type=float, default=0.05)
    a.add_argument("--seed", type=_seed, default=0)
    a.add_argument("--holdout", type=int, default=5000,
                   help="keep this many training images out of training and save them as unlabeled.npz (0: none)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="attack.*, optim.* or augment.* option, e.g. --set attack.patch_size=4")
    add_runtime(a)
    a.set_defaults(func=cmd_attack)

    df = sub.add_parser("defend", help="run any defense from `bcu list defenses` (baselines, ablations)")
    df.add_argument("--defense", required=True)
    df.add_argument("--model", required=True)
    df.add_argument("--data", help="images (with labels for label-using defenses)")
    df.add_argument("--split", default="train", choices=["train", "test"])
    add_output(df)
    df.add_argument("--resume", action="store_true")
    df.add_argument("--seed", type=_seed, default=0)
    add_config(df)
    add_model_options(df)
    add_runtime(df)
    df.set_defaults(func=cmd_defend)

    v = sub.add_parser("verify", help="check a model's weights against its sidecar and architecture")
    v.add_argument("model")
    add_model_options(v)
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("bench", help="attacks x defenses x seeds x unlabeled sources, resumable (docs/defenses.md)")
    b.add_argument("--config", required=True, help="bench config (YAML/TOML/JSON), e.g. configs/bench-fmnist.yaml")
    b.add_argument("--out", help="output folder (default runs/bench-<name>); finished cells there are reused")
    b.add_argument("--workers", type=int, default=1, help="cells in parallel processes (threads = cores / N each)")
    b.add_argument("--archs", help="run only these architectures of the config (comma-separated)")
    b.add_argument("--teachers-only", action="store_true", help="train the grid's backdoored models, run no defense")
    b.add_argument("--attacks", help="run only these attacks of the config (comma-separated)")
    b.add_argument("--defenses", help="run only these defenses of the config")
    b.add_argument("--seeds", help="run only these seeds of the config")
    b.add_argument("--unlabeled", help="run only these unlabeled sources of the config")
    add_runtime(b)
    b.set_defaults(func=cmd_bench)

    ls = sub.add_parser("list", help="list models, attacks and defenses")
    ls.add_argument("what", nargs="?", choices=["models", "attacks", "defenses", "all"])
    ls.add_argument("-v", "--verbose", action="store_true")
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ConfigError as e:
        print(f"bcu: error: {e}", file=sys.stderr)
        return e.exit_code
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BcuError as e:
        print(f"bcu: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        saved = bool(out) and (Path(str(out) + ".partial") / "resume" / "state.pt").is_file()
        hint = "; run the same command with --resume to continue" if saved else ""
        print(f"bcu: error: interrupted{hint}", file=sys.stderr)
        return 130
    except OSError as e:  # the environment, not a bug: full disk, read-only or vanished files
        import errno

        where = f": {clean(e.filename)}" if getattr(e, "filename", None) else ""
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            print(f"bcu: error: disk full{where}", file=sys.stderr)
            return 5
        print(f"bcu: error: {clean(e.strerror or type(e).__name__)}{where}", file=sys.stderr)
        return 5 if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
