"""The inference stage of one study: slice batches predicted in the process that runs the study
or, for a large study, runs of them fanned out as Dask tasks over the cluster.

Either way a run of consecutive batches is read from the study's Zarr image and preprocessed
where it is predicted, by the model cached in that process; only slice ranges go in and scores
(or a small uint8 mask) come out. Batch ``i + 1`` is read and preprocessed in a thread while
TensorFlow predicts batch ``i`` (both release the GIL). A fanned-out study is cut into a
multiple of the scheduler's worker threads of such runs, so it spreads over all workers of
whatever scheduler is active (the distributed client inside the flow, the threaded scheduler
elsewhere), and a long study into more runs than that, so Dask can balance them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr

from .. import omezarr
from ..config import Config, ModelConfig
from ..errors import MedpipeError, ModelError, StudyError
from .batching import Batcher, batcher_for
from .domain import Facts, match
from .model import ModelInfo, check_compatible, configured_name, load_model, resolve_model, select_model
from .model_input import load_batch
from .preprocess import restore_slices, slice_geometry
from .saliency import write_saliency

log = logging.getLogger(__name__)

RULES = {"max": "max of slice scores", "mean_top3": "mean of the 3 highest slice scores"}
SALIENCY_DIR = "saliency"
# A study of fewer batches runs them in the process that runs the study (see infer_study).
FAN_OUT_MIN_BATCHES = 64
# Most batches one task pipelines. Longer runs save task overhead; more runs per worker thread
# let Dask even out a long study over workers of unequal speed.
BATCHES_PER_TASK = 4


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


def _predict_loaded(model: Any, info: ModelInfo, start: int, loaded: tuple, batch_size: int,
                    pixel_spacing: tuple[float, float], batcher: Batcher | None = None,
                    session: object | None = None) -> dict[str, Any]:
    batch, bad_input, shape = loaded
    n = batch.shape[0]
    if batcher is not None:  # rows packed with other studies' rows, always in full batches
        out = batcher.predict(batch, session)
    else:
        if n < batch_size:  # one padded shape: every call reuses one compiled graph
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
        out = model.predict(batch)[:n]
    with np.errstate(invalid="ignore"):
        scores, mask = _scores(out, info)
    result: dict[str, Any] = {"start": start, "scores": scores, "bad_input": bad_input}
    if mask is not None:
        geom = slice_geometry(shape, pixel_spacing, info.size, info.spacing_mm)
        result["mask"] = restore_slices(mask, geom, order=0)
    return result


def predict_batches(image_path: str, ranges: list[tuple[int, int]], info: ModelInfo, batch_size: int,
                    pixel_spacing: tuple[float, float] | None = None,
                    batch_wait_ms: float | None = None) -> list[dict[str, Any]]:
    """One task: read, preprocess and predict consecutive batches with the process's cached model.

    While TensorFlow predicts one batch, a second thread reads and preprocesses the next one.
    Each batch is zero-padded to ``batch_size`` so every call reuses one compiled graph.

    Parameters
    ----------
    image_path : str
        The study's OME-Zarr image (level 0 is read).
    ranges : list of (start, stop)
        Slice ranges, one per batch, each at most ``batch_size`` long.
    info : ModelInfo
        The resolved model.
    batch_size : int
        The model batch every call is padded to.
    pixel_spacing : (float, float), optional
        Row and column spacing in mm; read from the image's metadata when not given.
    batch_wait_ms : float, optional
        None: this task's batches are predicted on their own (per-study batching). A number:
        they go through the process's :class:`~medpipe.inference.batching.Batcher` of the
        model, which packs rows of all studies in flight in this process into full batches
        and waits at most this long for more rows when a batch is not full.

    Returns
    -------
    list of dict
        Per batch: ``start``, ``scores`` (per slice), ``bad_input`` (slices with NaN/inf
        pixels) and, for segmentations, ``mask`` on the original slice grid.
    """
    model = load_model(info)
    check_compatible(model, info)
    if pixel_spacing is None:
        pixel_spacing = omezarr.read_meta(image_path).spacing[1:]
    arr = zarr.open_array(str(Path(image_path) / "0"), mode="r")
    if batch_wait_ms is None:
        return _predict_ranges(model, info, arr, ranges, batch_size, pixel_spacing)
    batcher = batcher_for((info.path, info.sha256), model, batch_size, batch_wait_ms / 1e3, info.name)
    with batcher.session(str(image_path)) as session:  # one study's tasks: one caller
        return _predict_ranges(model, info, arr, ranges, batch_size, pixel_spacing, batcher, session)


def _predict_ranges(model: Any, info: ModelInfo, arr: Any, ranges: list[tuple[int, int]], batch_size: int,
                    pixel_spacing: tuple[float, float], batcher: Batcher | None = None,
                    session: object | None = None) -> list[dict[str, Any]]:
    """Predict ``ranges`` of ``arr`` in turn, loading batch ``i + 1`` in a thread during batch ``i``."""
    if len(ranges) == 1:
        a, b = ranges[0]
        return [_predict_loaded(model, info, a, load_batch(arr, a, b, info, pixel_spacing), batch_size,
                                pixel_spacing, batcher, session)]
    results = []
    with ThreadPoolExecutor(1, thread_name_prefix="medpipe-prefetch") as pool:
        pending = pool.submit(load_batch, arr, *ranges[0], info, pixel_spacing)
        for i, (a, _) in enumerate(ranges):
            loaded = pending.result()
            if i + 1 < len(ranges):
                pending = pool.submit(load_batch, arr, *ranges[i + 1], info, pixel_spacing)
            results.append(_predict_loaded(model, info, a, loaded, batch_size, pixel_spacing, batcher, session))
    return results


def predict_batch(image_path: str, start: int, stop: int, info: ModelInfo, batch_size: int,
                  pixel_spacing: tuple[float, float] | None = None) -> dict[str, Any]:
    """One batch: :func:`predict_batches` of the single range ``(start, stop)``."""
    return predict_batches(image_path, [(start, stop)], info, batch_size, pixel_spacing)[0]


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


def scheduler_slots() -> int:
    """Worker threads of the scheduler ``dask.compute`` would use now (1 when unknown)."""
    get = dask.base.get_scheduler()
    client = getattr(get, "__self__", None)
    if client is not None and hasattr(client, "nthreads"):
        try:
            return max(1, sum(client.nthreads().values()))
        except Exception:  # a closing client: fall back to the machine
            pass
    if get is dask.get:
        return 1
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def task_runs(n_batches: int, slots: int, per_task: int | None = None) -> list[range]:
    """Split batch indices ``0..n_batches-1`` into runs of consecutive batches, one per task.

    As many runs as ``slots`` (worker threads) or a multiple of it, each of at most
    ``per_task`` batches (default :data:`BATCHES_PER_TASK`) where that allows, of near-equal
    lengths.

    >>> [list(r) for r in task_runs(6, 2)]
    [[0, 1, 2], [3, 4, 5]]
    >>> [len(r) for r in task_runs(19, 2)]
    [4, 3, 3, 3, 3, 3]
    >>> [len(r) for r in task_runs(3, 8)]
    [1, 1, 1]
    """
    if n_batches <= 0:
        return []
    per_task = per_task or BATCHES_PER_TASK
    n_tasks = min(n_batches, slots * math.ceil(n_batches / (slots * per_task)))
    size, extra = divmod(n_batches, n_tasks)
    runs, start = [], 0
    for i in range(n_tasks):
        stop = start + size + (i < extra)
        runs.append(range(start, stop))
        start = stop
    return runs


def _read_meta(study_key: str, image_path: Path) -> omezarr.ImageMeta:
    if not image_path.exists():
        raise StudyError(study_key, f"no pixel data: {image_path.name} is missing")
    try:
        return omezarr.read_meta(image_path)
    except Exception as exc:
        raise StudyError(study_key, f"no pixel data: cannot read {image_path.name}: {exc}") from None


def _check_shape(study_key: str, image_path: Path, meta: omezarr.ImageMeta) -> omezarr.ImageMeta:
    if len(meta.shape) != 3 or min(meta.shape) < 1:
        raise StudyError(study_key, f"image shape {meta.shape} is not a (z, y, x) volume of slices")
    if min(meta.shape[1:]) < 2:
        raise StudyError(study_key, f"slices of shape {meta.shape[1:]} are too small for the model")
    if np.dtype(meta.dtype).kind not in "iuf":
        raise StudyError(study_key, f"image dtype {meta.dtype} is not numeric")
    return meta


# Facts only a header tells; without header facts (facts=None) their rules are not applied.
HEADER_FACTS = ["body_part", "orientation", "photometric", "series_description"]


def volume_facts(meta: omezarr.ImageMeta, modality: str, facts: Facts | Mapping[str, Any] | None) -> Facts:
    """The study's facts as ingested: the plan's header facts, with the volume's slice count and
    in-plane field of view (what the model will actually see, after dropped slices)."""
    base = facts if isinstance(facts, Facts) else Facts.from_dict(facts or {"modality": modality})
    fov = None
    # Without PixelSpacing (photographs, many US frames) ingest's spacing of 1 mm is no field of view.
    if base.field_of_view_mm is not None or facts is None:
        fov = (float(meta.shape[-2] * meta.spacing[-2]), float(meta.shape[-1] * meta.spacing[-1]))
    return Facts(modality=modality or base.modality, body_part=base.body_part, orientation=base.orientation,
                 n_slices=int(meta.shape[0]), field_of_view_mm=fov, photometric=base.photometric,
                 series_description=base.series_description)


def applicability(info: ModelInfo, facts: Facts, *, header_facts: bool = True) -> tuple[bool, str]:
    """Whether ``info``'s model applies to a study with ``facts``, and the reason, naming the model.

    ``header_facts=False``: the caller has only the image (library use on a bare ``image.zarr``);
    the rules on header facts then accept unknown values, and the reason says so.
    """
    domain = info.applies_to()
    if not header_facts:
        domain = domain.model_copy(update={"allow_unknown": list({*domain.allow_unknown, *HEADER_FACTS})})
    ok, why = match(domain, facts)
    if ok:
        said = "" if header_facts else " (header facts not given: body part, orientation, photometric and " \
                                        "series description not checked)"
        return True, f"within model {info.name}'s domain: {why}{said}"
    return False, f"outside model {info.name}'s domain: {why}"


def not_applicable(info: ModelInfo, reason: str) -> dict[str, Any]:
    """The result of a model that does not apply to a study: its identity and why, no score."""
    return {"model": info.summary(), "output_kind": info.output_kind, "labels": list(info.labels),
            "applicable": False, "reason": reason, "skipped": reason}


def plan_models(cfg: Config, facts: Facts | Mapping[str, Any]) -> list[dict[str, Any]]:
    """Which configured models apply to a study with ``facts`` (from its plan), and why (not).

    Returns
    -------
    list of dict
        In configuration order: ``name``, ``enabled``, ``applicable``, ``reason`` and, for a
        model that does not apply, ``result`` (:func:`not_applicable`) to report without a task.
    """
    facts = facts if isinstance(facts, Facts) else Facts.from_dict(facts)
    out = []
    for mcfg in cfg.inference_models():
        name = configured_name(mcfg)
        if not mcfg.enabled:  # its file need not exist: nothing is resolved
            why = "inference disabled in the configuration"
            out.append({"name": name, "enabled": False, "applicable": False, "reason": why, "domain": None,
                        "result": {"model": {"name": name, "version": mcfg.version, "sha256": None},
                                   "applicable": False, "reason": why, "skipped": why}})
            continue
        info = resolve_model(mcfg)
        ok, why = applicability(info, facts)
        entry: dict[str, Any] = {"name": name, "enabled": True, "applicable": ok, "reason": why,
                                 "domain": info.applies_to().summary()}
        if not ok:
            entry["result"] = not_applicable(info, why)
        out.append(entry)
    return out


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


def outside_field_of_view(shape: tuple[int, ...], spacing: tuple[float, ...], info: ModelInfo,
                          min_fraction: float = 0.5) -> str | None:
    """Why slices of this in-plane ``shape`` and ``spacing`` are outside the model's domain, or None.

    A model trained on a fixed millimetre grid (``spacing_mm``) sees a slice covering far less
    than that grid as a small patch in an empty frame, which it never saw in training; its score
    there means nothing (seen: a 50 mm crop around a spine scored 1.0). Such studies are skipped
    with this reason instead of reporting a confident number.

    >>> from medpipe.inference.model import ModelInfo
    >>> info = ModelInfo("m", "1", "", "", (128, 128, 1), "slice_classification", ("no", "yes"),
    ...                  (-1000.0, 400.0), 2.0, 0.5, ("CT",))
    >>> outside_field_of_view((512, 512), (0.7, 0.7), info) is None
    True
    >>> print(outside_field_of_view((128, 128), (0.4, 0.4), info))
    field of view 51 x 51 mm is under half of model m's 256 x 256 mm input: outside the model's domain
    """
    if info.spacing_mm is None:
        return None  # the model resizes whole slices: any field of view is its domain
    fov = [n * s for n, s in zip(shape, spacing)]
    grid = info.size * info.spacing_mm
    if all(f >= min_fraction * grid for f in fov):
        return None
    return (f"field of view {fov[0]:.0f} x {fov[1]:.0f} mm is under half of model {info.name}'s "
            f"{grid:.0f} x {grid:.0f} mm input: outside the model's domain")


def infer_study(study_dir: Path, modality: str, cfg: Config, model: str | None = None,
                facts: Facts | Mapping[str, Any] | None = None, *, fan_out: bool | None = None) -> dict:
    """Run one configured model over every axial slice of a study, if the study is in its domain.

    The study's batches (and saliency maps) run in this process, with the model it has cached
    (:func:`~medpipe.inference.model.warm_up` loads it ahead), unless the study has at least
    :data:`FAN_OUT_MIN_BATCHES` batches: then they fan out as Dask tasks over the active
    scheduler's workers. Importing TensorFlow and loading a model costs each process seconds of
    CPU, more than predicting thousands of slices of a small model, so spreading a common study
    over the workers would pay that load in every one of them to save a fraction of a second.

    Parameters
    ----------
    study_dir : Path
        The study folder; reads ``image.zarr``, writes ``saliency/*.png`` and, for
        segmentation models, ``image.zarr/labels/model``.
    modality : str
        DICOM modality of the study; modalities the model does not cover are skipped.
    cfg : Config
        The model (``cfg.model``, or the entry of ``cfg.models`` called ``model``) gives the
        batch size, study score rule, saliency and domain.
    model : str, optional
        The configured model's name; None: the first (or only) one.
    facts : Facts or dict, optional
        The study's facts from its plan (:meth:`Facts.from_plan`): body part, orientation,
        photometric interpretation, series description; the slice count and field of view are
        taken from the volume. None: no header facts are known (a bare ``image.zarr``), so only
        the modality and the volume are checked against the domain, and the reason says so.
    fan_out : bool, optional
        True: batches as Dask tasks over the scheduler's workers; False: in this process;
        None: by the study's size (above).

    Returns
    -------
    dict
        JSON-safe: ``model`` (name, version, sha256, path), ``output_kind``, ``labels``,
        ``applicable`` (True) and ``reason``, ``slice_scores`` (None where the output was not
        finite), ``study_score``, ``study_label``, ``threshold``, ``rule``, ``flags``,
        ``saliency`` (slice, score, png relative to ``study_dir``), ``n_slices``, ``input``,
        ``seconds``; or, for a study outside the model's domain, :func:`not_applicable`: the
        model identity, ``applicable`` False and the ``reason`` (also as ``skipped``), no score.

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
    mcfg = select_model(cfg, model)
    info = resolve_model(mcfg)
    if not mcfg.enabled:
        return not_applicable(info, "inference disabled in the configuration")
    image_path = study_dir / "image.zarr"
    meta = _read_meta(key, image_path)
    ok, why = applicability(info, volume_facts(meta, modality, facts), header_facts=facts is not None)
    if not ok:
        return not_applicable(info, why)
    _check_shape(key, image_path, meta)
    outside = outside_field_of_view(meta.shape[1:], meta.spacing[1:], info)
    if outside:
        return not_applicable(info, outside)
    base: dict[str, Any] = {"model": info.summary(), "output_kind": info.output_kind, "labels": list(info.labels),
                            "applicable": True, "reason": why}
    own = output_subname(cfg, mcfg)
    n = meta.shape[0]
    bs = mcfg.batch_size
    spacing = tuple(meta.spacing[1:])
    batches = _ranges(n, bs)
    wait_ms = mcfg.batch_wait_ms if mcfg.batch_across_studies else None
    if fan_out is None:
        fan_out = len(batches) >= FAN_OUT_MIN_BATCHES
    try:
        if fan_out:
            tasks = [dask.delayed(predict_batches, pure=False)(str(image_path), [batches[i] for i in run], info,
                                                               bs, spacing, wait_ms)
                     for run in task_runs(len(batches), scheduler_slots())]
            parts = [part for run in dask.compute(*tasks) for part in run]
        else:
            parts = predict_batches(str(image_path), batches, info, bs, spacing, wait_ms)
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
        omezarr.write_labels(image_path, mask, names, name="model" + (f"-{own}" if own else ""),
                             attrs={"model": info.summary(), "source": "medpipe.inference"})
    saliency = _saliency(study_dir, image_path, scores, info, mcfg.saliency_slices, own, fan_out)
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


def output_subname(cfg: Config, mcfg: ModelConfig) -> str:
    """'' for the first configured model (its outputs where a single model's always were:
    ``saliency/``, ``labels/model``); for the others a file-safe form of their name, so that
    models running side by side on one study never write the same files.

    >>> cfg = Config.model_validate({"models": [{"name": "a"}, {"name": "Head CT/v2"}]})
    >>> [output_subname(cfg, m) for m in cfg.inference_models()]
    ['', 'head-ct-v2']
    """
    models = cfg.inference_models()
    if not models or models[0] is mcfg:
        return ""
    return re.sub(r"[^a-z0-9._]+", "-", configured_name(mcfg).lower()).strip("-.") or f"model{models.index(mcfg)}"


def _saliency(study_dir: Path, image_path: Path, scores: np.ndarray, info: ModelInfo, k: int,
              subdir: str = "", fan_out: bool = False) -> list[dict]:
    """Saliency PNGs for the ``k`` highest finite-scoring slices, made here or (``fan_out``) in a worker task."""
    if k <= 0:
        return []
    finite = np.flatnonzero(np.isfinite(scores))
    top = finite[np.argsort(scores[finite])[::-1][:k]]
    if top.size == 0:
        return []
    slices = [int(z) for z in top]
    rel = f"{SALIENCY_DIR}/{subdir}" if subdir else SALIENCY_DIR
    out_dir = study_dir / rel
    if fan_out:
        pngs = dask.compute(dask.delayed(write_saliency, pure=False)(str(image_path), slices, info, str(out_dir)))[0]
    else:
        pngs = write_saliency(str(image_path), slices, info, str(out_dir))
    return [{"slice": z, "score": float(scores[z]), "png": f"{rel}/{Path(p).name}"}
            for z, p in zip(slices, pngs)]


def n_batches(n_slices: int, batch_size: int) -> int:
    """Number of model batches for a study of ``n_slices``."""
    return math.ceil(n_slices / batch_size)
