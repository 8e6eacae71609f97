"""The method study on the DEVELOPMENT half of the generalization grid (docs/method.md, section 11).

Cleanses the development half's stored teachers (configs/generalize-dev.yaml, trained once by
``bcu bench --config configs/generalize-dev.yaml --teachers-only``) with named bcu variants from
benchmarks/study_variants.yaml, and prints one line per cell plus a summary per variant. The
evaluation half is never touched here.

    python benchmarks/generalize_study.py --variants v1,adv4 --seeds 0 [--archs cnn-small] [--attacks badnets]

Rows go to runs/generalize-dev-study/ (teachers are shared with runs/generalize-dev/ through a link);
``--json FILE`` appends them to a JSON list (docs/results/generalize-dev-study.json), each with the
command that reproduces it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import yaml

from bcu.bench import load_config, run_bench
from bcu.output import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
VARIANTS_FILE = ROOT / "benchmarks" / "study_variants.yaml"


def variants() -> Dict[str, Dict[str, Any]]:
    return yaml.safe_load(VARIANTS_FILE.read_text()) or {}


def collect(out: Path, dest: Path) -> int:
    """Every finished study cell of ``out`` as one JSON row (with the command that reproduces it)."""
    table = variants()
    rows = []
    for f in sorted((out / "cells").glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("status") != "ok" or not r["defense"].startswith("bcu@"):
            continue
        name = r["defense"][4:]
        rows.append({k: r.get(k) for k in ("arch", "attack", "seed", "defense", "acc_before", "asr_before", "acc",
                                           "asr", "ra", "der", "seconds", "command")}
                    | {"split": "dev", "variant": name, "options": table.get(name)})
    rows.sort(key=lambda r: (r["arch"], r["attack"], r["variant"], r["seed"]))
    atomic_write_json(dest, rows)
    md = ["| arch | attack | variant | seed | teacher ACC / ASR | ACC drop | ASR | s |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['arch']} | {r['attack']} | {r['variant']} | {r['seed']} | {r['acc_before']:.2f} / {r['asr_before']:.2f} "
           f"| {r['acc_before'] - r['acc']:.2f} | {r['asr']:.2f} | {r['seconds']:.0f} |" for r in rows]
    atomic_write_text(dest.with_suffix(".md"), "\n".join(md) + "\n")
    print(f"{len(rows)} rows -> {dest} (+ {dest.with_suffix('.md').name})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/generalize-dev.yaml")
    ap.add_argument("--teachers", default="runs/generalize-dev", help="bench run whose teachers/ are reused")
    ap.add_argument("--out", default="runs/generalize-dev-study")
    ap.add_argument("--variants", required=True, help="comma-separated names from benchmarks/study_variants.yaml")
    ap.add_argument("--archs")
    ap.add_argument("--attacks")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="append the rows to this JSON list (created if missing)")
    ap.add_argument("--collect", metavar="JSON", help="run nothing: write every finished cell of --out to this JSON "
                    "list (docs/results/generalize-dev-study.json) and a Markdown table next to it")
    args = ap.parse_args(argv)
    if args.collect:
        return collect(Path(args.out), Path(args.collect))
    cfg = load_config(args.config)
    if "eval" in cfg.name:
        raise SystemExit("the study runs on the development half only")
    table = variants()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r} (in {VARIANTS_FILE.name}: {', '.join(table)})")
    cfg.defenses = [f"bcu@{n}" for n in names]
    cfg.defense_options = {f"bcu@{n}": table[n] for n in names}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    link = out / "teachers"
    if not link.exists():
        os.symlink(Path(args.teachers).resolve() / "teachers", link, target_is_directory=True)
    split_ = (lambda t: [v.strip() for v in t.split(",") if v.strip()] if t else None)

    def command(cell) -> str:
        return (f"python benchmarks/generalize_study.py --variants {cell.defense.split('@', 1)[1]} "
                f"--archs {cell.arch} --attacks {cell.attack} --seeds {cell.seed}")

    run_bench(cfg, out, config_path=args.config, workers=args.workers, threads=args.threads,
              archs=split_(args.archs), attacks=split_(args.attacks), seeds=[int(s) for s in split_(args.seeds)],
              command=command)
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"]
            if r["defense"] in cfg.defenses and r.get("status") == "ok"]
    want = {(a, t, s) for a in (split_(args.archs) or cfg.archs) for t in (split_(args.attacks) or cfg.attacks)
            for s in map(int, split_(args.seeds))}
    rows = [r for r in rows if (r["arch"], r["attack"], r["seed"]) in want]
    for n in names:
        rs = [r for r in rows if r["defense"] == f"bcu@{n}"]
        if rs:
            drop = [r["acc_before"] - r["acc"] for r in rs]
            print(json.dumps({"variant": n, "cells": len(rs), "mean_asr": round(sum(r["asr"] for r in rs) / len(rs), 2),
                              "max_asr": round(max(r["asr"] for r in rs), 2), "mean_drop": round(sum(drop) / len(rs), 2),
                              "max_drop": round(max(drop), 2)}), flush=True)
    if args.json:
        p = Path(args.json)
        old: List[Dict[str, Any]] = json.loads(p.read_text()) if p.is_file() else []
        keep = {(r["arch"], r["attack"], r["defense"], r["seed"]) for r in rows}
        merged = [r for r in old if (r["arch"], r["attack"], r["defense"], r["seed"]) not in keep] + [
            {k: r.get(k) for k in ("arch", "attack", "seed", "defense", "acc_before", "asr_before", "acc", "asr",
                                   "ra", "der", "seconds", "asr_by_class", "command")} | {"split": "dev",
                                                                                         "variant": table[r["defense"][4:]]}
            for r in rows]
        atomic_write_json(p, merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
