"""The workflows: what each command does, written once for the CLI, the demo and the benchmark.

* :func:`train_backdoored` / :func:`save_backdoored` -- a backdoored model from a training set and
  an attack (its input normalisation from :func:`bcu.data.pixel_stats`), and its files;
* :func:`attack`, :func:`cleanse`, :func:`defend`, :func:`evaluate` -- ``bcu attack|cleanse|defend|
  evaluate``: inputs, resume fingerprint, staged output (:class:`bcu.output.OutputDir`), work,
  report; each returns what the command prints;
* :func:`cleanse_report` -- the report of a cleanse (``bcu cleanse`` and ``bcu demo``);
* :func:`command_inputs` -- the paths a command reads, which no output may be or contain.

The CLI (:mod:`bcu.cli`) only turns arguments into these calls and prints their results.
"""
from __future__ import annotations

import dataclasses
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch import nn

from . import dist, seeding
from .attack_result import PoisonedSet, is_attack_result, read_attack_result, stored_attack_scores
from .attacks import Attack, create_attack, load_attack
from .checkpoint import OUT_FORMATS, load_model, resolve_model_path, save_model
from .config import deep_merge, from_dict, load_file, parse_overrides
from .data.augment import AugmentConfig
from .data.imageset import ImageSet, Images, pixel_stats, split, take
from .data.load import fashion_mnist_dir, is_fashion_mnist, load_dataset
from .defenses import DEFENSES, CleanseConfig, Cleanser, create_defense, preset
from .defenses.base import DefenseResult
from .diagnose import DataDiagnosis, DiagnosisConfig, diagnose
from .errors import ConfigError, DataError, Interrupted, ModelError
from .metrics import accuracy, attack_scores, der
from .models import Classifier, check_images, create_model
from .output import OutputDir, OutputFile, atomic_write_bytes, atomic_write_json
from .report import write_cleanse_report, write_model_card
from .resume import fingerprint
from .scan import ScanConfig, ScanResult, scan
from .train import OptimConfig
from .version import __version__

PathLike = Union[str, Path]


def command_inputs(*specs: Any, models: Sequence[Any] = ()) -> List[str]:
    """The paths a command reads: data specs that are paths (or name Fashion-MNIST's folder),
    config files, attack artifacts, and each model's weights file and sidecar. No output may be,
    or contain, one of them (bcu.output)."""
    out: List[str] = []
    for spec in specs:
        if spec is None:
            continue
        s = str(spec)
        if is_fashion_mnist(s):
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


def open_model(path: PathLike, options: Optional[Dict[str, Any]] = None) -> Tuple[Classifier, Dict[str, Any]]:
    """:func:`bcu.checkpoint.load_model`, saying on stderr what it inferred (a bare state dict's
    architecture, an attack result's model)."""
    model, info = load_model(path, **(options or {}))
    if info.get("inferred"):
        print(f"bcu: {info['inferred']}", file=sys.stderr)
    return model, info


def stored_poisoned_set(spec: Optional[str], model: Classifier) -> Optional[PoisonedSet]:
    """The poisoned test set of an ``attack_result.pt`` given as ``--attack`` (None for any other spec),
    checked against the model's input shape."""
    if not spec or not is_attack_result(spec):
        return None
    res = read_attack_result(spec)
    if res.bd_test is None:
        raise DataError(f"{spec} stores no poisoned test set (bd_test)")
    shape = tuple(res.bd_test.images.shape[1:])
    if shape != tuple(model.spec.input_shape):
        raise DataError(f"{spec}: poisoned images are {'x'.join(map(str, shape))} but the model expects "
                        f"{'x'.join(map(str, model.spec.input_shape))}")
    return res.bd_test


def require_images(model: nn.Module, data: Images, where: str) -> None:
    """Images of the wrong channel count or size are refused before any output is written."""
    if len(data) == 0:
        raise DataError(f"{where} holds no images")
    check_images(model, data.shape, where)


