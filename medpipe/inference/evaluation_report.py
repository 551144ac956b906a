"""An evaluation record rendered for people: Markdown, HTML and the ROC curve as PNG.

The record is what :mod:`medpipe.inference.evaluate` writes as ``evaluation.json``; these
functions only format it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from .metrics import roc_points

__all__ = ["html_classification", "html_masks", "markdown_classification", "markdown_masks", "roc_png"]


def roc_png(y_true: np.ndarray, scores: np.ndarray, title: str) -> bytes:
    """PNG of the ROC curve (needs both classes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fpr, tpr, auc = roc_points(y_true, scores)
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown_classification(rec: dict[str, Any]) -> str:
    m = rec["metrics"]
    lines = [
        f"# {rec['title']}", "",
        f"Model: {_model_line(rec)}  ",
        f"Study score: {rec['rule']}, threshold {m['threshold']}", "",
        "| studies | positives | accuracy | precision | recall | F1 | ROC AUC |", "|---|---|---|---|---|---|---|",
        f"| {m['n']} | {m['positives']} | {_fmt(m['accuracy'])} | {_fmt(m['precision'])} | {_fmt(m['recall'])} "
        f"| {_fmt(m['f1'])} | {_fmt(m['roc_auc'])} |", "",
        f"Confusion: TP {m['confusion']['tp']}, FP {m['confusion']['fp']}, TN {m['confusion']['tn']}, "
        f"FN {m['confusion']['fn']}.", "",
    ]
    if rec["roc_png"]:
        lines += ["![ROC curve](roc.png)", ""]
    return "\n".join(lines + _not_evaluated(rec, "a label")) + "\n"


def html_classification(rec: dict[str, Any]) -> str:
    from html import escape

    m = rec["metrics"]
    cells = "".join(f"<td>{_fmt(m[k])}</td>" for k in ("n", "positives", "accuracy", "precision", "recall", "f1",
                                                         "roc_auc"))
    rows = "".join(f"<tr><td>{escape(r['study'])}</td><td>{r['label']}</td><td>{r['score']:.3f}</td>"
                   f"<td>{escape(str(r['predicted']))}</td></tr>" for r in rec["studies"])
    roc = '<img src="roc.png" alt="ROC curve">' if rec["roc_png"] else ""
    return (f"<!doctype html><meta charset='utf-8'><title>{escape(rec['title'])}</title>"
            f"<h1>{escape(rec['title'])}</h1><p>Model {escape(rec['model']['name'])} "
            f"{escape(rec['model']['version'])}; {escape(str(rec['rule']))}, threshold {m['threshold']}</p>"
            "<table border=1><tr><th>studies</th><th>positives</th><th>accuracy</th><th>precision</th>"
            f"<th>recall</th><th>F1</th><th>ROC AUC</th></tr><tr>{cells}</tr></table>{roc}"
            "<h2>Studies</h2><table border=1><tr><th>study</th><th>label</th><th>score</th><th>predicted</th></tr>"
            f"{rows}</table>\n")


def _not_evaluated(rec: dict[str, Any], reference: str) -> list[str]:
    """Markdown lines for the studies that errored or had no reference."""
    lines = []
    if rec["errors"]:
        lines += [f"Not evaluated ({len(rec['errors'])}):"] + [f"- {e['study']}: {e['error']}" for e in rec["errors"]]
    if rec["unlabelled"]:
        lines += [f"Studies without {reference}: {len(rec['unlabelled'])}."]
    return lines


def _model_line(rec: dict[str, Any]) -> str:
    return f"{rec['model']['name']} {rec['model']['version']} (sha256 {rec['model']['sha256'][:16]}...)"


def markdown_masks(rec: dict[str, Any]) -> str:
    m = rec["metrics"]
    lines = [
        f"# {rec['title']}", "", f"Model: {_model_line(rec)}, segmentation", "",
        "| studies | mean Dice | median Dice | mean precision | mean recall |", "|---|---|---|---|---|",
        f"| {m['n']} | {_fmt(m['dice_mean'])} | {_fmt(m['dice_median'])} | {_fmt(m['precision_mean'])} "
        f"| {_fmt(m['recall_mean'])} |", "",
    ]
    if m.get("labels"):
        lines += ["| label | studies | mean Dice | median Dice |", "|---|---|---|---|"]
        lines += [f"| {n} | {v['n']} | {_fmt(v['mean'])} | {_fmt(v['median'])} |" for n, v in m["labels"].items()]
        lines += [""]
    lines += ["| study | Dice | precision | recall | reference voxels | predicted voxels |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['study']} | {_fmt(r['dice'])} | {_fmt(r['precision'])} | {_fmt(r['recall'])} "
              f"| {r['voxels_reference']} | {r['voxels_predicted']} |" for r in rec["studies"]]
    lines += [""]
    return "\n".join(lines + _not_evaluated(rec, "a reference mask")) + "\n"


def html_masks(rec: dict[str, Any]) -> str:
    from html import escape

    m = rec["metrics"]
    head = "".join(f"<td>{_fmt(m[k])}</td>" for k in ("n", "dice_mean", "dice_median", "precision_mean",
                                                        "recall_mean"))
    per_label = ""
    if m.get("labels"):
        per_label = ("<h2>Labels</h2><table border=1><tr><th>label</th><th>studies</th><th>mean Dice</th>"
                     "<th>median Dice</th></tr>" +
                     "".join(f"<tr><td>{escape(n)}</td><td>{v['n']}</td><td>{_fmt(v['mean'])}</td>"
                             f"<td>{_fmt(v['median'])}</td></tr>" for n, v in m["labels"].items()) + "</table>")
    rows = "".join(f"<tr><td>{escape(r['study'])}</td><td>{_fmt(r['dice'])}</td><td>{_fmt(r['precision'])}</td>"
                   f"<td>{_fmt(r['recall'])}</td><td>{r['voxels_reference']}</td><td>{r['voxels_predicted']}</td>"
                   "</tr>" for r in rec["studies"])
    errors = "".join(f"<li>{escape(e['study'])}: {escape(e['error'])}</li>" for e in rec["errors"])
    return (f"<!doctype html><meta charset='utf-8'><title>{escape(rec['title'])}</title>"
            f"<h1>{escape(rec['title'])}</h1><p>Model {escape(_model_line(rec))}, segmentation</p>"
            "<table border=1><tr><th>studies</th><th>mean Dice</th><th>median Dice</th><th>mean precision</th>"
            f"<th>mean recall</th></tr><tr>{head}</tr></table>{per_label}"
            "<h2>Studies</h2><table border=1><tr><th>study</th><th>Dice</th><th>precision</th><th>recall</th>"
            f"<th>reference voxels</th><th>predicted voxels</th></tr>{rows}</table>"
            + (f"<h2>Not evaluated</h2><ul>{errors}</ul>" if errors else "") + "\n")
