"""The inference stage of one study: batches of slices fanned out as Dask tasks.

Each batch is one ``dask.delayed`` task that reads its own slices from the study's Zarr
image on the worker, preprocesses them and runs the model cached in that worker process;
only slice indices go in and scores (or a small uint8 mask) come out. A large study thus
spreads over all workers of whatever scheduler is active (the distributed client inside the
flow, the threaded scheduler elsewhere).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr

from .. import omezarr
from ..config import Config
from ..errors import MedpipeError, ModelError, StudyError
from .model import ModelInfo, check_compatible, load_model, resolve_model
from .preprocess import preprocess_slices, restore_slices, slice_geometry

log = logging.getLogger(__name__)

RULES = {"max": "max of slice scores", "mean_top3": "mean of the 3 highest slice scores"}
SALIENCY_DIR = "saliency"


def read_batch(image_path: str | Path, start: int, stop: int, info: ModelInfo) -> np.ndarray:
    """Slices ``start:stop`` of a Zarr image, preprocessed into a model batch."""
    meta = omezarr.read_meta(image_path)
    # Level 0 straight from Zarr: a Dask graph per batch (read_image) costs twice the decode.
    raw = zarr.open_array(str(Path(image_path) / "0"), mode="r")[start:stop]
    return preprocess_slices(raw, meta.spacing[1:], size=info.size, window=info.window,
                             spacing_mm=info.spacing_mm, channels=info.channels)


def _scores(out: np.ndarray, info: ModelInfo) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-slice positive-class scores and, for segmentations, the model-grid mask."""
    if info.output_kind == "slice_classification":
        out = out.reshape(out.shape[0], -1)
        return (out[:, 0] if out.shape[1] == 1 else out[:, -1]).astype(np.float64), None
    if out.shape[-1] == 1:
        prob = out[..., 0]
        mask = (prob >= 0.5).astype(np.uint8)
    else:
        prob = 1.0 - out[..., 0]  # probability of any foreground class
        mask = np.argmax(out, axis=-1).astype(np.uint8)
    return prob.reshape(prob.shape[0], -1).max(axis=1).astype(np.float64), mask


def predict_batch(image_path: str, start: int, stop: int, info: ModelInfo, batch_size: int) -> dict[str, Any]:
    """One batch task: read, preprocess, predict with the process's cached model.

    The batch is zero-padded to ``batch_size`` so every call reuses one compiled graph.
    Returns ``{"start", "scores"}`` plus ``"mask"`` (original slice grid) for segmentations.
    """
    model = load_model(info)
    check_compatible(model, info)
    batch = read_batch(image_path, start, stop, info)
    n = batch.shape[0]
    bad_input = start + np.flatnonzero(~np.isfinite(batch).reshape(n, -1).all(axis=1))
    if n < batch_size:
        batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
    with np.errstate(invalid="ignore"):
        scores, mask = _scores(model.predict(batch)[:n], info)
    result: dict[str, Any] = {"start": start, "scores": scores, "bad_input": bad_input}
    if mask is not None:
        meta = omezarr.read_meta(image_path)
        geom = slice_geometry(meta.shape[1:], meta.spacing[1:], info.size, info.spacing_mm)
        result["mask"] = restore_slices(mask, geom, order=0)
    return result


