"""Reports a person would rather read: JSON for machines, Markdown and PNG plots for people."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

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


# --------------------------------------------------------------------------------------------------
# the model card: README.md next to a cleansed model, in the Hugging Face Hub's format

CARD_NAME = "README.md"


def _scan_table(scans: Mapping[str, Mapping[str, Any]]) -> str:
    """Per class: the smallest stamp that flips the other images to it, teacher vs cleansed."""
    who = list(scans)
    rows = []
    for k, c in enumerate(scans[who[0]]["classes"]):
        cells = [c["name"]]
        for w in who:
            ck = scans[w]["classes"][k]
            cells += ["-" if ck["l1"] is None else f"{ck['l1']:.1f}", "-" if ck["ratio"] is None else f"{ck['ratio']:.1f}"]
        rows.append(cells)
    headers = ["class"] + [h for w in who for h in (f"{w}: stamp px", f"{w}: size ratio")]
    flagged = ["flagged"] + [v for w in who for v in (
        "none" if scans[w]["flagged"] is None else scans[w]["classes"][scans[w]["flagged"]]["name"], "")]
    return markdown_table(headers, rows + [flagged])


def card_front_matter(report: Mapping[str, Any]) -> Dict[str, Any]:
    """The YAML header of the card: the Hub's fields (library_name, tags, base_model, pipeline_tag) and
    bcu's own (the weights' SHA-256, which ``bcu verify`` checks against the weights)."""
    spec = report.get("model") or {}
    arch = str(spec.get("arch", ""))
    tags = ["bcu", "backdoor-removal", "image-classification"]
    if ":" in arch:
        tags.append(arch.split(":", 1)[0])
    scan_after = (report.get("scan") or {}).get("cleansed")
    return {"library_name": "bcu", "pipeline_tag": "image-classification", "tags": tags,
            "base_model": f"sha256:{report['input']['sha256']}",
            "bcu": {"model_sha256": report["output"]["sha256"], "teacher_sha256": report["input"]["sha256"],
                    "bcu_version": report.get("bcu_version"), "method": "bcu (Pang et al., CVPR 2023)",
                    "arch": arch, "num_classes": spec.get("num_classes"),
                    "input_shape": list(spec.get("input_shape") or []), "labels_read": False,
                    "scan_flagged": None if scan_after is None else scan_after["flagged"]}}


def model_card(report: Mapping[str, Any]) -> str:
    """The card's text: front matter, then what was done, the settings, the evidence, the limitations."""
    meta = card_front_matter(report)
    cfg = report.get("config") or {}
    optim, reinit, distill = cfg.get("optim", {}), cfg.get("reinit", {}), cfg.get("distill", {})
    spec = report.get("model") or {}
    inp = report["input"]
    md = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
          f"# {spec.get('arch', 'model')}, cleansed of backdoors by bcu", "",
          "## What was done", "",
          (f"The input model (SHA-256 `{inp['sha256']}`) was cleansed with bcu, *Backdoor Cleansing with "
           f"Unlabeled Data* (Pang et al., CVPR 2023): a copy of it (the student) had a fraction of its weights "
           f"re-initialised, layer by layer (few in early layers, many in deep ones), and was then trained to "
           f"match the input model's outputs (knowledge distillation) on "
           + (f"{inp['images']} unlabeled images (`{inp['data']}`)" if inp.get("data_sha256") else
              f"{report.get('synthesized_images', 0)} images synthesized from the model itself")
           + ". No label was read. The weights here are the student's "
           f"(SHA-256 `{report['output']['sha256']}`)."), "",
          "## Settings", "",
          markdown_table(["setting", "value"], [
              ["architecture", f"`{spec.get('arch')}`" + (f" {json.dumps(spec['kwargs'])}" if spec.get('kwargs') else "")],
              ["input", f"{'x'.join(map(str, spec.get('input_shape', [])))}, mean {list(spec.get('mean', []))}, "
                        f"std {list(spec.get('std', []))}"],
              ["epochs run", f"{report.get('epochs_run')} of {optim.get('epochs')}"],
              ["batch size, learning rate", f"{optim.get('batch_size')}, {optim.get('lr')}"],
              ["re-initialisation", f"stem {reinit.get('stem')}, stages {reinit.get('stages')}, head "
                                    f"{reinit.get('head')}, x{reinit.get('scale')} (max {reinit.get('max_ratio')})"],
              ["distillation", f"T {distill.get('t_start')} -> {distill.get('t_end')}, noise blend "
                               f"{distill.get('noise_blend')}, warp {distill.get('warp')}"],
              ["seed", cfg.get("seed")],
              ["command", f"`{report.get('command')}`"]]), ""]
    md += ["## Before and after", ""]
    if report.get("scores"):
        md += [scores_table(report["scores"]), ""]
        if report.get("der") is not None:
            md += [f"DER (defense effectiveness rating): {report['der']:.2f} %", ""]
    else:
        md += ["Not measured: no labelled test set was given (`bcu cleanse --test-data ... --attack ...`).", ""]
    md += ["## Evidence that holds without labels", ""]
    history = report.get("history") or []
    if history:
        last = history[-1]
        agree = last.get("monitor_agree", last.get("agree"))
        md += [f"- Teacher/student agreement in the last epoch: {fmt(agree)} % of the "
               f"{'held-out ' if 'monitor_agree' in last else ''}unlabeled images get the same class from both "
               f"(the clean behaviour was transferred; it says nothing about a trigger by itself)."]
    scans = report.get("scan")
    if scans:
        md += ["- Label-free trigger scan (Neural Cleanse with the model's own predictions, `bcu scan`): per "
               "class, the smallest stamp (mask x pattern, optimised on the unlabeled images) that flips almost "
               "all other images to it; a class whose stamp is far smaller than the others' is flagged.", "",
               _scan_table(scans), ""]
    else:
        md += ["- The label-free trigger scan was not run (`bcu cleanse --scan`, or `bcu scan --model THIS "
               "--data IMAGES`)."]
    diag = report.get("data_diagnosis")
    md += ["", "## The unlabeled images, diagnosed before the cleanse", ""]
    if diag:
        md += [diagnosis_table(diag), ""] + [f"**Warning:** {w}" for w in diag.get("warnings", [])]
    else:
        md += ["No images were given: nothing to diagnose."]
    md += ["", "## Limitations", "",
           "- bcu removes what the unlabeled images do not exercise. A backdoor can survive, in particular when "
           "the images are few, of another kind than the training data, or miss classes (see the diagnosis).",
           "- Without labels and the trigger, nothing here proves that the model is clean. The scan finds "
           "small-stamp triggers; it can miss blended, warped or sample-specific ones, and it can flag a clean "
           "class that is easy to reach.",
           "- Accuracy can drop by a few points; the before/after table measures it only when labelled data was "
           "given.", "",
           "## Use", "",
           "```python", "import bcu", "model, info = bcu.load_model(\"THIS_FOLDER\")   # checks the SHA-256",
           "```"]
    if spec.get("format") == "hub":
        md += ["", "The folder is also in timm's Hub layout: `timm.create_model('local-dir:THIS_FOLDER', "
               "pretrained=True)` loads it (the network only; normalise inputs with the mean/std above)."]
    md += ["", "`bcu verify THIS_FOLDER` checks the weights against `model.json` and this card."]
    return "\n".join(md) + "\n"


def write_model_card(out: Path, report: Mapping[str, Any]) -> None:
    """``README.md`` in ``out``, the folder of the cleansed model."""
    atomic_write_text(out / CARD_NAME, model_card(report))
