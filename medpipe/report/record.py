"""Build the ``report.json`` document of a study from the stages' small JSON results.

Every stage may be missing: a study that failed at ingest still gets a report with what exists
and the error. File paths of the study plan are not copied (folder names may hold patient
names); the report keeps counts instead.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any

import numpy as np

from .. import __version__
from .schema import SCHEMA_VERSION

# Keys never copied from stage dictionaries into the report (paths or identity).
_PRIVATE_KEY = re.compile(r"path|file|dir|folder|patient|birth|accession|institution|physician|operator|"
                          r"station|serial", re.IGNORECASE)


def jsonable(obj: Any) -> Any:
    """Plain JSON values: NumPy scalars and arrays to Python, tuples to lists, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def _public(d: dict[str, Any] | None) -> dict[str, Any]:
    """``d`` without keys that may hold paths or identity."""
    return {k: v for k, v in (d or {}).items() if not _PRIVATE_KEY.search(str(k))}


def _count(files: Any) -> int:
    return len(files) if isinstance(files, (list, tuple)) else int(files or 0)


def _series(plan: dict[str, Any], ingest: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    skipped = []
    for s in plan.get("skipped") or []:
        if isinstance(s, str):
            skipped.append({"series_key": None, "description": None, "modality": None, "instances": None,
                            "reason": s})
            continue
        skipped.append({
            "series_key": s.get("series_key"),
            "description": s.get("series_description", s.get("description")),
            "modality": s.get("modality"),
            "instances": _count(s.get("files", s.get("instances"))) if ("files" in s or "instances" in s) else None,
            "reason": str(s.get("reason") or s.get("why") or "not selected"),
        })
    used = None
    if plan.get("series_key") or ingest:
        n_candidates = 1 + len(skipped)
        prefer = (cfg.get("ingest") or {}).get("prefer", "most_slices").replace("_", " ")
        reason = plan.get("reason") or (
            "the only image series of the study" if n_candidates == 1
            else f"chosen among {n_candidates} series by rule '{prefer}' (the others were skipped, see below)"
        )
        details = jsonable(_public(ingest.get("series"))) if isinstance(ingest.get("series"), dict) else {}
        used = {
            "series_key": plan.get("series_key") or details.get("series_key"),
            "description": plan.get("series_description") or details.get("series_description"),
            "modality": plan.get("modality") or ingest.get("modality"),
            "instances": _count(plan.get("files")),
            "reason": str(reason),
            "details": details,
        }
    return {"used": used, "skipped": skipped, "candidates": len(skipped) + (used is not None)}


def _issues(*sources: Any) -> list[dict[str, str]]:
    out, seen = [], set()
    for src in sources:
        for it in src or []:
            if isinstance(it, dict):
                item = {"path": str(it.get("path", "")), "reason": str(it.get("reason", it.get("error", "")))}
            elif isinstance(it, (list, tuple)) and len(it) == 2:
                item = {"path": str(it[0]), "reason": str(it[1])}
            else:
                item = {"path": "", "reason": str(it)}
            key = (item["path"], item["reason"])
            if key not in seen:
                seen.add(key)
                out.append(item)
    return out


def _segmentation(seg: dict[str, Any] | None) -> dict[str, Any] | None:
    if not seg:
        return None
    measurements = []
    for m in seg.get("measurements") or []:
        m = jsonable(m)
        m["label"] = int(m["label"])
        m["voxels"] = int(m.get("voxels", 0))
        m["volume_ml"] = float(m.get("volume_ml") or 0.0)
        m["name"] = str(m.get("name", m["label"]))
        measurements.append(m)
    return {
        "method": seg.get("method"),
        "labels": {str(int(k)): str(v) for k, v in (seg.get("labels") or {}).items()},
        "measurements": measurements,
        "lesion_candidates": jsonable(list(seg.get("lesion_candidates") or [])),
    }


def _model(infer: dict[str, Any] | None) -> dict[str, Any] | None:
    if not infer:
        return None
    card = infer.get("model") or {}
    sha = card.get("sha256")
    return {
        "name": card.get("name"),
        "version": None if card.get("version") is None else str(card.get("version")),
        "sha256": sha.lower() if isinstance(sha, str) else None,
        "output_kind": infer.get("output_kind"),
        "labels": [str(x) for x in infer.get("labels") or []],
        "skipped": None if infer.get("skipped") is None else str(infer["skipped"]),
        "outputs": jsonable({
            "study_score": infer.get("study_score"),
            "study_label": infer.get("study_label"),
            "rule": infer.get("rule"),
            "slice_scores": list(infer.get("slice_scores") or []),
        }),
        "flags": jsonable(list(infer.get("flags") or [])),
        "saliency": [
            {"slice": int(s["slice"]), "score": jsonable(s.get("score")), "png": PurePath(s["png"]).as_posix()}
            for s in infer.get("saliency") or []
        ],
    }


def _applicable(infer: dict[str, Any]) -> bool:
    """A model result applies unless it says otherwise or was skipped (results before domains)."""
    return bool(infer.get("applicable", infer.get("skipped") is None))


def _model_entry(name: str, infer: dict[str, Any]) -> dict[str, Any]:
    """One entry of ``models``: :func:`_model` plus ``applicable`` and ``reason``; no outputs
    (no score) where the model does not apply."""
    entry = _model(infer) or {}
    applicable = _applicable(infer)
    reason = infer.get("reason") or infer.get("skipped")
    return {**entry, "name": entry.get("name") or name, "applicable": applicable,
            "reason": None if reason is None else str(reason),
            "outputs": entry.get("outputs") if applicable else None,
            "saliency": entry.get("saliency") if applicable else []}


def infer_results(stages: dict[str, Any], config: dict[str, Any] | None = None) -> list[tuple[str, dict]]:
    """The model results among stage results (``infer`` and ``infer:<model name>``), as
    (name, result) in the configuration's order of ``models`` (others after, by name)."""
    found = [(k.partition(":")[2] or str(((v.get("model") or {}).get("name")) or "model"), v)
             for k, v in (stages or {}).items()
             if (k == "infer" or k.startswith("infer:")) and isinstance(v, dict)]
    order = [m.get("name") for m in ((config or {}).get("models") or []) if isinstance(m, dict)]
    return sorted(found, key=lambda nv: (order.index(nv[0]) if nv[0] in order else len(order), nv[0]))


def model_outcomes(stages: dict[str, Any], errors: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """run.json's ``models`` of a study: per model name, its label and score, why it did not
    apply (no score), or its error.

    >>> model_outcomes({"infer:a": {"study_label": "lesion", "study_score": 0.9, "applicable": True},
    ...                 "infer:b": {"applicable": False, "reason": "outside model b's domain: MR"}},
    ...                {"infer:c": "StudyError: boom"})  # doctest: +NORMALIZE_WHITESPACE
    {'a': {'applicable': True, 'label': 'lesion', 'score': 0.9},
     'b': {'applicable': False, 'reason': "outside model b's domain: MR"}, 'c': {'error': 'StudyError: boom'}}
    """
    out: dict[str, dict[str, Any]] = {}
    for name, res in infer_results(stages):
        if _applicable(res):
            out[name] = jsonable({"applicable": True, "label": res.get("study_label"), "score": res.get("study_score")})
        else:
            out[name] = {"applicable": False, "reason": str(res.get("reason") or res.get("skipped"))}
    for key, text in (errors or {}).items():
        if key == "infer" or key.startswith("infer:"):
            out[key.partition(":")[2] or "model"] = {"error": str(text)}
    return out


def with_infer_timing(timings: dict[str, Any]) -> dict[str, Any]:
    """``timings`` with ``infer``, the inference stage's wall time (its models run side by side:
    the longest ``infer:<model name>``), added where only per-model times are there.

    >>> with_infer_timing({"ingest": 1.0, "infer:a": 2.0, "infer:b": 3.5})
    {'ingest': 1.0, 'infer:a': 2.0, 'infer:b': 3.5, 'infer': 3.5}
    """
    per_model = [v for k, v in timings.items() if k.startswith("infer:") and isinstance(v, (int, float))]
    if "infer" in timings or not per_model:
        return dict(timings)
    return {**timings, "infer": max(per_model)}


def assemble_record(
    study_key: str,
    stages: dict[str, dict],
    timings: dict[str, float],
    provenance: dict,
    warnings: list[str] | None = None,
    *,
    error: str | None = None,
) -> dict:
    """Build the ``report.json`` document of one study.

    Parameters
    ----------
    study_key : str
        The study's one-way key (folder name under ``OUT/studies``).
    stages : dict
        Results by stage name: ``plan``, ``ingest``, ``filter``, ``segment``, ``infer`` or
        ``infer:<model name>`` (one per model); any may be missing. A stage result holding
        ``{"error": text}`` marks the study failed.
    timings : dict
        Seconds per stage.
    provenance : dict
        ``medpipe_version``, ``run_id``, ``config``, ``config_fingerprint``,
        ``input_fingerprint``, ``versions``.
    warnings : list of str, optional
        Warnings of the flow; the stages' own warnings are added.
    error : str, optional
        The error that ended the study (status ``failed``).

    Returns
    -------
    dict
        A document that follows :func:`medpipe.report.report_schema`.

    Examples
    --------
    >>> doc = assemble_record("abc", {}, {}, {"run_id": "r1"}, error="no image series")
    >>> doc["status"], doc["error"], doc["segmentation"]
    ('failed', 'no image series', None)
    """
    stages = {k: v for k, v in (stages or {}).items() if v is not None}
    for name, res in stages.items():
        if isinstance(res, dict) and res.get("error") and error is None:
            error = f"{name}: {res['error']}"
    plan, ingest = stages.get("plan") or {}, stages.get("ingest") or {}
    filt, seg = stages.get("filter"), stages.get("segment")
    prov = jsonable(dict(provenance or {}))
    cfg = prov.get("config") if isinstance(prov.get("config"), dict) else {}
    infers = infer_results(stages, cfg)
    infer = infers[0][1] if infers else None  # `model`: the first (or only) model, as before `models`

    all_warnings: list[str] = []
    for src in (warnings, plan.get("warnings"), ingest.get("warnings"), (seg or {}).get("warnings"),
                (infer or {}).get("warnings")):
        for w in src or []:
            if str(w) not in all_warnings:
                all_warnings.append(str(w))

    shape = ingest.get("shape") or (filt or {}).get("shape")
    spacing = ingest.get("spacing")
    doc = {
        "schema_version": SCHEMA_VERSION,
        "study_key": str(study_key),
        "status": "failed" if error else "ok",
        "error": None if error is None else str(error),
        "modality": ingest.get("modality") or plan.get("modality"),
        "shape": [int(n) for n in shape] if shape is not None else None,
        "spacing": [float(s) for s in spacing] if spacing is not None else None,
        "affine_lps": jsonable(ingest.get("affine_lps")),
        "series": _series(plan, ingest, cfg),
        "timings": {str(k): round(float(v), 3) for k, v in with_infer_timing(timings or {}).items()},
        "filters": None if not filt else jsonable({"steps": list(filt.get("steps") or []),
                                                   "device": filt.get("device"),
                                                   "shape": filt.get("shape")}),
        "segmentation": _segmentation(seg),
        "model": _model(infer),
        "models": [_model_entry(name, res) for name, res in infers],
        "warnings": all_warnings,
        "issues": _issues(plan.get("issues"), ingest.get("issues")),
        "outputs": {},
        "provenance": {
            "medpipe_version": str(prov.get("medpipe_version") or __version__),
            "run_id": prov.get("run_id"),
            "config": cfg,
            "config_fingerprint": prov.get("config_fingerprint"),
            "input_fingerprint": prov.get("input_fingerprint") or plan.get("fingerprint"),
            "versions": prov.get("versions") or {},
            "report_generated": prov.get("report_generated")
            or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }
    return doc


def key_findings(record: dict[str, Any], limit: int = 3) -> str | None:
    """One line for tables: the models' study labels and scores, then the largest lesion candidates.

    With several models, each is named with its result or "not applicable".

    >>> key_findings({"status": "failed", "error": "x", "model": None, "segmentation": None})
    >>> key_findings({"status": "ok", "model": {"outputs": {"study_label": "lesion", "study_score": 0.91}},
    ...               "segmentation": {"lesion_candidates": [{"volume_ml": 1.5}]}})
    'lesion (score 0.91); 1 lesion candidate (largest 1.50 ml)'
    >>> key_findings({"status": "ok", "segmentation": None, "models": [
    ...     {"name": "chest", "applicable": True, "outputs": {"study_label": "no_lesion", "study_score": 0.1}},
    ...     {"name": "head", "applicable": False, "outputs": None}]})
    'chest: no_lesion (score 0.10); head: not applicable'
    """
    if record.get("status") != "ok":
        return None
    parts = []
    models = record.get("models") or []
    if len(models) > 1:
        for m in models:
            outputs = m.get("outputs") or {}
            if not m.get("applicable", True):
                parts.append(f"{m.get('name')}: not applicable")
            elif outputs.get("study_label") is not None:
                parts.append(f"{m.get('name')}: {_label(outputs)}")
        limit += max(0, len(parts) - 1)
    else:
        outputs = (record.get("model") or {}).get("outputs") or {}
        if outputs.get("study_label") is not None:
            parts.append(_label(outputs))
    cands = (record.get("segmentation") or {}).get("lesion_candidates") or []
    if cands:
        vols = [c.get("volume_ml") for c in cands if isinstance(c.get("volume_ml"), (int, float))]
        text = f"{len(cands)} lesion candidate{'s' if len(cands) != 1 else ''}"
        if vols:
            text += f" (largest {max(vols):.2f} ml)"
        parts.append(text)
    elif record.get("segmentation") is not None:
        parts.append("no lesion candidates")
    return "; ".join(parts[:limit]) or None


def _label(outputs: dict[str, Any]) -> str:
    score = outputs.get("study_score")
    return f"{outputs['study_label']}" + (f" (score {score:.2f})" if score is not None else "")
