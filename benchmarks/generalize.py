"""The generalization grid: run (or collect) both halves and write docs/results/generalize-fmnist.*.

    python benchmarks/generalize.py --split dev  [--run] [--workers 2]
    python benchmarks/generalize.py --split eval [--run] [--workers 2]   # once, at the end

``--run`` runs ``bcu bench`` on configs/generalize-<split>.yaml (resumable: finished cells are
reused); without it the script only collects the rows already in runs/generalize-<split>/. It then
merges that split's rows into docs/results/generalize-fmnist.json (one object per cell: arch,
attack, split, seed, defense, acc_before, asr_before, acc, asr, ra, der, seconds, command), writes
generalize-fmnist.md (a table per architecture x trigger and the targets) and a heat map of ASR and
ACC drop per cell, and prints a JSON summary with the issue's targets checked on the evaluation half.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List

from bcu.bench import load_config, run_bench
from bcu.output import atomic_write_bytes, atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
KEYS = ["arch", "attack", "split", "seed", "defense", "acc_before", "asr_before", "acc", "asr", "ra", "der", "seconds",
        "command"]
DEFENSES = ["bcu", "bcu@v1", "bcu@paper", "kd"]


def collect(split: str, out: Path) -> List[Dict[str, Any]]:
    f = out / "results.json"
    if not f.is_file():
        return []
    rows = json.loads(f.read_text())["rows"]
    return [{**{k: r.get(k) for k in KEYS if k != "split"}, "split": split, "asr_by_class": r.get("asr_by_class")}
            for r in rows if r.get("status") == "ok"]


def targets(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The issue's targets for bcu's default on one split."""
    mine = [r for r in rows if r["defense"] == "bcu"]
    if not mine:
        return {}
    drops = [r["acc_before"] - r["acc"] for r in mine]
    out = {"cells": len(mine), "mean_asr": sum(r["asr"] for r in mine) / len(mine), "max_asr": max(r["asr"] for r in mine),
           "mean_acc_drop": sum(drops) / len(drops), "max_acc_drop": max(drops),
           "min_teacher_asr": min(r["asr_before"] for r in mine)}
    out["met"] = {"every cell ASR <= 5": out["max_asr"] <= 5, "mean ASR <= 2": out["mean_asr"] <= 2,
                  "mean ACC drop <= 1.5": out["mean_acc_drop"] <= 1.5, "no cell drop > 3": out["max_acc_drop"] <= 3,
                  "teacher ASR >= 90": out["min_teacher_asr"] >= 90}
    out["failing_cells"] = [f"{r['arch']}/{r['attack']}/s{r['seed']}: ASR {r['asr']:.2f}, drop "
                            f"{r['acc_before'] - r['acc']:.2f}, teacher ASR {r['asr_before']:.2f}" for r in mine
                            if r["asr"] > 5 or r["acc_before"] - r["acc"] > 3 or r["asr_before"] < 90]
    return out


