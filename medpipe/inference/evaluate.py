"""Evaluate a model over a labelled archive: infer every labelled study, score, write the record.

This is the driver; the parts live in modules of their own: labels files in
:mod:`~medpipe.inference.labels_io`, metrics in :mod:`~medpipe.inference.metrics`, Dice in
:mod:`~medpipe.inference.dice`, Markdown/HTML/ROC rendering in
:mod:`~medpipe.inference.evaluation_report`. Their public names stay importable from here.

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

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes, write_json, write_text
from ..config import Config
from ..errors import InputError, MedpipeError, StudyError
from .data import make_labelled_volumes
from .dice import mask_counts, overlap_scores, read_mask
from .evaluation_report import html_classification, html_masks, markdown_classification, markdown_masks, roc_png
from .labels_io import match_study, read_labels_file, read_mask_labels
from .metrics import binary_metrics, summary
from .stage import infer_study

log = logging.getLogger(__name__)

__all__ = ["binary_metrics", "evaluate_archive", "evaluate_masks", "evaluate_studies", "make_labelled_volumes",
           "read_labels_file", "read_mask_labels"]


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
        truth = match_study(labels, key, (uids or {}).get(key), cfg.ingest.uid_salt)
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
    write_text(out_dir / "evaluation.md", markdown_classification(record))
    write_text(out_dir / "evaluation.html", html_classification(record))
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
        mask_path = match_study(masks, key, (uids or {}).get(key), cfg.ingest.uid_salt)
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
    dice = summary([r["dice"] for r in rows])
    metrics: dict[str, Any] = {
        "n": len(rows), "dice_mean": dice["mean"], "dice_median": dice["median"],
        "precision_mean": summary([r["precision"] for r in rows])["mean"],
        "recall_mean": summary([r["recall"] for r in rows])["mean"],
    }
    names = _mask_names(cfg.model.labels)
    if names:
        metrics["labels"] = {n: summary([r["labels"][n]["dice"] for r in rows]) for n in names.values()}
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
    write_text(out_dir / "evaluation.md", markdown_masks(record))
    write_text(out_dir / "evaluation.html", html_masks(record))
    return record


def _modality(folder: Path) -> str:
    """Modality of an ingested study from its image attributes (CT when not recorded)."""
    from .. import omezarr

    try:
        attrs = omezarr.read_meta(folder / "image.zarr").attrs
    except Exception:
        return "CT"
    return str(attrs.get("modality") or attrs.get("Modality") or "CT")


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
    UIDs are matched by hashing them (see :func:`~medpipe.inference.labels_io.match_study`). Returns ``({key: folder}, {})``.
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
