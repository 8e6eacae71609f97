"""``bcu bench``: attacks x defenses x seeds x unlabeled sources, resumable cell by cell.

Layout of the output folder::

    teachers/<arch>__<attack>__s<seed>/   backdoored model (model.safetensors + model.json), attack
                                  artifact (attack.json + attack.safetensors) and scores.json; trained once
    unlabeled/<source>__s<seed>.npz  each source's images (no labels): ``bcu cleanse --data`` reads them
    cells/<arch>__<attack>__<defense>__<source>__s<seed>.json   one finished cell, written atomically

Architectures, attacks and defenses may be *variants*: ``badnets@line`` is the registered attack
``badnets`` with the options under that key in ``attack_options`` (and ``bcu@stop`` the defense
``bcu`` with ``defense_options["bcu@stop"]``); ``archs`` maps a name to a registered architecture,
its constructor options and its teacher's training overrides.
    results.json, results.csv, results.md, acc_asr.png   aggregated from every finished cell

A killed run continues where it stopped: a cell whose JSON exists is never recomputed, a teacher
whose folder exists is never retrained (folders appear by an atomic rename). With ``workers > 1``
cells run in separate processes, each with ``cores // workers`` torch threads; a file lock makes
sure each teacher is trained by one process only.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import seeding
from .attacks import ATTACKS, create_attack, load_attack
from .checkpoint import load_model
from .config import check, from_dict, load_file
from .data.augment import AugmentConfig
from .data.imageset import ImageSet, split, take
from .data.load import load_dataset
from .data.sources import SourceConfig, build as build_source, export_npz, resolve as resolve_source
from .defenses import DEFENSES, create_defense, run_defense
from .errors import ConfigError, clean
from .lock import ExclusiveLock
from .metrics import Scores, attack_scores, der
from .output import OutputDir, WorkDir, atomic_write_bytes, atomic_write_json, atomic_write_text
from .runtime import check_device
from .train import OptimConfig
from .workflows import save_backdoored, train_backdoored

ROW_KEYS = ["arch", "attack", "defense", "unlabeled", "seed", "acc_before", "asr_before", "acc", "asr", "ra", "der",
            "seconds", "command"]


@dataclass
class TeacherOptim(OptimConfig):
    """Training of the backdoored model (``bcu attack``'s defaults: 5 epochs, batch 128, lr 0.05)."""

    epochs: int = field(default=5, metadata={"help": "attack training epochs"})
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    lr: float = field(default=0.05, metadata={"help": "initial learning rate"})


@dataclass
class ArchEntry:
    """One architecture of a grid: a registered model, its constructor options, teacher overrides."""

    arch: Optional[str] = field(default=None, metadata={
        "help": "registered architecture (default: the entry's name up to any '@')"})
    options: Dict[str, Any] = field(default_factory=dict, metadata={"help": "create_model options, e.g. width"})
    teacher: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "overrides of the grid's teacher training for this architecture, e.g. {epochs: 10}"})