def study_score(scores: np.ndarray, rule: str) -> float | None:
    """Combine finite slice scores into a study score by ``rule`` ("max" or "mean_top3").

    >>> study_score(np.array([0.1, 0.9, np.nan, 0.5]), "max")
    0.9
    >>> round(study_score(np.array([0.1, 0.9, 0.2, 0.5]), "mean_top3"), 4)
    0.5333
    """
    finite = np.asarray(scores, float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    if rule == "max":
        return float(finite.max())
    if rule == "mean_top3":
        return float(np.sort(finite)[-3:].mean())
    raise ValueError(f"unknown study score rule {rule!r}; expected one of {sorted(RULES)}")


def _ranges(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _check_image(study_key: str, image_path: Path) -> omezarr.ImageMeta:
    if not image_path.exists():
        raise StudyError(study_key, f"no pixel data: {image_path.name} is missing")
    try:
        meta = omezarr.read_meta(image_path)
    except Exception as exc:
        raise StudyError(study_key, f"no pixel data: cannot read {image_path.name}: {exc}") from None
    if len(meta.shape) != 3 or min(meta.shape) < 1:
        raise StudyError(study_key, f"image shape {meta.shape} is not a (z, y, x) volume of slices")
    if min(meta.shape[1:]) < 2:
        raise StudyError(study_key, f"slices of shape {meta.shape[1:]} are too small for the model")
    if np.dtype(meta.dtype).kind not in "iuf":
        raise StudyError(study_key, f"image dtype {meta.dtype} is not numeric")
    return meta


def _flag_ranges(idx: np.ndarray) -> str:
    """'3-5, 9' from sorted indices."""
    parts, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def infer_study(study_dir: Path, modality: str, cfg: Config) -> dict:
    """Run the configured model over every axial slice of a study.

    Parameters
    ----------
    study_dir : Path
        The study folder; reads ``image.zarr``, writes ``saliency/*.png`` and, for
        segmentation models, ``image.zarr/labels/model``.
    modality : str
        DICOM modality of the study; modalities the model does not cover are skipped.
    cfg : Config
        ``cfg.model`` selects the model, batch size, study score rule and saliency.

    Returns
    -------
    dict
        JSON-safe: ``model`` (name, version, sha256, path), ``output_kind``, ``labels``,
        ``slice_scores`` (None where the output was not finite), ``study_score``,
        ``study_label``, ``threshold``, ``rule``, ``flags``, ``saliency`` (slice, score, png
        relative to ``study_dir``), ``n_slices``, ``input``, ``seconds``; or, for a study the
        model does not cover, the model identity and ``skipped`` with the reason.

    Raises
    ------
    StudyError
        The study has no usable pixel data or the model fails on it.
    ModelError
        The configured model is missing or unusable (the run should have validated it).
    """
    t0 = time.perf_counter()
    study_dir = Path(study_dir)
    key = study_dir.name
    mcfg = cfg.model
    info = resolve_model(mcfg)
    base: dict[str, Any] = {"model": info.summary(), "output_kind": info.output_kind, "labels": list(info.labels)}
    if not mcfg.enabled:
        return {**base, "skipped": "inference disabled in the configuration"}
    if modality not in info.modalities:
        return {**base, "skipped": f"modality {modality} is not covered by model {info.name} "
                                   f"(covers {', '.join(info.modalities)})"}
    image_path = study_dir / "image.zarr"
    meta = _check_image(key, image_path)
    n = meta.shape[0]
    bs = mcfg.batch_size
    tasks = [dask.delayed(predict_batch, pure=False)(str(image_path), a, b, info, bs) for a, b in _ranges(n, bs)]
    try:
        parts = dask.compute(*tasks)
    except ModelError as exc:
        raise StudyError(key, f"model failed: {exc}") from exc
    except MedpipeError:
        raise
    except Exception as exc:  # a model or worker failure fails this study only
        raise StudyError(key, f"inference failed: {type(exc).__name__}: {exc}") from exc
    scores = np.concatenate([p["scores"] for p in sorted(parts, key=lambda p: p["start"])])
    flags: list[str] = []
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        flags.append(f"NaN or infinite outputs on slices {_flag_ranges(bad)}")
    bad_in = np.sort(np.concatenate([p["bad_input"] for p in parts]))
    if bad_in.size:
        flags.append(f"NaN or infinite pixel values on slices {_flag_ranges(bad_in)}")
    s_score = study_score(scores, mcfg.study_score)
    if s_score is None:
        flags.append("no finite slice score: study score undefined")
        label = None
    else:
        label = info.labels[-1] if s_score >= info.threshold else info.labels[0]
    if info.output_kind == "segmentation":
        mask = np.concatenate([p["mask"] for p in sorted(parts, key=lambda p: p["start"])])
        names = {i: name for i, name in enumerate(info.labels) if i > 0} or {1: "foreground"}
        omezarr.write_labels(image_path, mask, names, name="model",
                             attrs={"model": info.summary(), "source": "medpipe.inference"})
    saliency = _saliency(study_dir, image_path, scores, info, mcfg.saliency_slices)
    return {
        **base,
        "slice_scores": [float(s) if np.isfinite(s) else None for s in scores],
        "study_score": s_score,
        "study_label": label,
        "threshold": info.threshold,
        "rule": RULES[mcfg.study_score],
        "flags": flags,
        "saliency": saliency,
        "n_slices": int(n),
        "input": {"size": info.size, "window": list(info.window), "spacing_mm": info.spacing_mm},
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _saliency(study_dir: Path, image_path: Path, scores: np.ndarray, info: ModelInfo, k: int) -> list[dict]:
    """Saliency PNGs for the ``k`` highest finite-scoring slices, made in one worker task."""
    if k <= 0:
        return []
    finite = np.flatnonzero(np.isfinite(scores))
    top = finite[np.argsort(scores[finite])[::-1][:k]]
    if top.size == 0:
        return []
    from .saliency import write_saliency

    slices = [int(z) for z in top]
    out_dir = study_dir / SALIENCY_DIR
    pngs = dask.compute(dask.delayed(write_saliency, pure=False)(str(image_path), slices, info, str(out_dir)))[0]
    return [{"slice": z, "score": float(scores[z]), "png": f"{SALIENCY_DIR}/{Path(p).name}"}
            for z, p in zip(slices, pngs)]


def n_batches(n_slices: int, batch_size: int) -> int:
    """Number of batch tasks for a study of ``n_slices``."""
    return math.ceil(n_slices / batch_size)
