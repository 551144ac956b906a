"""Conversion: one planned series into ``image.zarr`` (OME-Zarr 0.5), streamed slab by slab.

Memory bound
------------
The volume is never held whole. It is written in *slabs*: the slices of one Zarr chunk layer
(``chunks[0]`` slices, e.g. 16 slices of 512x512 at the default ``chunk_mb=4``). One slab task
holds its float32 slab, one decoded slice (or frame) and its dataset, and the compressed chunks
being written: about ``3 * chunk_mb * ceil(Y/256) * ceil(X/256)`` MiB plus one file, i.e. about
50 MiB for 512x512 CT at the defaults, per concurrently running task (one per worker thread),
independent of the number of slices and studies. The pyramid is built from the Zarr level by
Dask over chunks, within the same bound.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pydicom
import zarr
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..config import IngestConfig
from ..errors import InputError, StudyError
from ..omezarr import build_pyramid, choose_chunks, create_image
from .deid import source_facts
from .geometry import Frame, build_geometry, read_frames
from .plan import StudyPlan

log = logging.getLogger(__name__)

UNITS = {"CT": "HU", "PT": "BQML"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _ensure_transfer_syntax(ds: pydicom.Dataset) -> None:
    """Files without file meta: give pydicom the transfer syntax it detected while reading."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def decode_frame(ds: pydicom.Dataset, frame: Frame) -> np.ndarray:
    """One frame in physical units (float32, 2-D): rescaled; RGB reduced to luminance."""
    if frame.index is None:
        arr = ds.pixel_array
    else:
        arr = pydicom.pixels.pixel_array(ds, index=frame.index)
    arr = np.asarray(arr)
    if frame.samples > 1:  # RGB (pydicom converts YBR to RGB): one grey channel, ITU-R BT.601 luma
        arr = arr[..., :3].astype(np.float32) @ _LUMA
    out = arr.astype(np.float32, copy=False)
    if frame.slope != 1.0 or frame.intercept != 0.0:
        out = out * np.float32(frame.slope) + np.float32(frame.intercept)
    if out.shape != (frame.rows, frame.columns):
        raise InputError(frame.path, f"decoded frame has shape {out.shape}, header says {(frame.rows, frame.columns)}")
    return out


def _read_pixels(path: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(path, force=True)
    _ensure_transfer_syntax(ds)
    return ds


def write_slab(level0: str, z0: int, frames: list[Frame]) -> int:
    """Decode ``frames`` into a slab and write it at ``z0`` of the Zarr array at ``level0``.

    The slab covers whole chunks, so concurrent slab writers never share a chunk.
    """
    first = frames[0]
    slab = np.empty((len(frames), first.rows, first.columns), np.float32)
    cache: tuple[str, pydicom.Dataset] | None = None  # consecutive frames of one multi-frame file
    for k, frame in enumerate(frames):
        try:
            if cache is None or cache[0] != frame.path:
                cache = (frame.path, _read_pixels(frame.path))
            slab[k] = decode_frame(cache[1], frame)
        except InputError:
            raise
        except Exception as exc:  # decoders raise many types; all mean the same for us
            raise InputError(frame.path, f"cannot decode pixel data: {type(exc).__name__}: {exc}") from None
    zarr.open_array(level0, mode="r+")[z0 : z0 + len(frames)] = slab
    return len(frames)


def ingest_study(plan: StudyPlan | dict[str, Any], study_dir: str | Path, cfg: IngestConfig | None = None) -> dict[str, Any]:
    """Convert a study's chosen series into ``study_dir/image.zarr`` and describe the result.

    Slices are sorted along the slice normal, rescaled per slice (per frame for enhanced
    multi-frame objects) to float32 physical values (HU for CT), and streamed slab by slab
    into chunked, compressed Zarr in parallel on the active Dask scheduler; then a multiscale
    pyramid is built. See the module docstring for the memory bound.

    Parameters
    ----------
    plan : StudyPlan or its dict
    study_dir : path
        The study's (staging) folder; ``image.zarr`` is created inside it.
    cfg : IngestConfig, optional

    Returns
    -------
    dict
        JSON-safe: ``modality``, ``shape`` and ``spacing`` (z, y, x), ``affine_lps`` (4x4),
        ``units``, ``series`` (key, cleaned description, counts, why selected, skipped series),
        ``warnings``, ``issues`` and ``source`` (non-identifying technical facts only).

    Raises
    ------
    StudyError
        The study has no usable series, an inconsistency is refused by configuration, or a
        file of the series cannot be decoded (its path and the reason are in the message).
    """
    cfg = cfg or IngestConfig()
    if isinstance(plan, dict):
        plan = StudyPlan.from_dict(plan)
    if not plan.files:
        raise StudyError(plan.study_key, plan.skip_reason or "no files to convert")
    frames: list[Frame] = []
    header = None
    for path in plan.files:
        try:
            more, ds = read_frames(path)
        except Exception as exc:
            raise StudyError(plan.study_key, f"{path}: unreadable header: {exc}") from None
        frames.extend(more)
        header = header if header is not None else ds
    geo = build_geometry(frames, plan.study_key, on_inconsistency=cfg.on_inconsistency,
                         spacing_tolerance=cfg.spacing_tolerance)
    image_path = Path(study_dir) / "image.zarr"
    chunks = choose_chunks(geo.shape, 4, cfg.chunk_mb)
    units = UNITS.get(plan.modality, "")
    series = {
        "series_key": plan.series_key,
        "description": plan.series_description,
        "n_instances": len(plan.files),
        "n_frames": len(geo.frames),
        "selected_because": plan.selected_because,
        "skipped": plan.skipped,
    }
    arr = create_image(image_path, geo.shape, np.float32, geo.spacing, geo.affine, chunks=chunks,
                       attrs={"study_key": plan.study_key, "modality": plan.modality, "units": units,
                              "series_key": plan.series_key})
    level0 = str(image_path / "0")
    depth = arr.chunks[0]
    tasks = [dask.delayed(write_slab, pure=False)(level0, z0, geo.frames[z0 : z0 + depth])
             for z0 in range(0, geo.shape[0], depth)]
    try:
        dask.compute(*tasks)
    except InputError as exc:
        raise StudyError(plan.study_key, str(exc)) from None
    build_pyramid(image_path, cfg.pyramid_levels)
    source = source_facts(header, keep_dates=cfg.keep_dates) if header is not None else {}
    warnings = list(plan.warnings) + geo.warnings
    if any(f.samples > 1 for f in geo.frames[:1]):
        warnings.append("RGB image converted to luminance (0.299 R + 0.587 G + 0.114 B)")
    if source.get("photometric") == "MONOCHROME1":
        warnings.append("MONOCHROME1: values kept as stored (high values display dark)")
    log.info("study %s: wrote %s %s volume", plan.study_key, "x".join(map(str, geo.shape)), plan.modality)
    return {
        "study_key": plan.study_key,
        "modality": plan.modality,
        "shape": list(geo.shape),
        "spacing": list(geo.spacing),
        "affine_lps": geo.affine.tolist(),
        "units": units,
        "chunks": list(chunks),
        "series": series,
        "warnings": warnings,
        "issues": list(plan.issues),
        "source": source,
    }
