"""``bcu``: the command-line interface. Argument plumbing only: each command parses its flags,
calls one workflow (:mod:`bcu.workflows`, :mod:`bcu.demo`, :mod:`bcu.bench`) and prints the result;
every error is one line on stderr with a non-zero exit code (docs/errors.md)."""
from __future__ import annotations

import argparse
import errno
import re
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from . import runtime, workflows
from .attacks import ATTACKS
from .bench import load_config, run_bench
from .checkpoint import verify_folder
from .config import describe, yaml_load
from .defenses import DEFENSES
from .demo import run_demo
from .errors import BcuError, ConfigError, ModelError, clean
from .models import MODELS, SOURCES
from .output import has_checkpoint
from .report import scores_table
from .seeding import SEED_MAX, SEED_MIN
from .version import __version__


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


_OPTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_NAMED_FLAGS = {"arch": "--arch", "num_classes": "--num-classes", "input_shape": "--input-shape", "mean": "--mean",
                "std": "--std", "norm": "--norm", "width": "--width", "path": "--model"}


def _arch_opt(text: str):
    """``KEY=VALUE`` with a typed value (YAML scalar or list: 4, 0.5, true, avg, [32, 32])."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _OPTION_NAME.match(key):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. patch_size=4), got {text[:80]!r}")
    if key in _NAMED_FLAGS:
        raise argparse.ArgumentTypeError(f"{key} has a flag of its own: use {_NAMED_FLAGS[key]}")
    try:
        value = yaml_load(raw, f"--arch-opt {key}") if raw.strip() else ""
    except ConfigError:
        value = raw
    return key, value


def add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="force progress bars on")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a sidecar supplies these; give them for a bare .pt state dict)")
    g.add_argument("--arch", help="architecture: a name from `bcu list models`, timm:NAME or torchvision:NAME")
    g.add_argument("--arch-opt", action="append", type=_arch_opt, default=[], metavar="KEY=VALUE",
                   help="constructor option of the architecture (repeatable; typed: img_size=32, patch_size=4, "
                   "drop_rate=0.1, global_pool=avg); recorded in the output's sidecar")
    g.add_argument("--norm", choices=["timm", "torchvision"],
                   help="mean/std from the library's own pretrained config of --arch (instead of --mean/--std)")
    g.add_argument("--num-classes", type=int)
    g.add_argument("--input-shape", type=_shape, help="C,H,W")
    g.add_argument("--mean", type=_floats, help="per-channel input mean, e.g. 0.4914,0.4822,0.4465")
    g.add_argument("--std", type=_floats, help="per-channel input std")
    g.add_argument("--width", type=float, help="width multiplier of the architecture")


def add_output(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    p.add_argument("--out", required=default is None, default=default, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def add_evidence_inputs(p: argparse.ArgumentParser, what: str, strict: str) -> None:
    """--model, --data, --split and the --json/--overwrite/--strict of the label-free evidence commands."""
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="unlabeled images (any --data of `bcu cleanse`)")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--json", help=f"also write {what} to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--strict", action="store_true", help=strict)


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/TOML/JSON file of options (see docs/configuration.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set distill.mixup_alpha=1.0 (repeatable)")


def model_options(args: argparse.Namespace) -> Dict[str, Any]:
    """What ``--arch``, ``--num-classes``, ``--input-shape``, ``--mean``, ``--std`` and ``--width`` say
    about a model (a sidecar says it otherwise)."""
    opts = {k: getattr(args, k, None) for k in ("arch", "num_classes", "input_shape", "mean", "std", "norm")}
    if getattr(args, "width", None) is not None:
        opts["width"] = args.width
    opts.update(dict(getattr(args, "arch_opt", None) or []))
    return opts


def _setup_runtime(args: argparse.Namespace) -> None:
    runtime.setup(getattr(args, "device", "cpu"), getattr(args, "threads", None))


# --------------------------------------------------------------------------------------------------
# commands: arguments in, a workflow call, its result printed


def cmd_list(args: argparse.Namespace) -> int:
    what = args.what or "all"
    if what in ("models", "all"):
        print("models:")
        for n in MODELS.names():
            print(f"  {n:18s} {MODELS.help(n)}")
        for n in SOURCES.names():
            print(f"  {n + ':NAME':18s} {SOURCES.help(n)}")
    if what in ("attacks", "all"):
        print("attacks:")
        for n in ATTACKS.names():
            cls = ATTACKS.get(n)
            print(f"  {n:18s} [{cls.kind}] {ATTACKS.help(n)}")
            if args.verbose:
                for line in describe(cls.Config):
                    print(f"      {line}")
    if what in ("defenses", "all"):
        print("defenses:")
        for n in DEFENSES.names():
            cls = DEFENSES.get(n)
            tag = "labels" if cls.uses_labels and cls.uses_data else ("data-free" if not cls.uses_data else "label-free")
            print(f"  {n:18s} [{tag}] {DEFENSES.help(n)}")
    return 0


def cmd_cleanse(args: argparse.Namespace) -> int:
    _setup_runtime(args)
    scan_sets = [s for s in args.set if s.strip().startswith("scan.")]
    cleanse_sets = [s for s in args.set if s not in scan_sets]
    if scan_sets and not args.scan:
        raise ConfigError("--set scan.* needs --scan")
    cfg = workflows.cleanse_config(args.preset, args.config, cleanse_sets, args.epochs, args.batch_size, args.lr,
                                   args.seed)
    scan_cfg = workflows.scan_config(None, scan_sets) if args.scan else None
    done = workflows.cleanse(args.model, args.data, args.out, cfg, split_name=args.split, stream=args.stream,
                             max_images=args.max_images, test_data=args.test_data, attack_spec=args.attack,
                             config_path=args.config, model_options=model_options(args), overwrite=args.overwrite,
                             resume=args.resume, device=args.device, progress=args.progress, strict=args.strict,
                             log=print, out_format=args.out_format,
                             scan_cfg=scan_cfg)
    if done.out is None:  # a torchrun rank > 0: rank 0 writes and prints
        return 0
    print(f"cleansed model written to {clean(done.out)}/ (report: {clean(done.out)}/report.md)")
    if done.scores:
        print(scores_table(done.scores))
    return 0


def cmd_inspect_data(args: argparse.Namespace) -> int:
    _setup_runtime(args)
    diagnosis, model = workflows.inspect_data(args.model, args.data, split_name=args.split, stream=args.stream,
                                              max_images=args.max_images, json_out=args.json,
                                              overwrite=args.overwrite, model_options=model_options(args),
                                              device=args.device)
    for line in diagnosis.lines(model.spec.classes):
        print(line)
    print("verdict: suited" if diagnosis.ok else "verdict: unsuited (see the warnings)")
    if args.strict:
        workflows.strict_check(diagnosis, args.data)
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    _setup_runtime(args)
    cfg = workflows.scan_config(args.config, args.set)
    result = workflows.scan_model(args.model, args.data, split_name=args.split, cfg=cfg, json_out=args.json,
                                  overwrite=args.overwrite, model_options=model_options(args), device=args.device)
    for c in result.classes:
        if c.l1 is None:
            print(f"  class {c.name:>12s}: not scanned (the model predicts it for almost every image)")
            continue
        ratio = f"{c.ratio:5.1f}" if c.ratio is not None else "    -"
        index = f"{c.index:5.2f}" if c.index is not None else "    -"
        print(f"  class {c.name:>12s}: stamp {c.l1:7.1f} px, flips {c.flip:5.1f}%, size ratio {ratio}, index {index}")
    print(result.summary())
    return 6 if (args.strict and result.flagged is not None) else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _setup_runtime(args)
    ev = workflows.evaluate(args.model, args.data, split_name=args.split, attack_spec=args.attack, sets=args.set,
                            original=args.original, json_out=args.json, overwrite=args.overwrite,
                            model_options=model_options(args), device=args.device)
    print(scores_table(ev.named))
    if "der" in ev.result:
        print(f"DER: {ev.result['der']:.2f}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
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
    done = workflows.attack(args.attack, args.out, data=args.data, arch=args.arch, width=args.width,
                            arch_options=dict(args.arch_opt), mean=args.mean,
                            std=args.std, target=args.target, poison_rate=args.poison_rate, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed, holdout=args.holdout,
                            sets=args.set, overwrite=args.overwrite, resume=args.resume, device=args.device,
                            progress=args.progress)
    shown = clean(done.out)
    print(f"backdoored model written to {shown}/" + (f" (held-out images: {shown}/unlabeled.npz)" if done.holdout else ""))
    if done.scores is not None:
        print(scores_table({args.attack: done.scores}))
    return 0


def cmd_defend(args: argparse.Namespace) -> int:
    """Run any registered defense (label-using ones read the data's labels; bcu never does)."""
    _setup_runtime(args)
    final = workflows.defend(args.defense, args.model, args.out, data=args.data, split_name=args.split,
                             config=args.config, sets=args.set, model_options=model_options(args), seed=args.seed,
                             overwrite=args.overwrite, resume=args.resume, device=args.device, progress=args.progress)
    print(f"{args.defense}: repaired model written to {clean(final)}/")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    model, info = workflows.open_model(args.model, model_options(args))
    spec = model.spec
    if info["sidecar"] and not info["sidecar"].get("sha256"):
        raise ModelError(f"sidecar of {info['path']} records no sha256: the weights cannot be verified")
    also = verify_folder(model, info)
    if info["format"] == "hub":
        what = "(Hub folder: architecture checked against config.json, no hash to compare)"
    else:
        what = "matches its sidecar" if info["sidecar"] else "(no sidecar: architecture checked, no hash to compare)"
    if also:
        what += f" and its {' and '.join(also)}"
    print(f"ok: {clean(info['path'])} sha256 {info['sha256']} {what}; architecture {spec.arch}, "
          f"{spec.num_classes} classes, input {'x'.join(map(str, spec.input_shape))}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_runtime(args)
    run_demo(out=Path(args.out), overwrite=args.overwrite, attack_epochs=args.attack_epochs,
             cleanse_epochs=args.epochs, preset_name=args.preset, seed=args.seed, data=args.data,
             n_train=args.n_train, progress=args.progress, device=args.device)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run (or continue) a benchmark grid from a config file; write results.{json,csv,md} and plots."""
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
    c.add_argument("--data", required=True, help="unlabeled images: folder, .npz, idx folder, CIFAR folder, "
                   "fashion-mnist; or 'none' for no images at all (bcu synthesizes them from the model)")
    c.add_argument("--strict", action="store_true", help="refuse images the diagnosis finds unsuited "
                   "(see `bcu inspect-data`) instead of warning")
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
    c.add_argument("--out-format", choices=["bcu", "hub"], default="bcu",
                   help="hub: also write timm's config.json, so that timm.create_model('local-dir:OUT', "
                   "pretrained=True) loads the output (timm:NAME models)")
    c.add_argument("--scan", action="store_true", help="run the label-free trigger scan (`bcu scan`) on the teacher "
                   "and the cleansed model; its table goes into the report and the model card (options: "
                   "--set scan.KEY=VALUE)")
    add_model_options(c)
    add_runtime(c)
    c.set_defaults(func=cmd_cleanse)

    ins = sub.add_parser("inspect-data", help="diagnose unlabeled images against a model before a cleanse "
                         "(label-free: predicted classes, confidence, BatchNorm statistics)")
    add_evidence_inputs(ins, "the diagnosis", "exit non-zero when the images are unsuited")
    ins.add_argument("--stream", action="store_true", help="read --data from disk batch by batch")
    ins.add_argument("--max-images", type=int, help="diagnose at most this many (default 5000, a seeded subset)")
    add_model_options(ins)
    add_runtime(ins)
    ins.set_defaults(func=cmd_inspect_data)

    sc = sub.add_parser("scan", help="label-free trigger scan: is there a class that a tiny stamp reaches? "
                        "(Neural Cleanse with the model's own predictions)")
    add_evidence_inputs(sc, "the scan", "exit with code 6 when a class is flagged")
    add_config(sc)
    add_model_options(sc)
    add_runtime(sc)
    sc.set_defaults(func=cmd_scan)

    e = sub.add_parser("evaluate", help="ACC, ASR, RA (and DER against the original model)")
    e.add_argument("--model", required=True)
    e.add_argument("--data", help="labelled test data (may be left out when --attack is an attack_result.pt)")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--attack", help="attack artifact folder (from `bcu attack`), attack name, or a BackdoorBench "
                                    "attack_result.pt (scored on its stored poisoned test set)")
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
    a.add_argument("--arch", default="cnn-small", help="a name from `bcu list models`, timm:NAME or torchvision:NAME")
    a.add_argument("--arch-opt", action="append", type=_arch_opt, default=[], metavar="KEY=VALUE",
                   help="constructor option of the architecture (repeatable, typed), e.g. patch_size=4")
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
        saved = bool(out) and has_checkpoint(out)
        hint = "; run the same command with --resume to continue" if saved else ""
        print(f"bcu: error: interrupted{hint}", file=sys.stderr)
        return 130
    except OSError as e:  # the environment, not a bug: full disk, read-only or vanished files
        where = f": {clean(e.filename)}" if getattr(e, "filename", None) else ""
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            print(f"bcu: error: disk full{where}", file=sys.stderr)
            return 5
        print(f"bcu: error: {clean(e.strerror or type(e).__name__)}{where}", file=sys.stderr)
        return 5 if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
