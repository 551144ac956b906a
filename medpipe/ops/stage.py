"""The filter and segment stages of one study, as plain functions on paths.

The lead's Prefect tasks call these; they only build Dask graphs and call ``compute`` /
``da.store`` (a distributed client, when active, is picked up by Dask itself).

``filter_study`` always writes ``filtered.zarr`` (float32), also for an empty pipeline (then a
float32 copy of the image), so that ``segment_study`` has one input to read.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from .. import omezarr
from ..config import Config, FilterStep
from ..errors import ConfigError, InputError
from . import FILTERS
from ._backend import resolve_device, to_device, to_numpy
from .ct_slabs import slab_bounds
from .filter_slabs import filter_slabs, pipeline_halo

log = logging.getLogger(__name__)

FILTERED = "filtered.zarr"


def working_chunks(shape: tuple[int, ...], itemsize: int, workers: int = 2, target_mb: float = 256.0) -> tuple[int, ...]:
    """Compute chunks: slabs along z spanning whole slices, as many as a multiple of ``workers``.

    Large slabs keep the halo small relative to the block (a Gaussian of sigma 2 reaches 8
    voxels) while every worker gets the same number of blocks.

    >>> working_chunks((320, 512, 512), 4, workers=2, target_mb=128.0)
    (80, 512, 512)
    >>> working_chunks((1, 64, 64), 4)
    (1, 64, 64)
    """
    slice_mb = math.prod(shape[1:]) * itemsize / 2**20
    n = max(1, workers)
    while math.ceil(shape[0] / n) * slice_mb > target_mb and n < shape[0]:
        n += max(1, workers)
    return (math.ceil(shape[0] / min(n, shape[0])), *shape[1:])


def resolve_filter(step: FilterStep, where: str) -> Any:
    """The function behind ``step.op``; a ``ConfigError`` names an unknown operator.

    ``Config`` checks steps when it loads (:mod:`medpipe.ops._check`); this catches copies made
    without validation.
    """
    if step.op not in FILTERS:
        hint = " (resample changes the shape: a library function, not a pipeline step)" \
            if step.op == "resample" else ""
        raise ConfigError(f"{where}: unknown operator {step.op!r}{hint} (known: {', '.join(sorted(FILTERS))})")
    return FILTERS[step.op]


def _open_level0(study_dir: Path) -> tuple[Path, zarr.Array]:
    image_path = study_dir / "image.zarr"
    try:
        return image_path, zarr.open_array(str(image_path / "0"), mode="r")
    except Exception as exc:  # missing folder, broken metadata
        raise InputError(image_path, f"cannot open image level 0: {exc}") from None


def filter_study(study_dir: Path, modality: str, cfg: Config) -> dict:
    """Apply the modality's filter pipeline to ``image.zarr`` level 0, write ``filtered.zarr``.

    Returns
    -------
    dict
        ``{"steps": [{"op", "params"}], "device": "cpu"|"gpu", "shape": [z, y, x]}``.
    """
    study_dir = Path(study_dir)
    steps = cfg.filters.for_modality(modality)
    where = f"filters.pipelines.{modality if modality in cfg.filters.pipelines else 'default'}"
    funcs = [resolve_filter(s, f"{where}[{i}]") for i, s in enumerate(steps)]
    device = resolve_device(cfg.cluster.device)
    image_path, level0 = _open_level0(study_dir)

    # The lazy Dask pipeline checks every step's parameters (and runs pipelines that are not
    # slab-local); slab-local ones run slab by slab straight from and to Zarr.
    work = _read_working(level0, cfg)
    work = to_device(work.astype(np.float32), device)
    for i, (step, func) in enumerate(zip(steps, funcs)):
        try:
            work = func(work, **step.params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}[{i}] ({step.op}) params {step.params}: {exc}") from None
    out = to_numpy(work).astype(np.float32)

    # Write beside the final name, then swap, so a crash never leaves half a filtered.zarr.
    final = study_dir / FILTERED
    tmp = study_dir / f".{FILTERED}.tmp"
    target = zarr.create_array(str(tmp), shape=level0.shape, chunks=level0.chunks, dtype=np.float32,
                               compressors=omezarr._compressors(), fill_value=0, overwrite=True,
                               **omezarr.ARRAY_LAYOUT)
    halo = pipeline_halo(steps, funcs) if level0.ndim == 3 else None
    if halo is None:
        omezarr.store_aligned(out, target)
    else:
        bounds = slab_bounds(level0.shape[0], math.prod(level0.shape[1:]), level0.chunks[0])
        filter_slabs(str(image_path / "0"), str(tmp), bounds, halo, funcs, [dict(s.params) for s in steps], device)
    from ..atomic import replace_dir

    replace_dir(tmp, final)
    log.info("filtered %s with %d steps on %s", study_dir.name, len(steps), device)
    return {"steps": [{"op": s.op, "params": dict(s.params)} for s in steps], "device": device,
            "shape": list(level0.shape)}


def _read_working(array: zarr.Array, cfg: Config) -> da.Array:
    """``array`` as a Dask array in working chunks, each read by one task from its Zarr chunks
    (not one task per Zarr chunk and a concatenation of them, as a rechunk would)."""
    return da.from_zarr(array, chunks=working_chunks(array.shape, 4, cfg.cluster.workers, cfg.filters.work_chunk_mb))


def segment_study(study_dir: Path, modality: str, cfg: Config) -> dict:
    """Segment ``filtered.zarr`` with the modality's method; write labels into ``image.zarr``.

    Tissue classes come from the filtered image; lesions and all intensity measurements
    (``mean``, ``std`` in the image's units, HU for CT) from the unfiltered level 0.

    Returns
    -------
    dict
        ``method``, ``labels`` (``{str(id): name}``), ``measurements`` (per label: ``label,
        name, voxels, volume_ml, bbox, centroid_mm, mean, std``), ``lesion_candidates`` (``id,
        voxels, volume_ml, centroid_mm, bbox, mean``) and ``warnings``.
    """
    from .measure import region_stats
    from .methods import METHODS

    study_dir = Path(study_dir)
    step = cfg.segment.for_modality(modality)
    where = f"segment.methods.{modality if modality in cfg.segment.methods else 'default'}"
    if step.op not in METHODS:
        raise ConfigError(f"{where}: unknown method {step.op!r} (known: {', '.join(sorted(METHODS))})")
    device = resolve_device(cfg.cluster.device)
    image_path, level0 = _open_level0(study_dir)
    meta = omezarr.read_meta(image_path)
    filtered_path = study_dir / FILTERED
    try:
        filtered = zarr.open_array(str(filtered_path), mode="r")
    except Exception as exc:
        raise InputError(filtered_path, f"cannot open filtered image (run filter_study first): {exc}") from None
    if tuple(filtered.shape) != tuple(meta.shape):
        raise InputError(filtered_path, f"shape {filtered.shape} differs from image shape {meta.shape}")
    params = dict(step.params)
    if step.op == "ct_tissues":
        # Streamed in z-slabs straight from and to Zarr: worker memory bounded by the slab.
        from .ct_slabs import ct_tissues_slabs

        try:
            seg, measurements = ct_tissues_slabs(
                study_dir, filtered_path, spacing=meta.spacing, affine=meta.affine, device=device,
                lesion_min_ml=cfg.segment.lesion_min_ml, lesion_max_ml=cfg.segment.lesion_max_ml, **params)
        except TypeError as exc:
            raise ConfigError(f"{where} ({step.op}) params {params}: {exc}") from None
        return _segment_result(study_dir, step.op, seg, measurements)
    # Both volumes are read by several passes of the method and by the measurements: read and
    # decompress them once (held by the workers; raw in its stored dtype, int16 for CT).
    filtered, raw = dask.persist(to_device(_read_working(filtered, cfg), device),
                                 to_device(_read_working(level0, cfg), device))
    raw = raw.astype(np.float32)

    try:
        seg = METHODS[step.op](filtered, **params)
    except TypeError as exc:
        raise ConfigError(f"{where} ({step.op}) params {params}: {exc}") from None

    labels = to_numpy(seg.labels).astype(np.uint8)
    (labels,) = dask.persist(labels)  # written and measured: compute once (1 byte a voxel)
    omezarr.write_labels(image_path, labels, seg.names)
    measurements = region_stats(labels, to_numpy(raw), spacing=meta.spacing, affine=meta.affine,
                                n=max(seg.names), names=seg.names)
    return _segment_result(study_dir, step.op, seg, measurements)


def _segment_result(study_dir: Path, op: str, seg: Any, measurements: list[dict]) -> dict:
    """``segment_study``'s record of a segmentation and its measurements."""
    warnings = list(seg.warnings)
    present = {m["label"] for m in measurements}
    warnings += [f"{op}: no voxels labelled {name!r}" for v, name in sorted(seg.names.items())
                 if v not in present and name not in ("air", "lesion")]
    log.info("segmented %s with %s: %d labels, %d lesion candidates", study_dir.name, op,
             len(present), len(seg.lesion_candidates))
    return {
        "method": op,
        "labels": {str(k): v for k, v in sorted(seg.names.items())},
        "measurements": measurements,
        "lesion_candidates": seg.lesion_candidates,
        "warnings": warnings,
    }