@dataclass
class BenchConfig:
    """A benchmark grid (see docs/defenses.md for the format)."""

    name: str = field(default="bench", metadata={"help": "name used in reports"})
    data: str = field(default="fashion-mnist", metadata={"help": "labelled data set (train and test splits)"})
    arch: str = field(default="cnn-small", metadata={"help": "architecture of the backdoored model (unless archs)"})
    arch_options: Dict[str, Any] = field(default_factory=dict, metadata={"help": "extra create_model options"})
    archs: Dict[str, ArchEntry] = field(default_factory=dict, metadata={
        "help": "several architectures: name -> {arch, options, teacher} (default: just arch with arch_options)"})
    holdout: int = field(default=5000, metadata={"help": "training images held out from the attacker (paper: 5,000)"})
    n_train: Optional[int] = field(default=None, metadata={"help": "train the attack on this many images (None: all)"})
    n_test: Optional[int] = field(default=None, metadata={"help": "evaluate on this many test images (None: all)"})
    attacks: List[str] = field(default_factory=lambda: ["badnets"], metadata={"help": "registered attack names"})
    attack_options: Dict[str, Dict[str, Any]] = field(default_factory=dict, metadata={"help": "attack -> options"})
    teacher: TeacherOptim = field(default_factory=TeacherOptim)
    attack_teacher: Dict[str, Dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "attack -> overrides of the teacher training, e.g. {inputaware: {epochs: 10}} (applied after the "
                "architecture's)"})
    teacher_augment: AugmentConfig = field(default_factory=AugmentConfig)
    defenses: List[str] = field(default_factory=lambda: ["bcu"], metadata={"help": "registered defense names"})
    defense_options: Dict[str, Dict[str, Any]] = field(default_factory=dict, metadata={"help": "defense -> options"})
    seeds: List[int] = field(default_factory=lambda: [0], metadata={"help": "seeds (data split, attack, init, defense)"})
    unlabeled: List[str] = field(default_factory=lambda: ["in-dist"], metadata={
        "help": "unlabeled sources, each its own column (built-in or defined under sources)"})
    sources: Dict[str, SourceConfig] = field(default_factory=dict, metadata={"help": "name -> source definition"})
    device: str = field(default="cpu", metadata={"help": "torch device"})

    def __post_init__(self) -> None:
        check(self.holdout >= 0, "holdout must be >= 0")
        check_device(self.device, "device")
        for what in ("attacks", "defenses", "seeds", "unlabeled"):
            check(len(getattr(self, what)) > 0, f"{what} must not be empty")
            check(len(set(getattr(self, what))) == len(getattr(self, what)), f"{what} has duplicates")
        for u in self.unlabeled:
            resolve_source(u, self.sources)
        if not self.archs:
            self.archs = {self.arch: ArchEntry(self.arch, dict(self.arch_options))}
        for name, entry in self.archs.items():
            check("__" not in name and "/" not in name, f"archs: {name!r} may not contain '__' or '/'")
            entry.arch = entry.arch or registry_name(name)
            from_dict(TeacherOptim, {**asdict(self.teacher), **entry.teacher}, f"archs.{name}.teacher")
        for name, over in self.attack_teacher.items():
            check(name in self.attacks, f"attack_teacher: {name!r} is not one of the attacks")
            from_dict(TeacherOptim, {**asdict(self.teacher), **over}, f"attack_teacher.{name}")

    def teacher_optim(self, arch: str, attack: str) -> TeacherOptim:
        """The teacher training of one cell: the grid's, then the architecture's, then the attack's overrides."""
        return from_dict(TeacherOptim, {**asdict(self.teacher), **self.archs[arch].teacher,
                                        **self.attack_teacher.get(attack, {})})


def registry_name(name: str) -> str:
    """``bcu@stop`` names a variant of the registered defense ``bcu`` (its options under that key); the
    same holds for attacks (``badnets@line``) and architectures."""
    return name.split("@", 1)[0]


@dataclass(frozen=True)
class Cell:
    arch: str
    attack: str
    defense: str
    unlabeled: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arch}__{self.attack}__{self.defense}__{self.unlabeled}__s{self.seed}"


def load_config(path: str) -> BenchConfig:
    return from_dict(BenchConfig, load_file(path))


def grid(cfg: BenchConfig, attacks: Optional[Sequence[str]] = None, defenses: Optional[Sequence[str]] = None,
         seeds: Optional[Sequence[int]] = None, unlabeled: Optional[Sequence[str]] = None,
         archs: Optional[Sequence[str]] = None) -> List[Cell]:
    """Cells of the config, optionally restricted (filters must name values of the config)."""
    def pick(values, want, what):
        if want is None:
            return list(values)
        bad = [w for w in want if w not in values]
        if bad:
            raise ConfigError(f"--{what} {bad[0]!r} is not in the config's {what} ({', '.join(map(str, values))})")
        return [v for v in values if v in want]

    return [Cell(m, a, d, u, s) for m in pick(list(cfg.archs), archs, "archs")
            for a in pick(cfg.attacks, attacks, "attacks") for s in pick(cfg.seeds, seeds, "seeds")
            for d in pick(cfg.defenses, defenses, "defenses") for u in pick(cfg.unlabeled, unlabeled, "unlabeled")]