def attack_from_spec(spec: str, overrides: Dict[str, Any], image_shape, num_classes: int) -> Attack:
    """An attack from an artifact folder/JSON written by `bcu attack`, or a registered name."""
    if is_attack_result(spec):
        raise ConfigError(f"{spec} is a BackdoorBench attack result: it is scored on its stored poisoned set, "
                          f"not re-applied as an attack")
    p = Path(spec)
    if p.exists():
        if p.is_dir() and not (p / "attack.json").is_file():
            raise DataError(f"{p} holds no attack.json (write one with `bcu attack`)")
        attack = load_attack(p)
        if overrides:
            raise ConfigError("attack options cannot be changed for a saved attack artifact")
        return attack
    return create_attack(spec, overrides, image_shape, num_classes)


# --------------------------------------------------------------------------------------------------
# a backdoored model


@dataclass
class Backdoored:
    """A model trained with a backdoor, and how."""

    model: Classifier
    attack: Attack
    history: List[Dict[str, Any]]
    seconds: float


def train_backdoored(train: ImageSet, attack: Attack, arch: str, optim: OptimConfig,
                     augment: Optional[AugmentConfig], *, seed: int = 0, device: str = "cpu",
                     resume_dir: Optional[Path] = None, progress: Optional[bool] = None,
                     mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                     **model_options: Any) -> Backdoored:
    """A fresh ``arch`` (normalised by the training images' mean/std unless given; weights from
    ``seed``) trained by ``attack`` on ``train``."""
    if not (mean and std):
        stats = pixel_stats(train.images)
        mean, std = mean or stats[0], std or stats[1]
    seeding.manual_seed(seed)
    model = create_model(arch, attack.num_classes, train.shape, mean=tuple(mean), std=tuple(std), classes=train.classes,
                         **model_options)
    t0 = time.time()
    history = attack.train(model, train, optim, augment_cfg=augment, seed=seed, device=device, resume_dir=resume_dir,
                           progress=progress)
    return Backdoored(model, attack, history, time.time() - t0)


def save_backdoored(directory: Path, model: Classifier, attack: Attack, extra: Dict[str, Any]) -> Dict[str, Any]:
    """The model (safetensors + sidecar) and the attack artifact (attack.json + attack.safetensors)."""
    sidecar = save_model(model.cpu(), directory, extra=extra)
    attack.save(directory)
    return sidecar


def write_holdout(path: Path, holdout: ImageSet) -> None:
    """The held-out training images (with their labels, for label-using baselines) as an .npz."""
    buf = io.BytesIO()
    np.savez(buf, x=holdout.images.numpy(), y=holdout.labels.numpy())
    atomic_write_bytes(path, buf.getvalue())


@dataclass
class AttackOutcome:
    out: Path
    metrics: Dict[str, Any]
    holdout: Optional[int]
    scores: Optional[Dict[str, Optional[float]]]


