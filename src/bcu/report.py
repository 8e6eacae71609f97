"""Reports a person would rather read: JSON for machines, Markdown and PNG plots for people."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .output import atomic_write_bytes, atomic_write_json, atomic_write_text


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def scores_table(named: Mapping[str, Mapping[str, Optional[float]]]) -> str:
    """``{"teacher": {"acc":..,"asr":..,"ra":..}, ...}`` as a Markdown table."""
    return markdown_table(["model", "ACC %", "ASR %", "RA %"],
                          [[k, v.get("acc"), v.get("asr"), v.get("ra")] for k, v in named.items()])


def plot_curves(history: List[Dict[str, Any]], path: Path, title: str = "distillation") -> bool:
    """Loss and teacher/student agreement per epoch into a PNG; False when there is nothing to plot."""
    if not history:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax1.plot(ep, [h.get("loss") for h in history], color="#c0392b", label="distillation loss (train)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("KL(teacher || student)", color="#c0392b")
    ax1.grid(alpha=0.3)
    ax2 = ax1.twinx()
    if "agree" in history[0]:
        ax2.plot(ep, [h["agree"] for h in history], color="#2980b9", alpha=0.6, label="agreement (train batches)")
    if "monitor_agree" in history[0]:
        ax2.plot(ep, [h["monitor_agree"] for h in history], color="#1a5276", label="agreement (watched slice)")
    ax2.set_ylabel("teacher/student agreement %", color="#1a5276")
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax1.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax1.legend(lines, labels, loc="center right", fontsize=8)
    ax1.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def layers_table(layers: List[Dict[str, Any]]) -> str:
    return markdown_table(["layer", "type", "stage", "ratio", "params", "dropped %"],
                          [[l["name"], l["kind"], l["stage"], f"{l['ratio']:.3f}", l["params"],
                            f"{100 * l['dropped_fraction']:.1f}"] for l in layers])


def diagnosis_table(diag: Dict[str, Any]) -> str:
    """The label-free diagnosis (bcu.diagnose) as a Markdown table."""
    rows = [("images diagnosed", str(diag["images"])),
            ("classes the model predicts on them", f"{sum(1 for c in diag['predicted'] if c > 0)} of {diag['num_classes']}"),
            ("effective number of classes", f"{diag['effective_classes']:.2f} (of {diag['num_classes']})"),
            ("classes they cannot teach", ", ".join(map(str, diag["untaught"])) or "none"),
            ("mean confidence (top-1 probability)", f"{diag['confidence']:.3f}")]
    if diag.get("bn_shift") is not None:
        rows.append(("BatchNorm statistics shift (mean KL)", f"{diag['bn_shift']:.3f}"))
    rows.append(("verdict", "suited" if diag.get("ok") else "see the warnings"))
    return "\n".join(["| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def write_cleanse_report(out: Path, report: Dict[str, Any], history: List[Dict[str, Any]]) -> None:
    """report.json, report.md and curves.png in ``out``."""
    atomic_write_json(out / "report.json", report)
    has_plot = plot_curves(history, out / "curves.png", "bcu cleanse: distillation on unlabeled images")
    md = ["# bcu cleanse report", ""]
    if report.get("scores"):
        md += ["## Before and after", "", scores_table(report["scores"]), ""]
        if report.get("der") is not None:
            md += [f"DER: {report['der']:.2f} %", ""]
    md += ["## Run", "",
           f"- input model: `{report['input']['model']}` (sha256 `{report['input']['sha256'][:16]}…`)",
           (f"- unlabeled images: {report['input']['images']} from `{report['input']['data']}` "
            f"(manifest sha256 `{report['input']['data_sha256'][:16]}…`); labels read: none"
            if report['input'].get('data_sha256') else
            f"- no unlabeled images: {report.get('synthesized_images', 0)} synthesized from the model; labels read: none"),
           f"- output model sha256 `{report['output']['sha256'][:16]}…`",
           f"- epochs run: {report['epochs_run']} of {report['config']['optim']['epochs']}"
           + (" (stopped by the label-free rule)" if report.get("stopped_early") else ""),
           f"- seconds: {report['seconds']:.1f}", ""]
    diag = report.get("data_diagnosis")
    if diag:
        md += ["## The unlabeled images, diagnosed before the cleanse", "", diagnosis_table(diag), ""]
        md += [f"**Warning:** {w}" for w in diag.get("warnings", [])] + ([""] if diag.get("warnings") else [])
    if has_plot:
        md += ["## Distillation", "", "![loss and agreement per epoch](curves.png)", ""]
    if history:
        last = history[-1]
        agree = fmt(last.get("monitor_agree", last.get("agree")))
        md += [f"Final epoch: loss {fmt(last.get('loss'), 4)}, agreement {agree} %.", ""]
    if report.get("layers"):
        md += ["## Re-initialised layers", "", layers_table(report["layers"]), ""]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