# --------------------------------------------------------------------------------------------------
# data, teachers, cells (each worker process rebuilds what it needs; results are deterministic)

_CACHE: Dict[Any, Any] = {}


def _split_data(cfg: BenchConfig, seed: int) -> Tuple[ImageSet, Optional[ImageSet], ImageSet]:
    key = ("data", cfg.data, cfg.holdout, cfg.n_train, cfg.n_test, seed)
    if key not in _CACHE:
        train = load_dataset(cfg.data, "train")
        test = load_dataset(cfg.data, "test")
        if cfg.n_test:
            test = take(test, cfg.n_test, seed=12345)
        holdout = None
        if cfg.holdout:
            train, holdout = split(train, cfg.holdout, seed=seed)
        if cfg.n_train:
            train = take(train, cfg.n_train, seed=seed)
        _CACHE.clear()
        _CACHE[key] = (train, holdout, test)
    return _CACHE[key]


def ensure_teacher(cfg: BenchConfig, out: Path, arch: str, attack_name: str, seed: int, progress: bool = False):
    """(model, attack, scores) of the backdoored model for (arch, attack, seed), trained once and cached."""
    key = f"{arch}__{attack_name}__s{seed}"
    final = out / "teachers" / key
    final.parent.mkdir(parents=True, exist_ok=True)
    with ExclusiveLock(final.with_name(key + ".lock"), f"teacher {final}", wait=True):  # one trainer per teacher
        if not (final / "scores.json").is_file():
            train, _, test = _split_data(cfg, seed)
            k = train.num_classes or 10
            opts = {"seed": seed, **cfg.attack_options.get(attack_name, {})}
            attack = create_attack(registry_name(attack_name), opts, train.shape, k)
            entry = cfg.archs[arch]
            optim = cfg.teacher_optim(arch, attack_name)
            done = train_backdoored(train, attack, entry.arch, optim, cfg.teacher_augment, seed=seed,
                                    device=cfg.device, progress=progress, **entry.options)
            model, seconds = done.model, done.seconds
            s = attack_scores(model, test, attack, cfg.device)
            # staged and renamed like every bcu output (never through a link); a teacher folder left
            # without scores.json is bcu's own (it carries the marker) and is replaced
            with OutputDir(final, overwrite=True, kind="bench-teacher", lock=False) as o:
                save_backdoored(o.path, model, attack, {"attack": attack_name, "seed": seed})
                atomic_write_json(o.path / "scores.json", {**s.as_dict(), "seconds": seconds,
                                                           "train_images": len(train), "arch": arch,
                                                           "attack": attack.describe(),
                                                           "asr_by_class": s.asr_by_class, "teacher": asdict(optim)})
                o.commit()
    model, _ = load_model(final)
    attack = load_attack(final)
    scores = json.loads((final / "scores.json").read_text())
    return model, attack, scores


def source_images(cfg: BenchConfig, out: Path, name: str, seed: int, shape, num_classes: int) -> Optional[ImageSet]:
    _, holdout, _ = _split_data(cfg, seed)
    src = resolve_source(name, cfg.sources)
    data = build_source(src, holdout, shape, seed=seed, num_classes=num_classes, name=name)
    npz = out / "unlabeled" / f"{name}__s{seed}.npz"
    if data is not None and not npz.is_file():
        export_npz(data, npz)
    return data


def cell_command(config_path: str, out: Path, cell: Cell) -> str:
    return (f"bcu bench --config {config_path} --out {out} --archs {cell.arch} --attacks {cell.attack} "
            f"--defenses {cell.defense} --unlabeled {cell.unlabeled} --seeds {cell.seed}")