def attack(name: str, out: PathLike, *, data: str = "fashion-mnist", arch: str = "cnn-small",
           width: Optional[float] = None, arch_options: Optional[Dict[str, Any]] = None,
           mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, target: Optional[int] = None,
           poison_rate: Optional[float] = None, epochs: int = 5, batch_size: int = 128, lr: float = 0.05,
           seed: int = 0, holdout: int = 5000, sets: Sequence[str] = (), overwrite: bool = False,
           resume: bool = False, device: str = "cpu", progress: Optional[bool] = None) -> AttackOutcome:
    """``bcu attack``: train a backdoored model; keep ``holdout`` training images out as unlabeled.npz."""
    over = parse_overrides(sets)
    attack_over = over.pop("attack", {})
    for k, v in (("target", target), ("poison_rate", poison_rate)):
        if v is not None:
            attack_over[k] = v
    attack_over.setdefault("seed", seed)
    train = load_dataset(data, split="train", labels=True, progress=bool(progress))
    atk = create_attack(name, attack_over, train.shape, train.num_classes or 10)
    optim = from_dict(OptimConfig, {"epochs": epochs, "batch_size": batch_size, "lr": lr, **over.pop("optim", {})})
    augment = from_dict(AugmentConfig, over.pop("augment", {}))
    if over:
        raise ConfigError(f"unknown option {next(iter(over))} (use attack.*, optim.*, augment.*)")
    held = None
    if holdout:
        train, held = split(train, holdout, seed=seed)
    model_options = {**({"width": width} if width else {}), **(arch_options or {})}
    if not (mean and std):
        stats = pixel_stats(train.images)
        mean, std = mean or stats[0], std or stats[1]
    values = {"command": "attack", "attack": name, "attack_config": dataclasses.asdict(atk.config),
              "data_sha256": train.fingerprint(), "images": len(train), "holdout": holdout, "arch": arch,
              "width": width, "mean": list(mean), "std": list(std), "optim": dataclasses.asdict(optim),
              "augment": dataclasses.asdict(augment), "seed": seed}
    if arch_options:
        values["arch_options"] = arch_options
    with OutputDir(out, overwrite=overwrite, resume=resume, inputs=command_inputs(data), kind="attack") as o, \
            fingerprint(values):
        try:
            done = train_backdoored(train, atk, arch, optim, augment, seed=seed, device=device,
                                    resume_dir=o.resume_dir, progress=progress, mean=mean, std=std, **model_options)
        except Interrupted as e:
            raise o.interrupted(e) from None
        save_backdoored(o.path, done.model, atk, {"attack": name})
        metrics: Dict[str, Any] = {"attack": name, "seconds": done.seconds, "train_images": len(train),
                                   "history": done.history}
        if held is not None:
            write_holdout(o.path / "unlabeled.npz", held)
            metrics["holdout_images"] = len(held)
        try:
            test = load_dataset(data, split="test", labels=True)
        except DataError:
            test = None
        if test is not None:
            metrics.update(attack_scores(done.model, test, atk, device).as_dict())
        atomic_write_json(o.path / "metrics.json", metrics)
        final = o.commit()
    scores = {k: metrics[k] for k in ("acc", "asr", "ra")} if test is not None else None
    return AttackOutcome(final, metrics, len(held) if held is not None else None, scores)


# --------------------------------------------------------------------------------------------------
# cleansing


def cleanse_config(preset_name: str = "default", config: Optional[PathLike] = None, sets: Sequence[str] = (),
                   epochs: Optional[int] = None, batch_size: Optional[int] = None, lr: Optional[float] = None,
                   seed: Optional[int] = None) -> CleanseConfig:
    """preset <- config file <- ``--set`` overrides <- explicit flags."""
    over: Dict[str, Any] = {}
    name = preset_name
    if config:
        data = load_file(config)
        name = data.pop("preset", name)
        over = deep_merge(over, data)
    over = deep_merge(over, parse_overrides(sets))
    flags: Dict[str, Any] = {"optim": {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size),
                                                         ("lr", lr)) if v is not None}}
    if seed is not None:
        flags["seed"] = seed
    return preset(name, deep_merge(over, flags))