def _pm(vals: List[float]) -> str:
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.2f}"
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.2f} ± {s:.2f}"


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["# Generalization grid (Fashion-MNIST)", "",
             "ACC and ASR in %, mean ± std over seeds; `drop` = teacher ACC - ACC. Rows: docs/results/"
             "generalize-fmnist.json (each with the command that reproduces it).", ""]
    for split in ("dev", "eval"):
        sub = [r for r in rows if r["split"] == split]
        if not sub:
            continue
        lines += [f"## {'Development' if split == 'dev' else 'Evaluation'} half", ""]
        defs = [d for d in DEFENSES if any(r["defense"] == d for r in sub)]
        head = ["arch", "trigger", "teacher ACC / ASR"] + [f"{d} drop / ASR" for d in defs]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arch in dict.fromkeys(r["arch"] for r in sub):
            for atk in dict.fromkeys(r["attack"] for r in sub if r["arch"] == arch):
                cell = [r for r in sub if r["arch"] == arch and r["attack"] == atk]
                t = {r["seed"]: r for r in cell}
                before = f"{_pm([r['acc_before'] for r in t.values()])} / {_pm([r['asr_before'] for r in t.values()])}"
                row = [arch, atk, before]
                for d in defs:
                    rd = [r for r in cell if r["defense"] == d]
                    row.append(f"{_pm([r['acc_before'] - r['acc'] for r in rd])} / {_pm([r['asr'] for r in rd])}"
                               if rd else "-")
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines += ["| defense | cells | mean ACC drop | max drop | mean ASR | max ASR |", "|---|---|---|---|---|---|"]
        for d in defs:
            rd = [r for r in sub if r["defense"] == d]
            drops = [r["acc_before"] - r["acc"] for r in rd]
            lines.append(f"| {d} | {len(rd)} | {sum(drops) / len(drops):.2f} | {max(drops):.2f} | "
                         f"{sum(r['asr'] for r in rd) / len(rd):.2f} | {max(r['asr'] for r in rd):.2f} |")
        lines.append("")
        t = targets(sub)
        if t:
            lines += ["bcu's default on this half: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                                             for k, v in t["met"].items()), ""]
            if t["failing_cells"]:
                lines += ["Cells outside a target:", ""] + [f"- {c}" for c in t["failing_cells"]] + [""]
    return "\n".join(lines)


def heatmap(rows: List[Dict[str, Any]], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    splits = [s for s in ("dev", "eval") if any(r["split"] == s for r in rows)]
    defs = [d for d in DEFENSES if any(r["defense"] == d for r in rows)]
    fig, axes = plt.subplots(len(splits), 2 * len(defs), figsize=(3.1 * 2 * len(defs), 2.6 * len(splits) + 0.6),
                             squeeze=False)
    for i, split in enumerate(splits):
        sub = [r for r in rows if r["split"] == split]
        archs = list(dict.fromkeys(r["arch"] for r in sub))
        atks = list(dict.fromkeys(r["attack"] for r in sub))
        for j, d in enumerate(defs):
            for k, (what, f, vmax, cmap) in enumerate((("ASR %", lambda r: r["asr"], 100, "Reds"),
                                                       ("ACC drop", lambda r: r["acc_before"] - r["acc"], 8, "Blues"))):
                m = np.full((len(archs), len(atks)), np.nan)
                for a, arch in enumerate(archs):
                    for t, atk in enumerate(atks):
                        v = [f(r) for r in sub if r["arch"] == arch and r["attack"] == atk and r["defense"] == d]
                        if v:
                            m[a, t] = sum(v) / len(v)
                ax = axes[i][2 * j + k]
                ax.imshow(m, vmin=0, vmax=vmax, cmap=cmap, aspect="auto")
                for a in range(len(archs)):
                    for t in range(len(atks)):
                        if not np.isnan(m[a, t]):
                            ax.text(t, a, f"{m[a, t]:.1f}", ha="center", va="center", fontsize=7)
                ax.set_xticks(range(len(atks)), atks, rotation=60, fontsize=7, ha="right")
                ax.set_yticks(range(len(archs)), archs, fontsize=7)
                ax.set_title(f"{split}: {d} {what}", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=["dev", "eval"], required=True)
    ap.add_argument("--run", action="store_true", help="run the half's bench first (resumable)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    config = f"configs/generalize-{args.split}.yaml"
    out = ROOT / "runs" / f"generalize-{args.split}"
    if args.run:
        run_bench(load_config(str(ROOT / config)), out, config_path=config, workers=args.workers, threads=args.threads)
    rows = collect(args.split, out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / "generalize-fmnist.json"
    old = json.loads(dest.read_text()) if dest.is_file() else []
    merged = [r for r in old if r["split"] != args.split] + rows
    merged.sort(key=lambda r: (r["split"] != "dev", r["arch"], r["attack"], r["defense"], r["seed"]))
    atomic_write_json(dest, merged)
    atomic_write_text(RESULTS / "generalize-fmnist.md", markdown(merged) + "\n")
    heatmap(merged, RESULTS / "generalize-fmnist.png")
    print(json.dumps({split: targets([r for r in merged if r["split"] == split]) for split in ("dev", "eval")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