def run_cell(cfg: BenchConfig, out: Path, cell: Cell, config_path: str, progress: bool = False,
             command: Optional[str] = None) -> Dict[str, Any]:
    """Compute one cell and write its JSON atomically; returns the row (``command``: how to reproduce it,
    default the ``bcu bench`` call of this one cell)."""
    t0 = time.time()
    model, attack, before = ensure_teacher(cfg, out, cell.arch, cell.attack, cell.seed, progress)
    _, _, test = _split_data(cfg, cell.seed)
    cls = DEFENSES.get(registry_name(cell.defense))
    row: Dict[str, Any] = {"arch": cell.arch, "attack": cell.attack, "defense": cell.defense,
                           "unlabeled": cell.unlabeled,
                           "seed": cell.seed, "acc_before": before["acc"], "asr_before": before["asr"],
                           "acc": None, "asr": None, "ra": None, "der": None, "seconds": None,
                           "command": command or cell_command(config_path, out, cell), "status": "ok"}
    data = None
    if cls.uses_data:
        data = source_images(cfg, out, cell.unlabeled, cell.seed, tuple(model.spec.input_shape),
                             model.spec.num_classes)
        if data is None and not getattr(cls, "synthesizes", False):
            row["status"] = "skipped"
            row["reason"] = f"{cell.defense} needs images; source {cell.unlabeled!r} has none"
        elif data is not None and cls.uses_labels and data.labels is None:
            row["status"] = "skipped"
            row["reason"] = f"{cell.defense} needs labels; source {cell.unlabeled!r} has none"
    if row["status"] == "ok":
        defense = create_defense(registry_name(cell.defense), cfg.defense_options.get(cell.defense, {}))
        seeding.manual_seed(cell.seed)
        t1 = time.time()
        result = run_defense(defense, model, data, device=cfg.device, seed=cell.seed, progress=progress)
        row["seconds"] = time.time() - t1
        after = attack_scores(result.model, test, attack, cfg.device)
        row.update(acc=after.acc, asr=after.asr, ra=after.ra,
                   der=der(Scores(before["acc"], before["asr"]), after), asr_by_class=after.asr_by_class)
        row["images"] = len(data) if data is not None else 0
        row["synthesized_images"] = result.info.get("synthesized_images", 0)
        row["labels_used"] = bool(cls.uses_labels and cls.uses_data)
        row["info"] = {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool)) or
                       k in ("pruned", "pruned_channels", "pruned_neurons", "prune_ratio", "t")}
        row["defense_config"] = asdict(defense.config)
    row["cell_seconds"] = time.time() - t0
    atomic_write_json(out / "cells" / f"{cell.key}.json", row)
    return row


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _worker(args):
    cfg, out, cell, config_path, command = args
    return run_cell(cfg, out, cell, config_path, command=command)["status"]


def _teacher_worker(args):
    cfg, out, arch, attack, seed = args
    ensure_teacher(cfg, out, arch, attack, seed)
    return f"{arch}__{attack}__s{seed}"


def run_bench(cfg: BenchConfig, out: Path, *, config_path: str = "CONFIG", workers: int = 1,
              threads: Optional[int] = None, attacks=None, defenses=None, seeds=None, unlabeled=None, archs=None,
              progress: bool = False, teachers_only: bool = False, command=None, log=print) -> Dict[str, Any]:
    """Run every unfinished cell of the (filtered) grid, then write the aggregated outputs
    (``teachers_only``: train the grid's backdoored models and stop; ``command(cell)``: the command line
    recorded in each row, default :func:`cell_command`).

    ``out`` is a bcu work folder (bcu.output.WorkDir): never an input, reused
    only when bcu made it."""
    out = Path(out)
    inputs = [config_path, cfg.data] + [src.path for src in cfg.sources.values() if src.path]
    with WorkDir(out, "bench", inputs=[i for i in inputs if i and os.path.lexists(str(i))]):
        return _run_bench(cfg, out, config_path=config_path, workers=workers, threads=threads, attacks=attacks,
                          defenses=defenses, seeds=seeds, unlabeled=unlabeled, archs=archs, progress=progress,
                          teachers_only=teachers_only, command=command, log=log)