def cleanse_report(*, command: str, model: str, model_sha256: str, data: str, images: int, data_sha256: str,
                   output_sha256: str, scores: Optional[Dict[str, Dict[str, Any]]], der_value: Optional[float],
                   result: DefenseResult, diagnosis: Optional[DataDiagnosis] = None,
                   scans: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The report.json of a cleanse (report.md, curves.png and the model card are drawn from it)."""
    return {"bcu_version": __version__, "command": command,
            "input": {"model": model, "sha256": model_sha256, "data": data, "images": images,
                      "data_sha256": data_sha256, "labels_read": False},
            "data_diagnosis": diagnosis.as_dict() if diagnosis is not None else None,
            "scan": scans,
            "output": {"sha256": output_sha256}, "scores": scores or None, "der": der_value,
            **result.info, "history": result.history}


def before_after(teacher: nn.Module, cleansed: nn.Module, test: ImageSet, attack: Optional[Attack],
                 device: str) -> Tuple[Dict[str, Dict[str, Any]], Optional[float]]:
    """Scores of the teacher and the cleansed model on labelled test images (ASR/RA/DER with an attack)."""
    if attack is None:
        return {"teacher": {"acc": accuracy(teacher, test, device)},
                "cleansed": {"acc": accuracy(cleansed, test, device)}}, None
    trig = attack.triggered_test(test)
    before = attack_scores(teacher, test, attack, device, triggered=trig)
    after = attack_scores(cleansed, test, attack, device, triggered=trig)
    return {"teacher": before.as_dict(), "cleansed": after.as_dict()}, der(before, after)


def check_out_format(out_format: str, model_options: Optional[Dict[str, Any]]) -> None:
    """``--out-format hub`` writes timm's layout: refused up front for an architecture timm cannot load."""
    if out_format not in OUT_FORMATS:
        raise ConfigError(f"--out-format must be one of {', '.join(OUT_FORMATS)}, got {out_format!r}")
    arch = (model_options or {}).get("arch")
    if out_format == "hub" and arch is not None and not str(arch).startswith("timm:"):
        raise ConfigError(f"--out-format hub writes timm's config.json: it needs a timm:NAME architecture, "
                          f"not {arch!r}")


def stored_before_after(teacher: nn.Module, cleansed: nn.Module, poisoned: PoisonedSet, test: Optional[ImageSet],
                        device: str) -> Tuple[Dict[str, Dict[str, Any]], Optional[float]]:
    """ASR/RA of the teacher and the cleansed model on an attack result's stored poisoned set (ACC and
    DER too when labelled test images are given)."""
    scores = {}
    for name, m in (("teacher", teacher), ("cleansed", cleansed)):
        scores[name] = {k: v for k, v in stored_attack_scores(m, poisoned, device).items() if k != "poisoned_images"}
        if test is not None:
            scores[name] = {"acc": accuracy(m, test, device), **scores[name]}
    if test is None:
        return scores, None
    t, c = scores["teacher"], scores["cleansed"]
    return scores, (max(0.0, t["asr"] - c["asr"]) - max(0.0, t["acc"] - c["acc"]) + 100.0) / 2.0


@dataclass
class CleanseOutcome:
    out: Optional[Path]
    scores: Dict[str, Dict[str, Any]] = field(default_factory=dict)


NO_DATA = "none"  # ``--data none``: no unlabeled images at all; bcu synthesizes them from the model


def diagnosis_of(model: Classifier, images: Images, device: str = "cpu",
                 cfg: Optional[DiagnosisConfig] = None) -> DataDiagnosis:
    """The label-free diagnosis (:mod:`bcu.diagnose`) of ``images`` against ``model``, on a seeded
    subset of at most ``cfg.images`` of them."""
    cfg = cfg or DiagnosisConfig()
    sample = take(images, cfg.images, seed=0)
    return diagnose(model, sample.images[:], model.spec.num_classes, device, cfg)


def strict_check(diagnosis: DataDiagnosis, data: str) -> None:
    """``--strict``: unsuited unlabeled images end the command before any output is written."""
    if not diagnosis.ok:
        raise DataError(f"--strict: {data} is unsuited to cleanse this model: {diagnosis.warnings[0]}"
                        + (f" (and {len(diagnosis.warnings) - 1} more warnings)" if len(diagnosis.warnings) > 1 else ""))


def is_no_data(data: str) -> bool:
    """``--data none`` (and no file or folder of that name): a cleanse with synthesized images only."""
    return data == NO_DATA and not os.path.lexists(data)


def evidence_inputs(model_path: PathLike, data: str, split_name: str, json_out: Optional[PathLike],
                    overwrite: bool, model_options: Optional[Dict[str, Any]], stream: bool = False
                    ) -> Tuple[Optional[OutputFile], Classifier, Dict[str, Any], Images]:
    """What ``inspect-data`` and ``scan`` read: the ``--json`` output checked first, then the model
    and the unlabeled images (of the model's input shape)."""
    out_file = None
    if json_out:
        out_file = OutputFile(json_out, overwrite=overwrite, flag="--json",
                              inputs=command_inputs(data, models=[model_path])).check()
    model, info = open_model(model_path, model_options)
    images = load_dataset(data, split=split_name, labels=False, stream=stream)
    require_images(model, images, data)
    return out_file, model, info, images


def scan_of(model: Classifier, images: Images, cfg: ScanConfig, device: str = "cpu") -> ScanResult:
    """:func:`bcu.scan.scan` of ``model`` on a seeded subset of at most ``cfg.images`` of ``images``."""
    return scan(model, take(images, cfg.images, seed=cfg.seed).images[:], cfg, device,
                classes=model.spec.classes, num_classes=model.spec.num_classes)


def inspect_data(model_path: PathLike, data: str, *, split_name: str = "train", stream: bool = False,
                 max_images: Optional[int] = None, json_out: Optional[PathLike] = None, overwrite: bool = False,
                 model_options: Optional[Dict[str, Any]] = None, device: str = "cpu") -> Tuple[DataDiagnosis, Classifier]:
    """``bcu inspect-data``: the diagnosis alone (nothing is trained)."""
    out_file, model, info, images = evidence_inputs(model_path, data, split_name, json_out, overwrite, model_options,
                                                    stream=stream)
    cfg = DiagnosisConfig(images=max_images) if max_images else DiagnosisConfig()
    diagnosis = diagnosis_of(model, images, device, cfg)
    if out_file is not None:
        out_file.write_json({"bcu_version": __version__, "model": str(model_path), "sha256": info["sha256"],
                             "data": str(data), "data_sha256": images.fingerprint(), **diagnosis.as_dict()})
    return diagnosis, model


def scan_config(config: Optional[PathLike] = None, sets: Sequence[str] = ()) -> ScanConfig:
    """The scan's options: a config file (its ``scan`` section or the whole file), then ``--set scan.KEY=VALUE``."""
    over: Dict[str, Any] = {}
    if config:
        data = load_file(config)
        over = dict(data.get("scan", data))
    over = deep_merge(over, parse_overrides(sets).get("scan", {}))
    return from_dict(ScanConfig, over)


def scan_model(model_path: PathLike, data: str, *, split_name: str = "train", cfg: Optional[ScanConfig] = None,
               json_out: Optional[PathLike] = None, overwrite: bool = False,
               model_options: Optional[Dict[str, Any]] = None, device: str = "cpu") -> ScanResult:
    """``bcu scan``: the label-free trigger scan (:mod:`bcu.scan`) of a model with unlabeled images."""
    out_file, model, info, images = evidence_inputs(model_path, data, split_name, json_out, overwrite, model_options)
    cfg = cfg or ScanConfig()
    result = scan_of(model, images, cfg, device)
    if out_file is not None:
        out_file.write_json({"bcu_version": __version__, "model": str(model_path), "sha256": info["sha256"],
                             "data": str(data), "summary": result.summary(), **result.as_dict()})
    return result


def cleanse(model_path: PathLike, data: str, out: PathLike, cfg: CleanseConfig, *, split_name: str = "train",
            stream: bool = False, max_images: Optional[int] = None, test_data: Optional[str] = None,
            attack_spec: Optional[str] = None, config_path: Optional[PathLike] = None,
            model_options: Optional[Dict[str, Any]] = None, overwrite: bool = False, resume: bool = False,
            device: str = "cpu", progress: Optional[bool] = None, command: Optional[str] = None,
            strict: bool = False, log: Optional[Any] = None, out_format: str = "bcu",
            scan_cfg: Optional[ScanConfig] = None) -> CleanseOutcome:
    """``bcu cleanse``: bcu on unlabeled images (never their labels); under torchrun every rank trains
    its shard and rank 0 alone writes (docs/distributed.md). ``data`` ``"none"``: no images, bcu
    synthesizes them from the model. Before the cleanse the images are diagnosed
    (:func:`diagnosis_of`), the diagnosis goes to ``log`` and into the report, and ``strict`` refuses
    unsuited images. ``out_format="hub"`` also writes timm's ``config.json`` (a ``timm:NAME`` model);
    ``scan_cfg`` runs the label-free trigger scan (:mod:`bcu.scan`) on the teacher and the cleansed
    model with the unlabeled images, into the report and the model card (``README.md``)."""
    check_out_format(out_format, model_options)
    model, info = open_model(model_path, model_options)
    check_out_format(out_format, {"arch": model.spec.arch})
    if scan_cfg is not None and is_no_data(data):
        raise ConfigError("--scan needs unlabeled images; --data none has none")
    diagnosis: Optional[DataDiagnosis] = None
    if is_no_data(data):
        images: Optional[Images] = None
        if stream or max_images is not None:
            raise ConfigError("--stream and --max-images need images; --data none has none")
    else:
        images = load_dataset(data, split=split_name, labels=False, progress=bool(progress), stream=stream)
        if max_images is not None:
            if max_images < 1:
                raise ConfigError(f"--max-images must be >= 1, got {max_images}")
            images = take(images, max_images, seed=cfg.seed)
        require_images(model, images, data)
    device = dist.device_for(device)  # under torchrun: one GPU per process
    if not dist.is_main():
        dist.init(device)
        Cleanser(cfg).run(model, images, device=device, progress=False)
        dist.barrier()
        dist.shutdown()
        return CleanseOutcome(None)
    test = atk = None
    poisoned = stored_poisoned_set(attack_spec, model)
    if test_data:
        test = load_dataset(test_data, split="test", labels=True)
        require_images(model, test, test_data)
        if attack_spec and poisoned is None:
            atk = attack_from_spec(attack_spec, {}, model.spec.input_shape, model.spec.num_classes)
    data_sha = images.fingerprint() if images is not None else None
    values = {"command": "cleanse", "model_sha256": info["sha256"], "data_sha256": data_sha,
              "images": len(images) if images is not None else 0, "config": dataclasses.asdict(cfg)}
    scores: Dict[str, Dict[str, Any]] = {}
    with OutputDir(out, overwrite=overwrite, resume=resume, kind="cleanse",
                   inputs=command_inputs(data, test_data, attack_spec, config_path, models=[model_path])) as o, \
            fingerprint(values):
        if images is not None:  # after the output checks, before any work; an error leaves no staging behind
            diagnosis = diagnosis_of(model, images, device)
            if log is not None:
                for line in diagnosis.lines(model.spec.classes):
                    log(line)
            if strict:
                strict_check(diagnosis, data)
        try:
            result = Cleanser(cfg).run(model, images, device=device, progress=progress, resume_dir=o.resume_dir)
        except Interrupted as e:
            raise o.interrupted(e) from None
        sidecar = save_model(result.model.cpu(), o.path, extra={"cleansed_by": "bcu", "teacher_sha256": info["sha256"]},
                             out_format=out_format)
        der_value = None
        if poisoned is not None:
            scores, der_value = stored_before_after(model, result.model, poisoned, test, device)
        elif test is not None:
            scores, der_value = before_after(model, result.model, test, atk, device)
        scans = None
        if scan_cfg is not None and images is not None:
            found = {who: scan_of(m, images, scan_cfg, device) for who, m in (("teacher", model),
                                                                               ("cleansed", result.model))}
            if log is not None:
                for who, r in found.items():
                    log(f"scan of the {who}: " + r.summary())
            scans = {who: r.as_dict() for who, r in found.items()}
        report = cleanse_report(command=command or "bcu " + " ".join(sys.argv[1:]), model=str(model_path),
                                model_sha256=info["sha256"], data=str(data),
                                images=len(images) if images is not None else 0, data_sha256=data_sha,
                                output_sha256=sidecar["sha256"], scores=scores, der_value=der_value, result=result,
                                diagnosis=diagnosis, scans=scans)
        report["model"] = dataclasses.asdict(model.spec) | {"format": out_format}
        write_cleanse_report(o.path, report, result.history)
        write_model_card(o.path, report)
        final = o.commit()
    dist.barrier()
    dist.shutdown()
    return CleanseOutcome(final, scores)


# --------------------------------------------------------------------------------------------------
# any defense, and evaluation


def defend(name: str, model_path: PathLike, out: PathLike, *, data: Optional[str] = None,
           split_name: str = "train", config: Optional[PathLike] = None, sets: Sequence[str] = (),
           model_options: Optional[Dict[str, Any]] = None, seed: int = 0, overwrite: bool = False,
           resume: bool = False, device: str = "cpu", progress: Optional[bool] = None) -> Path:
    """``bcu defend``: any registered defense (label-using ones read the data's labels; bcu never does)."""
    cls = DEFENSES.get(name)
    over: Dict[str, Any] = load_file(config) if config else {}
    defense = create_defense(name, deep_merge(over, parse_overrides(sets)))
    model, info = open_model(model_path, model_options)
    images = None
    if cls.uses_data:
        if not data:
            raise ConfigError(f"defense {name!r} needs --data")
        images = load_dataset(data, split=split_name, labels=cls.uses_labels, progress=bool(progress))
        require_images(model, images, data)
    data_sha = images.fingerprint() if images is not None else None
    values = {"command": "defend", "defense": name, "config": dataclasses.asdict(defense.config),
              "model_sha256": info["sha256"], "data_sha256": data_sha, "seed": seed}
    with OutputDir(out, overwrite=overwrite, resume=resume, kind="defend",
                   inputs=command_inputs(data, config, models=[model_path])) as o, fingerprint(values):
        try:
            result = defense.run(model, images, device=device, seed=seed, progress=progress, resume_dir=o.resume_dir)
        except Interrupted as e:
            raise o.interrupted(e) from None
        sidecar = save_model(result.model.cpu(), o.path, extra={"defense": name, "input_sha256": info["sha256"]})
        atomic_write_json(o.path / "report.json", {
            "defense": name, "uses_labels": cls.uses_labels,
            "input": {"model": str(model_path), "sha256": info["sha256"], "data": data, "data_sha256": data_sha},
            "output": {"sha256": sidecar["sha256"]}, "info": result.info, "history": result.history})
        return o.commit()


@dataclass
class Evaluation:
    result: Dict[str, Any]
    named: Dict[str, Dict[str, Any]]


def evaluate(model_path: PathLike, data: Optional[str], *, split_name: str = "test",
             attack_spec: Optional[str] = None, sets: Sequence[str] = (), original: Optional[PathLike] = None,
             json_out: Optional[PathLike] = None, overwrite: bool = False,
             model_options: Optional[Dict[str, Any]] = None, device: str = "cpu") -> Evaluation:
    """``bcu evaluate``: ACC on labelled data; ASR, RA (and DER against ``original``) with an attack.
    An ``attack_result.pt`` as the attack is scored on its stored poisoned test set; ``data`` (for
    ACC) may then be left out."""
    out_file = None
    if json_out:  # checked before the work: an existing file, a link, the model's own sidecar... are refused
        out_file = OutputFile(json_out, overwrite=overwrite, flag="--json",
                              inputs=command_inputs(data, attack_spec, models=[model_path, original])).check()
    if data is None and not (attack_spec and is_attack_result(attack_spec)):
        raise ConfigError("bcu evaluate needs --data (labelled test images), unless --attack is an attack_result.pt")
    model, info = open_model(model_path, model_options)
    poisoned = stored_poisoned_set(attack_spec, model)
    test = None
    if data is not None:
        test = load_dataset(data, split=split_name, labels=True)
        if test.shape != tuple(model.spec.input_shape):
            raise DataError(f"test images are {'x'.join(map(str, test.shape))} but the model expects "
                            f"{'x'.join(map(str, model.spec.input_shape))}")
    result: Dict[str, Any] = {"model": str(model_path), "sha256": info["sha256"], "data": data}
    named: Dict[str, Dict[str, Any]] = {}
    if poisoned is not None:
        orig = open_model(original, model_options)[0] if original else None
        scores, der_value = stored_before_after(orig if orig is not None else model, model, poisoned, test, device)
        named = {"original": scores["teacher"], "model": scores["cleansed"]} if orig is not None else \
            {"model": scores["cleansed"]}
        result.update(named["model"])
        result["attack"] = {"attack_result": str(attack_spec), "poisoned_images": len(poisoned.images)}
        if orig is not None:
            result["original"] = named["original"]
            if der_value is not None:
                result["der"] = der_value
    elif attack_spec:
        assert test is not None
        atk = attack_from_spec(attack_spec, parse_overrides(sets).get("attack", {}), model.spec.input_shape,
                               model.spec.num_classes)
        trig = atk.triggered_test(test)
        after = attack_scores(model, test, atk, device, triggered=trig)
        named["model"] = after.as_dict()
        result.update(after.as_dict())
        result["asr_by_class"] = after.asr_by_class
        result["attack"] = atk.describe()
        if original:
            orig, _ = open_model(original, model_options)
            before = attack_scores(orig, test, atk, device, triggered=trig)
            named = {"original": before.as_dict(), **named}
            result["original"] = before.as_dict()
            result["der"] = der(before, after)
    else:
        assert test is not None
        result["acc"] = accuracy(model, test, device)
        named["model"] = {"acc": result["acc"]}
    if out_file is not None:
        out_file.write_json(result)
    return Evaluation(result, named)
