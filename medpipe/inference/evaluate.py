"""Evaluate a model over a labelled archive: metrics, ROC curve and a short report.

Labels file
-----------
Maps a study to 0 (no lesion) or 1 (lesion); studies are named by StudyInstanceUID, by
medpipe study key (the folder name under ``OUT/studies/``) or, for a folder of ingested
studies, by folder name.

* CSV with a header row and the columns ``study,label``::

      study,label
      1.2.826.0.1.3680043.8.498.1,1
      phantom-10000-001,0

* JSON: an object ``{"<study>": 0 or 1, ...}``.

Reference masks (segmentation models)
-------------------------------------
For a model whose ``model.output`` is ``segmentation``, the labels file instead maps each
study to a reference mask file, a path relative to the labels file: CSV with the columns
``study,mask`` (or ``study,label``), or JSON ``{"<study>": "masks/a.npy", ...}``. A mask is a
``.npy`` array or a Zarr array, or an OME-Zarr label image (read at level ``0``), of shape
(z, y, x) in the ingested voxel order, i.e. the shape of the study's ``image.zarr``. With a
binary model any non-zero voxel is foreground; with several model labels
(``model.labels = [background, a, b, ...]``) mask values 1, 2, ... are the labels a, b, ... and
each is scored too. The evaluation reports per-study Dice, voxel precision and recall against
the model's mask (``image.zarr/labels/model``) and the mean and median Dice over studies; a
study whose mask shape differs from its image is listed as an error.

Archive
-------
Either a folder of ingested studies (``<study>/image.zarr``, as written by the pipeline or by
:func:`make_labelled_volumes`), or a DICOM archive that is ingested first with
:mod:`medpipe.ingest` into ``out_dir/studies``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes, write_json, write_text
from ..config import Config
from ..errors import InputError, MedpipeError, StudyError
from ..keys import study_key
from .data import make_labelled_volumes
from .dice import mask_counts, overlap_scores, read_mask
from .stage import infer_study

log = logging.getLogger(__name__)

__all__ = ["binary_metrics", "evaluate_archive", "evaluate_masks", "evaluate_studies", "make_labelled_volumes",
           "read_labels_file", "read_mask_labels"]


def _read_study_table(path: Path, columns: tuple[str, ...], what: str) -> list[tuple[str, Any]]:
    """``(study, value)`` rows of a CSV with a ``study`` column and the first of ``columns``, or
    of a JSON object mapping study to value."""
    if not path.is_file():
        raise InputError(path, "labels file not found")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"JSON labels must be an object mapping study to {what}")
            return [(str(k).strip(), v) for k, v in raw.items()]
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            col = next((c for c in columns if c in (reader.fieldnames or [])), None)
            if "study" not in (reader.fieldnames or []) or col is None:
                raise ValueError(f"CSV labels need a header with the columns study,{columns[0]}")
            return [(row["study"].strip(), row[col]) for row in reader]
    except (ValueError, KeyError) as exc:
        raise InputError(path, f"unreadable labels: {exc}") from None


def read_labels_file(path: str | Path) -> dict[str, int]:
    """Read a labels file (CSV ``study,label`` or JSON mapping) into ``{study: 0|1}``."""
    path = Path(path)
    items = _read_study_table(path, ("label",), "0/1")
    try:
        labels = {k: int(v) for k, v in items}
    except (ValueError, TypeError) as exc:
        raise InputError(path, f"unreadable labels: {exc}") from None
    bad = sorted(k for k, v in labels.items() if v not in (0, 1))
    if bad:
        raise InputError(path, f"labels must be 0 or 1; not so for {bad[:5]}")
    return labels


def read_mask_labels(path: str | Path) -> dict[str, Path]:
    """Read a labels file that names reference masks (CSV ``study,mask`` or JSON) into ``{study: path}``.

    Relative mask paths are taken relative to the labels file's folder; whether the masks
    exist is checked per study during evaluation.
    """
    path = Path(path)
    items = _read_study_table(path, ("mask", "label"), "a mask path")
    bad = sorted(k for k, v in items if not isinstance(v, str) or not v.strip())
    if bad:
        raise InputError(path, f"a segmentation model needs a mask path per study; not so for {bad[:5]}")
    return {k: path.parent / v.strip() for k, v in items}


def binary_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, ROC AUC and confusion counts of scores at ``threshold``.

    >>> m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]))
    >>> m["accuracy"], m["roc_auc"]
    (0.75, 1.0)
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, int)
    scores = np.asarray(scores, float)
    y_pred = (scores >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both = len(np.unique(y_true)) == 2
    return {
        "n": int(y_true.size), "positives": int(y_true.sum()), "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, scores)) if both else None,
        "confusion": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
    }


def roc_png(y_true: np.ndarray, scores: np.ndarray, title: str) -> bytes:
    """PNG of the ROC curve (needs both classes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y_true, scores)
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {roc_auc_score(y_true, scores):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _match(labels: dict[str, Any], key: str, uid: str | None, salt: str) -> Any:
    for name in (key, uid):
        if name is not None and name in labels:
            return labels[name]
    hashed = {study_key(k, salt): v for k, v in labels.items()}
    return hashed.get(key)


def evaluate_studies(
    studies: dict[str, Path], labels: dict[str, int], out_dir: str | Path, cfg: Config,
    *, uids: dict[str, str] | None = None, title: str = "evaluation",
) -> dict[str, Any]:
    """Run :func:`infer_study` on ingested ``studies`` ({key: folder}) and score them against ``labels``.

    Writes ``evaluation.json``, ``evaluation.md``, ``evaluation.html`` and ``roc.png`` into
    ``out_dir`` and returns the evaluation record.
    """
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    rows, errors, unlabelled = [], [], []
    for key, folder in sorted(studies.items()):
        truth = _match(labels, key, (uids or {}).get(key), cfg.ingest.uid_salt)
        if truth is None:
            unlabelled.append(key)
            continue
        modality = _modality(folder)
        try:
            res = infer_study(folder, modality, cfg)
        except MedpipeError as exc:
            errors.append({"study": key, "error": str(exc)})
            continue
        if "skipped" in res or res.get("study_score") is None:
            errors.append({"study": key, "error": res.get("skipped") or "; ".join(res.get("flags", []))})
            continue
        rows.append({"study": key, "label": truth, "score": res["study_score"], "predicted": res["study_label"],
                     "flags": res["flags"]})
        last = res
    if not rows:
        first = f"; first error: {errors[0]['study']}: {errors[0]['error']}" if errors else ""
        raise InputError(out_dir, f"no labelled study could be evaluated ({len(errors)} errors, "
                                  f"{len(unlabelled)} unlabelled){first}")
    y = np.array([r["label"] for r in rows])
    s = np.array([r["score"] for r in rows])
    metrics = binary_metrics(y, s, last["threshold"])
    record = {
        "title": title, "model": last["model"], "rule": last["rule"], "metrics": metrics,
        "studies": rows, "errors": errors, "unlabelled": unlabelled,
        "roc_png": "roc.png" if metrics["roc_auc"] is not None else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if record["roc_png"]:
        write_bytes(out_dir / "roc.png", roc_png(y, s, title))
    write_json(out_dir / "evaluation.json", record)
    md = _markdown(record)
    write_text(out_dir / "evaluation.md", md)
    write_text(out_dir / "evaluation.html", _html(record))
    return record


def _mask_names(labels: list[str]) -> dict[int, str]:
    """Label values of a multi-label model ({} for a binary one: any non-zero is foreground)."""
    return {i: name for i, name in enumerate(labels) if i > 0} if len(labels) > 2 else {}


def _study_overlap(key: str, folder: Path, mask_path: Path, cfg: Config) -> dict[str, Any]:
    """Infer one study and score its model mask against ``mask_path``; raises MedpipeError."""
    from .. import omezarr

    try:
        reference = read_mask(mask_path)
    except (OSError, ValueError) as exc:  # the message names the mask file
        raise StudyError(key, f"unreadable reference mask: {exc}") from None
    try:
        image_shape = tuple(omezarr.read_meta(folder / "image.zarr").shape)
    except Exception as exc:
        raise StudyError(key, f"cannot read image.zarr: {exc}") from None
    if tuple(reference.shape) != image_shape:  # checked before inference: no time spent on it
        raise StudyError(key, f"reference mask {mask_path} has shape {tuple(reference.shape)}, "
                              f"the prediction has shape {image_shape}")
    res = infer_study(folder, _modality(folder), cfg)
    if "skipped" in res:
        raise StudyError(key, res["skipped"])
    names = _mask_names(cfg.model.labels)
    prediction = read_mask(folder / "image.zarr" / "labels" / "model")
    scores = overlap_scores(mask_counts(reference, prediction, max(1, len(names))), names)
    return {"study": key, "mask": str(mask_path), **scores, "flags": res["flags"], "model": res["model"]}


def _summary(values: list[float | None]) -> dict[str, Any]:
    v = np.array([x for x in values if x is not None], float)
    return {"n": int(v.size), "mean": float(v.mean()) if v.size else None,
            "median": float(np.median(v)) if v.size else None}


def evaluate_masks(
    studies: dict[str, Path], masks: dict[str, Path], out_dir: str | Path, cfg: Config,
    *, uids: dict[str, str] | None = None, title: str = "evaluation",
) -> dict[str, Any]:
    """Run a segmentation model on ingested ``studies`` ({key: folder}) and score its masks by Dice.

    Parameters
    ----------
    studies : dict of str to Path
        Study key to the study folder holding ``image.zarr``.
    masks : dict of str to Path
        Study (key, StudyInstanceUID or folder name) to its reference mask (see the module
        docstring for the formats).
    out_dir : str or Path
        Receives ``evaluation.json``, ``evaluation.md`` and ``evaluation.html``.
    cfg : Config
        ``cfg.model`` must describe a segmentation model.
    uids, title
        As in :func:`evaluate_studies`.

    Returns
    -------
    dict
        ``kind`` ("segmentation"), ``metrics`` (``n``, ``dice_mean``, ``dice_median``,
        ``precision_mean``, ``recall_mean`` and, for a multi-label model, ``labels``:
        ``{name: {n, mean, median}}`` of Dice), per-study ``studies`` rows (``dice``,
        ``precision``, ``recall``, voxel counts, ``labels``), ``errors`` (study and reason, e.g.
        a mask whose shape differs from the image), ``unlabelled``, ``model``.
    """
    if cfg.model.output != "segmentation":
        raise ValueError(f"evaluate_masks needs a segmentation model; model.output is {cfg.model.output!r}")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    errors, unlabelled = [], []
    for key, folder in sorted(studies.items()):
        mask_path = _match(masks, key, (uids or {}).get(key), cfg.ingest.uid_salt)
        if mask_path is None:
            unlabelled.append(key)
            continue
        try:
            rows.append(_study_overlap(key, folder, mask_path, cfg))
        except MedpipeError as exc:
            errors.append({"study": key, "error": str(exc)})
    if not rows:
        first = f"; first error: {errors[0]['study']}: {errors[0]['error']}" if errors else ""
        raise InputError(out_dir, f"no study with a reference mask could be evaluated ({len(errors)} errors, "
                                  f"{len(unlabelled)} unlabelled){first}")
    dice = _summary([r["dice"] for r in rows])
    metrics: dict[str, Any] = {
        "n": len(rows), "dice_mean": dice["mean"], "dice_median": dice["median"],
        "precision_mean": _summary([r["precision"] for r in rows])["mean"],
        "recall_mean": _summary([r["recall"] for r in rows])["mean"],
    }
    names = _mask_names(cfg.model.labels)
    if names:
        metrics["labels"] = {n: _summary([r["labels"][n]["dice"] for r in rows]) for n in names.values()}
    model = rows[-1]["model"]
    for r in rows:
        del r["model"]
    record = {
        "title": title, "kind": "segmentation", "model": model, "metrics": metrics,
        "studies": rows, "errors": errors, "unlabelled": unlabelled, "roc_png": None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "evaluation.json", record)
    write_text(out_dir / "evaluation.md", _markdown_masks(record))
    write_text(out_dir / "evaluation.html", _html_masks(record))
    return record


def _modality(folder: Path) -> str:
    """Modality of an ingested study from its image attributes (CT when not recorded)."""
    from .. import omezarr

    try:
        attrs = omezarr.read_meta(folder / "image.zarr").attrs
    except Exception:
        return "CT"
    return str(attrs.get("modality") or attrs.get("Modality") or "CT")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _markdown(rec: dict[str, Any]) -> str:
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


def _html(rec: dict[str, Any]) -> str:
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


def _markdown_masks(rec: dict[str, Any]) -> str:
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


def _html_masks(rec: dict[str, Any]) -> str:
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


def _ingested(archive: Path) -> dict[str, Path]:
    return {p.parent.name: p.parent for p in sorted(archive.glob("*/image.zarr"))} or \
           {p.parent.name: p.parent for p in sorted(archive.glob("studies/*/image.zarr"))}


def evaluate_archive(archive: Path, labels_file: Path, out_dir: Path, cfg: Config) -> dict:
    """Run the configured model over a labelled archive and write an evaluation report.

    Parameters
    ----------
    archive : Path
        A folder of ingested studies (``<study>/image.zarr`` or ``studies/<study>/image.zarr``)
        or a DICOM archive, which is ingested into ``out_dir/studies`` first.
    labels_file : Path
        CSV (``study,label``) or JSON (``{study: 0|1}``); for a segmentation model, reference
        mask paths instead (``study,mask``); see the module docstring.
    out_dir : Path
        Receives ``evaluation.json``, ``evaluation.md``, ``evaluation.html`` and (classification
        with both classes present) ``roc.png``.
    cfg : Config
        Model and ingest settings.

    Returns
    -------
    dict
        ``metrics`` (n, positives, threshold, accuracy, precision, recall, f1, roc_auc,
        confusion), per-study ``studies`` rows, ``errors``, ``unlabelled``, ``model``, ``rule``;
        for a segmentation model the Dice record of :func:`evaluate_masks`.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    if not archive.is_dir():
        raise InputError(archive, "archive folder not found")
    segmentation = cfg.model.output == "segmentation"
    labels = read_mask_labels(labels_file) if segmentation else read_labels_file(labels_file)
    studies = _ingested(archive)
    uids: dict[str, str] = {}
    if not studies:
        studies, uids = _ingest_dicom(archive, out_dir / "studies", cfg)
    evaluate = evaluate_masks if segmentation else evaluate_studies
    return evaluate(studies, labels, out_dir, cfg, uids=uids, title=f"Evaluation of {archive.name}")


def _ingest_dicom(archive: Path, dest: Path, cfg: Config) -> tuple[dict[str, Path], dict[str, str]]:
    """Ingest a DICOM archive with :mod:`medpipe.ingest` into ``dest/<study key>``.

    Labels name studies by StudyInstanceUID or study key; plans carry only the one-way key, so
    UIDs are matched by hashing them (see :func:`_match`). Returns ``({key: folder}, {})``.
    """
    from .. import ingest

    studies: dict[str, Path] = {}
    for plan in ingest.plan_studies(ingest.scan_archive(archive, cfg.ingest), cfg.ingest):
        if plan.skip_reason or not plan.files:
            log.info("study %s not ingested: %s", plan.study_key, plan.skip_reason)
            continue
        folder = dest / plan.study_key
        try:
            if not (folder / "image.zarr").exists():
                ingest.ingest_study(plan, folder, cfg.ingest)
        except MedpipeError as exc:
            log.warning("study %s not ingested: %s", plan.study_key, exc)
            continue
        studies[plan.study_key] = folder
    return studies, {}