def _run_bench(cfg: BenchConfig, out: Path, *, config_path: str, workers: int, threads: Optional[int], attacks,
               defenses, seeds, unlabeled, archs, progress: bool, teachers_only: bool, command, log) -> Dict[str, Any]:
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cells = grid(cfg, attacks, defenses, seeds, unlabeled, archs)
    missing_attacks = sorted({c.attack for c in cells if registry_name(c.attack) not in ATTACKS})
    missing_defenses = sorted({c.defense for c in cells if registry_name(c.defense) not in DEFENSES})
    for m in missing_attacks:
        log(f"bench: attack {clean(repr(m), 80)} is not registered (yet): its cells are not run")
    for m in missing_defenses:
        log(f"bench: defense {clean(repr(m), 80)} is not registered: its cells are not run")
    runnable = [c for c in cells if registry_name(c.attack) in ATTACKS and registry_name(c.defense) in DEFENSES]
    if teachers_only:
        return _train_teachers(cfg, out, runnable, workers, threads, log)
    todo = [c for c in runnable if not (out / "cells" / f"{c.key}.json").is_file()]
    cached = len(runnable) - len(todo)
    log(f"bench {clean(cfg.name, 80)}: {len(cells)} cells, {cached} finished before, {len(todo)} to run, "
        f"{len(cells) - len(runnable)} not runnable")
    cores = os.cpu_count() or 1
    workers = max(1, int(workers))
    threads = threads or max(1, cores // workers)
    computed = 0
    t0 = time.time()
    if workers == 1 or len(todo) <= 1:
        torch.set_num_threads(threads)
        for c in todo:
            r = run_cell(cfg, out, c, config_path, progress, command(c) if command else None)
            computed += 1
            log(f"  [{computed}/{len(todo)}] {clean(c.key)}: " + (
                f"ACC {r['acc']:.2f} ASR {r['asr']:.2f} DER {r['der']:.2f} ({r['seconds']:.0f}s)"
                if r["status"] == "ok" else r["status"]))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
            triples = sorted({(c.arch, c.attack, c.seed) for c in todo})
            for f in as_completed([pool.submit(_teacher_worker, (cfg, out, m, a, s)) for m, a, s in triples]):
                log(f"  teacher {clean(f.result())} ready")
            futs = {pool.submit(_worker, (cfg, out, c, config_path, command(c) if command else None)): c for c in todo}
            for f in as_completed(futs):
                f.result()
                computed += 1
                log(f"  [{computed}/{len(todo)}] {clean(futs[f].key)} done")
    full = grid(cfg)  # the report covers the whole grid, whatever subset this call ran
    missing = sorted({c.attack for c in full if registry_name(c.attack) not in ATTACKS}) + \
        sorted({c.defense for c in full if registry_name(c.defense) not in DEFENSES})
    rows = collect(out, full)
    write_outputs(out, cfg, rows, full, missing)
    return {"cells": len(cells), "computed": computed, "cached": cached, "rows": len(rows),
            "not_runnable": len(cells) - len(runnable), "seconds": time.time() - t0}


def _train_teachers(cfg: BenchConfig, out: Path, cells: Sequence[Cell], workers: int, threads: Optional[int],
                    log) -> Dict[str, Any]:
    """Train (once) the backdoored model of every (arch, attack, seed) of ``cells``."""
    t0 = time.time()
    triples = sorted({(c.arch, c.attack, c.seed) for c in cells})
    todo = [t for t in triples if not (out / "teachers" / f"{t[0]}__{t[1]}__s{t[2]}" / "scores.json").is_file()]
    log(f"bench {cfg.name}: {len(triples)} teachers, {len(triples) - len(todo)} trained before, {len(todo)} to train")
    workers = max(1, int(workers))
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    if workers == 1 or len(todo) <= 1:
        torch.set_num_threads(threads)
        for t in todo:
            log(f"  teacher {_teacher_worker((cfg, out) + t)} ready")
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            for f in as_completed([pool.submit(_teacher_worker, (cfg, out) + t) for t in todo]):
                log(f"  teacher {f.result()} ready")
    return {"cells": len(cells), "computed": len(todo), "cached": len(triples) - len(todo), "rows": 0,
            "not_runnable": 0, "seconds": time.time() - t0}


# --------------------------------------------------------------------------------------------------
# aggregation


def collect(out: Path, cells: Sequence[Cell]) -> List[Dict[str, Any]]:
    rows = []
    for c in cells:
        f = Path(out) / "cells" / f"{c.key}.json"
        if f.is_file():
            rows.append(json.loads(f.read_text()))
    return rows


def _mean_std(vals: List[float]) -> Tuple[Optional[float], Optional[float]]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def _pm(vals: List[float]) -> str:
    m, s = _mean_std(vals)
    if m is None:
        return "-"
    return f"{m:.2f}" if len(vals) == 1 else f"{m:.2f} ± {s:.2f}"


def summary(rows: List[Dict[str, Any]], attacks: Sequence[str], defenses: Sequence[str]) -> List[str]:
    """Markdown lines: per defense, the mean over attacks of ACC drop, ASR and DER (mean ± std over
    seeds of the per-seed means; a seed counts only when every attack of the table has a cell)."""
    lines = ["Mean over the attacks above (per seed, then mean ± std over seeds):", "",
             "| Defense | labels | seeds | ACC drop | ASR | DER |", "|---|---|---|---|---|---|"]
    present = [a for a in attacks if any(r["attack"] == a for r in rows)]
    for d in defenses:
        per_seed: Dict[int, List[Dict[str, Any]]] = {}
        for r in rows:
            if r["defense"] == d:
                per_seed.setdefault(r["seed"], []).append(r)
        full = {s: rs for s, rs in per_seed.items() if {r["attack"] for r in rs} >= set(present)}
        if not full:
            continue
        name = registry_name(d)
        labels = "yes" if name in DEFENSES and getattr(DEFENSES.get(name), "uses_labels", False) else "no"
        means = [_pm([sum(f(r) for r in rs) / len(rs) for rs in full.values()])
                 for f in (lambda r: r["acc_before"] - r["acc"], lambda r: r["asr"], lambda r: r["der"])]
        lines.append(f"| {d} | {labels} | {len(full)} | " + " | ".join(means) + " |")
    return lines + [""]


def markdown(cfg: BenchConfig, rows: List[Dict[str, Any]], cells: Sequence[Cell], missing: Sequence[str]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    attacks = [a for a in cfg.attacks if any(r["attack"] == a for r in rows)]
    defenses = [d for d in cfg.defenses if any(r["defense"] == d for r in ok)]
    archs = [m for m in cfg.archs if any(r.get("arch", m) == m for r in rows)]
    lines = [f"# Benchmark `{cfg.name}`", "",
             f"{', '.join(archs) or ', '.join(cfg.archs)} on {cfg.data}; seeds "
             f"{', '.join(map(str, sorted({r['seed'] for r in rows})))}; "
             f"ACC / ASR in %, mean ± std over seeds; DER = (max(0, ASR drop) - max(0, ACC drop) + 100) / 2.", ""]
    for m in archs:
        on_arch = [r for r in ok if r.get("arch", m) == m]
        where = f"`{m}`, " if len(cfg.archs) > 1 else ""
        for u in cfg.unlabeled:
            sub = [r for r in on_arch if r["unlabeled"] == u]
            if not sub:
                continue
            ds = [d for d in defenses if any(r["defense"] == d for r in sub)]
            head = ["Attack", "No defense ACC", "ASR"]
            for d in ds:
                head += [f"{d} ACC", "ASR", "DER"]
            lines += [f"## {where}unlabeled source: `{u}`", "", "| " + " | ".join(head) + " |",
                      "|" + "---|" * len(head)]
            for a in attacks:
                ra = [r for r in sub if r["attack"] == a]
                if not ra:
                    continue
                before = {r["seed"]: (r["acc_before"], r["asr_before"]) for r in ra}
                cells_ = [a, _pm([v[0] for v in before.values()]), _pm([v[1] for v in before.values()])]
                for d in ds:
                    rd = [r for r in ra if r["defense"] == d]
                    cells_ += [_pm([r["acc"] for r in rd]), _pm([r["asr"] for r in rd]), _pm([r["der"] for r in rd])]
                lines.append("| " + " | ".join(cells_) + " |")
            lines.append("")
            lines += summary(sub, attacks, ds)
        if len(cfg.unlabeled) > 1:
            head = ["Attack", "Defense"] + [f"{u} ACC / ASR" for u in cfg.unlabeled]
            lines += [f"## {where}by unlabeled source", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for a in attacks:
                for d in defenses:
                    vals = []
                    for u in cfg.unlabeled:
                        rr = [r for r in rows if r.get("arch", m) == m and r["attack"] == a and r["defense"] == d
                              and r["unlabeled"] == u]
                        okr = [r for r in rr if r.get("status") == "ok"]
                        if okr:
                            vals.append(f"{_pm([r['acc'] for r in okr])} / {_pm([r['asr'] for r in okr])}")
                        else:
                            vals.append("n/a (needs labels)" if rr else "not run")
                    lines.append("| " + " | ".join([a, d] + vals) + " |")
            lines.append("")
    done = {(r.get("arch"), r["attack"], r["defense"], r["unlabeled"], r["seed"]) for r in rows}
    pending = [c for c in cells if (c.arch, c.attack, c.defense, c.unlabeled, c.seed) not in done]
    skipped = [r for r in rows if r.get("status") != "ok"]
    if pending or skipped or missing:
        lines += ["## Not run", ""]
        for name in missing:
            lines.append(f"- `{name}` is not registered in this bcu version: its cells were not run.")
        if pending:
            lines.append(f"- {len(pending)} of {len(cells)} cells have no result yet: "
                         + ", ".join(f"`{c.key}`" for c in pending[:40]) + (" ..." if len(pending) > 40 else ""))
        for r in skipped:
            lines.append(f"- `{r.get('arch')}/{r['attack']}/{r['defense']}/{r['unlabeled']}/s{r['seed']}`: "
                         f"{r.get('reason', r['status'])}")
        lines.append("")
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: Path) -> bool:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defenses = list(dict.fromkeys(r["defense"] for r in ok))
    attacks = list(dict.fromkeys(r["attack"] for r in ok))
    cols = min(4, len(defenses))
    nrows = math.ceil(len(defenses) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.0 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, d in enumerate(defenses):
        ax = axes[i // cols][i % cols]
        for j, a in enumerate(attacks):
            rr = [r for r in ok if r["defense"] == d and r["attack"] == a]
            if not rr:
                continue
            c = colors[j % len(colors)]
            ax.scatter([r["asr_before"] for r in rr], [r["acc_before"] for r in rr], marker="x", color=c, alpha=0.5)
            ax.scatter([r["asr"] for r in rr], [r["acc"] for r in rr], marker="o", color=c, label=a)
        ax.set_title(d)
        ax.set_xlim(-3, 103)
        ax.set_xlabel("ASR %")
        ax.set_ylabel("ACC %")
        ax.grid(alpha=0.3)
    for k in range(len(defenses), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7, title="o after, x before", title_fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_outputs(out: Path, cfg: BenchConfig, rows: List[Dict[str, Any]], cells: Sequence[Cell],
                  missing: Sequence[str] = ()) -> None:
    atomic_write_json(out / "results.json", {"config": asdict(cfg), "rows": rows})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ROW_KEYS + ["status"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.md", markdown(cfg, rows, cells, missing))
    # the scatter shows the grid's first (default) unlabeled source; the Markdown has the others
    plot([r for r in rows if r.get("unlabeled") == cfg.unlabeled[0]], out / "acc_asr.png")
