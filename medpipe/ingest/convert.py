"""Conversion: one planned series into ``image.zarr`` (OME-Zarr 0.5), streamed slab by slab.

Storage type
------------
Values are physical (HU for CT). When every slice's rescale has an integral slope and
intercept (CT: slope 1, intercept -1024) they are integers and are stored as int16, half the
bytes of float32; a value outside int16's range, or any fractional rescale, means float32.
``attributes.medpipe`` records ``units`` and ``dtype``.

Memory bound
------------
The volume is never held whole. It is written in *slabs*: whole Zarr chunk layers adding up
to about ``SLAB_MB`` (at least one layer; e.g. 4 layers of 8 slices of 512x512 int16, 16 MiB,
at the default ``chunk_mb=4``). One slab task decodes its slices into the slab, writes it,
then writes the slab's share of each pyramid level (downsampled from the slab in memory: level
0 is never read back). The chunk depth is a multiple of the pyramid's z reduction, so every
task owns whole chunks at every level and concurrent writers never share one. A task holds
the slab, its pyramid share (1/8 of it, then less), one decoded slice (or file) and the
compressed chunk being written: about ``1.5 * max(SLAB_MB, chunk layer)`` MiB plus one file,
i.e. about 24 MiB for 512x512 CT at the defaults, per concurrently running task (one per
worker thread; each thread keeps its slab buffer for its next task), independent of the
number of slices and studies.

Claims and values
-----------------
Nothing is allocated from a header claim that was not checked (:mod:`.checks`): the slab and
raw reads use the scan's checked Rows x Columns; a file decoded by pydicom is checked again
against its pixel data before decoding (it may have changed since the scan). Rescale values and
float voxels that are not finite follow ``ingest.on_nonfinite``: ``refuse`` drops the file as a
gap (with an issue naming it), ``warn`` sets those voxels to 0 with a warning naming the file.

Speed
-----
The scan's header facts travel in the plan (``StudyPlan.headers``), so headers are parsed once;
native little-endian monochrome pixels are read straight into the slab at the offset the scan
found (checked against the PixelData tag), other transfer syntaxes are decoded by pydicom.
Each slab task compresses and writes its own chunks (:func:`~medpipe.omezarr.write_block`),
so slab tasks run in parallel; figures in docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import os
import threading
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
from ..omezarr import choose_chunks, create_image, create_levels, downsample, pyramid_factors, write_block
from .checks import MAX_VOXELS, header_claim_problem
from .deid import source_facts
from .geometry import Frame, build_geometry, frames_from_columns, read_frames
from .mosaic import Mosaic, tile_frames
from .plan import StudyPlan
from .scan import pixels_in

log = logging.getLogger(__name__)

UNITS = {"CT": "HU", "PT": "BQML"}
PALETTE = "PALETTE COLOR"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_INT16 = np.iinfo(np.int16)
_PIXEL_TAG = b"\xe0\x7f\x10\x00"
# Slab tasks of about this many MiB: 16 MiB (32 CT slices) converted the ingest benchmark 5%
# faster than one 4 MiB chunk layer a task, 15% faster when written into recycled memory.
SLAB_MB = 16


class _Opaque:
    """Hides a list of frames from Dask, which would otherwise walk every dataclass and array in it."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class _OutOfRange(Exception):
    """An integral value does not fit int16: the study is written again as float32."""


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


def storage_dtype(frames: list[Frame]) -> np.dtype:
    """int16 when every frame's rescale keeps stored integers integral (grey images), else float32."""
    integral = all(f.samples == 1 and not f.floats and float(f.slope).is_integer()
                   and float(f.intercept).is_integer() for f in frames)
    return np.dtype(np.int16 if integral else np.float32)


def _read_raw(frame: Frame, out: np.ndarray | None = None) -> np.ndarray | None:
    """Native pixels read with NumPy at the scan's offset; None when the file no longer matches.

    With ``out`` (the frame's row of the slab) of the stored item size, the file is read
    straight into it (saving a copy) and a view of it with the stored dtype is returned.
    """
    offset, bits, stored, signed = frame.raw  # type: ignore[misc]
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    n = frame.rows * frame.columns
    into = (out.view(dtype) if out is not None and out.dtype.itemsize == dtype.itemsize
            and out.shape == (frame.rows, frame.columns) and out.flags.c_contiguous else None)
    arr = into.reshape(-1) if into is not None else np.empty(n, dtype)
    # explicit VR: tag, VR, reserved, length (12 bytes); implicit VR: tag, length (8 bytes)
    head = bytearray(min(offset, 12))
    if _pread(frame.path, [head, memoryview(arr).cast("B")], offset - len(head)) != len(head) + arr.nbytes:
        return None
    if not (head[:4] == _PIXEL_TAG or head[-8:-4] == _PIXEL_TAG):
        return None
    if stored < bits:  # as pydicom does: ignore the unused high bits (sign-extending if signed)
        shift = bits - stored
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr.reshape(frame.rows, frame.columns)


def _pread(path: str, buffers: list[Any], offset: int) -> int:
    """Fill ``buffers`` with the file's bytes from ``offset`` on (one POSIX ``preadv``); the
    number of bytes read. One call instead of a buffered file's open, seek, read and close:
    the slab tasks' threads then hand the GIL over once per slice, not at every step."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, buffers, offset)
    finally:
        os.close(fd)


def decode_stored(ds: pydicom.Dataset | None, frame: Frame, out: np.ndarray | None = None,
                  max_series_voxels: int = MAX_VOXELS) -> np.ndarray:
    """One frame's stored values (2-D); RGB reduced to luminance (float32). ``ds`` may be None
    when ``frame.raw`` says where NumPy can read the pixels; those may be read into ``out``;
    else the file is read (and its claims checked, see :func:`_read_pixels`)."""
    arr = _read_raw(frame, out) if frame.raw is not None else None
    if arr is None:
        if ds is None:
            ds = _read_pixels(frame.path, frame, max_series_voxels)
        if frame.index is None:
            arr = ds.pixel_array  # pydicom keeps it: the tiles of a mosaic decode it once
        else:
            arr = pydicom.pixels.pixel_array(ds, index=frame.index)
        arr = np.asarray(arr)
        if frame.tile is not None:  # a slice of a Siemens mosaic: its tile of the montage
            top, left = frame.tile[:2]
            arr = arr[top : top + frame.rows, left : left + frame.columns]
        if _is_palette(ds):  # stored values are indices into the file's colour table, not intensities
            arr = pydicom.pixels.apply_color_lut(arr, ds)
        if frame.samples > 1 or arr.ndim == 3:  # RGB (pydicom converts YBR to RGB): one grey channel, BT.601 luma
            arr = arr[..., :3].astype(np.float32) @ _LUMA
    if arr.shape != (frame.rows, frame.columns):
        raise InputError(frame.path, f"decoded frame has shape {arr.shape}, header says {(frame.rows, frame.columns)}")
    return arr


def _is_palette(ds: pydicom.Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper() == PALETTE


def to_physical(stored: np.ndarray, frame: Frame, dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
    """Rescaled values as ``dtype``: exact integers for int16 (raises ``_OutOfRange``), else float32.

    For int16 the rescale runs in int16 arithmetic, which wraps modulo 2**16: exact whenever
    the results fit, which the stored extremes decide before anything is computed.
    """
    if dtype == np.int16:
        slope, intercept = int(frame.slope), int(frame.intercept)
        if stored.size:
            lo, hi = int(stored.min()), int(stored.max())
            ends = (lo * slope + intercept, hi * slope + intercept)
            if min(ends) < _INT16.min or max(ends) > _INT16.max:
                raise _OutOfRange(frame.path)
        if out is None:
            out = np.empty(stored.shape, np.int16)
        if stored.dtype.itemsize > 2:  # values may exceed 16 bits; results fit: reduce first
            stored = stored.astype(np.int64)
        if not (stored.ctypes.data == out.ctypes.data and stored.dtype.itemsize == 2):  # read in place
            np.copyto(out, stored, casting="unsafe")
        if slope != 1:
            np.multiply(out, _wrap16(slope), out=out)
        if intercept != 0:
            np.add(out, _wrap16(intercept), out=out)
        return out
    res = stored.astype(np.float32, copy=False)
    if frame.slope != 1.0 or frame.intercept != 0.0:
        res = res * np.float32(frame.slope) + np.float32(frame.intercept)
    if out is not None:
        out[...] = res
        return out
    return res


def _wrap16(value: int) -> np.int16:
    """``value`` modulo 2**16 as an int16 scalar (exact in int16 arithmetic)."""
    return np.array(value % 2**16, np.uint16).view(np.int16)[()]


def decode_frame(ds: pydicom.Dataset | None, frame: Frame) -> np.ndarray:
    """One frame in physical units (float32, 2-D): rescaled; RGB reduced to luminance."""
    return to_physical(decode_stored(ds, frame), frame, np.dtype(np.float32))


def _read_pixels(path: str, frame: Frame | None = None, max_series_voxels: int = MAX_VOXELS) -> pydicom.Dataset:
    """The whole file read by pydicom, once its pixel claims are checked against its pixel data
    and, given ``frame``, against the shape the scan found: a decoder allocates what the header
    claims, and the file may have changed since the scan (:class:`InputError` naming it)."""
    ds = pydicom.dcmread(path, force=True)
    _ensure_transfer_syntax(ds)
    pixels = pixels_in(ds)
    problem = header_claim_problem(ds, pixels, max_series_voxels) if pixels.present else "no pixel data"
    if problem:
        raise InputError(path, f"{problem} (the file changed since the scan)" if frame else problem)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples, n = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("NumberOfFrames", 1) or 1)
    if frame is not None:
        found = frame.tile[2:] if frame.tile is not None else (frame.rows, frame.columns)  # a tile: its montage
        if (rows, cols, samples) != (*found, frame.samples) or (frame.index or 0) >= n:
            raise InputError(path, f"header claims {rows} x {cols} x {n} x {samples} sample(s), the scan found "
                                   f"{found[0]} x {found[1]} (frame {frame.index or 0}) x {frame.samples}: "
                                   "the file changed since the scan")
    return ds


def _nonfinite(row: np.ndarray, frame: Frame, on_nonfinite: str) -> str | None:
    """Apply ``ingest.on_nonfinite`` to a frame of float pixel data: refuse raises
    :class:`InputError`, warn sets NaN/Inf voxels to 0 and says so; None when all are finite."""
    finite = np.isfinite(row)
    if finite.all():
        return None
    what = f"{row.size - int(finite.sum())} NaN/Inf voxel(s) in float pixel data"
    if on_nonfinite == "refuse":
        raise InputError(frame.path, f"{what} (ingest.on_nonfinite=refuse)")
    row[~finite] = 0
    return f"{frame.path}: {what} set to 0 (ingest.on_nonfinite=warn)"


_THREAD = threading.local()


def _slab_buffer(shape: tuple[int, int, int], dtype: np.dtype) -> np.ndarray:
    """This thread's slab buffer, reused by its next slab task (every row is overwritten).

    A fresh array per slab pays its page faults again: on the ingest benchmark (then with
    16 MiB slabs) ``ingest_study`` took 0.70 s in a fresh process against 0.55 s once warm.
    """
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = getattr(_THREAD, "slab", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _THREAD.slab = np.empty(nbytes, np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def write_slab(levels: list[zarr.Array] | _Opaque, z0: int, frames: list[Frame] | _Opaque, dtype: str,
               factors: list[tuple[int, int, int]], max_series_voxels: int = MAX_VOXELS,
               on_nonfinite: str = "refuse") -> tuple[list[tuple[int, str]], bool, list[str]]:
    """Decode ``frames`` into a slab, write it at ``z0`` of level 0 and its share of each level below.

    ``levels`` are the pyramid's arrays, level 0 first (opened once per study, not per slab);
    ``factors`` the reductions between them. The slab covers whole chunks at every level, so
    concurrent slab writers never share a chunk. Returns ``(slab index, reason)`` for each
    frame that could not be decoded or was refused (left at 0), whether a value did not fit
    int16 (then nothing is written), and a warning for each frame whose NaN/Inf voxels were set
    to 0 (``on_nonfinite="warn"``). Nothing is raised, so that every slab task has finished when
    the caller decides what to do.
    """
    frames = frames.value if isinstance(frames, _Opaque) else frames
    levels = levels.value if isinstance(levels, _Opaque) else levels
    first = frames[0]
    slab = _slab_buffer((len(frames), first.rows, first.columns), np.dtype(dtype))
    failed: list[tuple[int, str]] = []
    fixed: list[str] = []
    cache: tuple[str, pydicom.Dataset | None] | None = None  # consecutive frames of one multi-frame file
    for k, frame in enumerate(frames):
        try:
            if frame.raw is None and (cache is None or cache[0] != frame.path):
                cache = (frame.path, _read_pixels(frame.path, frame, max_series_voxels))
            ds = cache[1] if cache is not None and cache[0] == frame.path else None
            to_physical(decode_stored(ds, frame, slab[k], max_series_voxels), frame, slab.dtype, out=slab[k])
            if frame.floats:  # integers with checked rescale values are finite: no pass over them
                warning = _nonfinite(slab[k], frame, on_nonfinite)
                if warning:
                    fixed.append(warning)
        except _OutOfRange:
            return failed, True, fixed
        except InputError as exc:
            failed.append((k, exc.reason))
            slab[k] = 0
        except Exception as exc:  # decoders raise many types; all mean the same for us
            failed.append((k, f"cannot decode pixel data: {type(exc).__name__}: {exc}"))
            slab[k] = 0
    write_block(levels[0], (z0, 0, 0), slab)
    block = slab
    for level, f in zip(levels[1:], factors):
        block = downsample(block, f)
        z0 //= f[0]
        if block.shape[0]:
            write_block(level, (z0, 0, 0), block)
    return failed, False, fixed


def _write_volume(image_path: Path, geo: Any, dtype: np.dtype, cfg: IngestConfig, attrs: dict[str, Any]
                  ) -> tuple[tuple[int, int, int], list[tuple[Frame, str]], list[str]]:
    """Create the image and its pyramid and stream every slab into them, in parallel on Dask."""
    chunks = choose_chunks(geo.shape, dtype.itemsize, cfg.chunk_mb)
    factors = pyramid_factors(geo.shape, cfg.pyramid_levels)
    z_steps = np.cumprod([f[0] for f in factors]).tolist()
    total = z_steps[-1] if z_steps else 1
    depth = chunks[0]
    if depth < geo.shape[0]:  # a multiple of the z reduction: whole chunks at every level
        depth = max(total, depth // total * total)
    chunks = (depth, *chunks[1:])
    create_image(image_path, geo.shape, dtype, geo.spacing, geo.affine, chunks=chunks,
                 attrs={**attrs, "dtype": dtype.name})
    levels = _Opaque(create_levels(image_path, cfg.pyramid_levels, z_chunks=[max(1, depth // z) for z in z_steps]))
    layer = depth * geo.shape[1] * geo.shape[2] * dtype.itemsize
    step = depth * max(1, SLAB_MB * 2**20 // layer)  # slices a slab task writes: whole chunk layers
    starts = range(0, geo.shape[0], step)
    write = dask.delayed(write_slab, pure=False)
    tasks = [write(levels, z0, _Opaque(geo.frames[z0 : z0 + step]), dtype.name, factors, cfg.max_series_voxels,
                   cfg.on_nonfinite) for z0 in starts]
    results = dask.compute(*tasks)
    if any(overflow for _, overflow, _ in results):
        raise _OutOfRange(image_path)
    failed = [(geo.frames[z0 + k], reason) for z0, (res, _, _) in zip(starts, results) for k, reason in res]
    return chunks, failed, [w for _, _, fixed in results for w in fixed]


def _study_frames(plan: StudyPlan, cfg: IngestConfig) -> tuple[list[Frame], list[str], list[dict[str, Any]]]:
    """The frames of the plan's files, and the warnings and issues of ``ingest.on_nonfinite``
    about rescale values (per frame in enhanced objects, which the scan does not parse). A
    Siemens mosaic (``plan.mosaic``) is one file whose frame is cut into its tiles' slices."""
    frames, warnings, issues = _file_frames(plan, cfg)
    if plan.mosaic and len(frames) == 1:
        frames = tile_frames(frames[0], Mosaic.from_dict(plan.mosaic))
    return frames, warnings, issues


def _file_frames(plan: StudyPlan, cfg: IngestConfig) -> tuple[list[Frame], list[str], list[dict[str, Any]]]:
    """The frames of the plan's files as stored (see :func:`_study_frames`)."""
    if plan.headers and len(plan.headers.get("rows", ())) == len(plan.files):
        return frames_from_columns(plan.files, plan.headers), [], []
    frames: list[Frame] = []
    warnings: list[str] = []
    issues: list[dict[str, Any]] = []
    for path in plan.files:
        try:
            more, problems = read_frames(path, cfg.max_series_voxels)
        except InputError as exc:
            raise StudyError(plan.study_key, str(exc)) from None
        except Exception as exc:
            raise StudyError(plan.study_key, f"{path}: unreadable header: {exc}") from None
        if problems:
            where = ", ".join("" if i is None else f"frame {i}" for i, _ in problems[:3]).strip(", ")
            why = (f"{where}: " if where else "") + problems[0][1] + \
                (f" (and {len(problems) - 1} more frame(s))" if len(problems) > 1 else "")
            if cfg.on_nonfinite == "refuse":
                issues.append({"path": path, "reason": f"{why} (ingest.on_nonfinite=refuse)",
                               "study_key": plan.study_key})
                continue
            for f in more:
                if not (np.isfinite(f.slope) and np.isfinite(f.intercept)):
                    f.slope, f.intercept = 0.0, 0.0  # every voxel would be non-finite: all become 0
            warnings.append(f"{path}: {why}; voxels of those frames set to 0 (ingest.on_nonfinite=warn)")
        frames.extend(more)
    if not frames and issues:
        raise StudyError(plan.study_key, f"{issues[0]['path']}: {issues[0]['reason']}")
    return frames, warnings, issues


def ingest_study(plan: StudyPlan | dict[str, Any], study_dir: str | Path, cfg: IngestConfig | None = None) -> dict[str, Any]:
    """Convert a study's chosen series into ``study_dir/image.zarr`` and describe the result.

    Slices are sorted along the slice normal, rescaled per slice (per frame for enhanced
    multi-frame objects) to physical values (HU for CT; int16 when integral, else float32),
    and streamed slab by slab, with their multiscale pyramid, into chunked, compressed Zarr in
    parallel on the active Dask scheduler. A slice whose pixels cannot be decoded is dropped
    with a warning naming its file, as a gap (``on_inconsistency="refuse"`` refuses it). See
    the module docstring for the memory bound and the storage type.

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
        ``units``, ``dtype``, ``series`` (key, cleaned description, counts, why selected, skipped series),
        ``warnings``, ``issues`` and ``source`` (non-identifying technical facts only).

    Raises
    ------
    StudyError
        The study has no usable series, an inconsistency (or an undecodable slice) is refused
        by configuration, or no file of the series can be decoded (path and reason in the
        message).
    """
    cfg = cfg or IngestConfig()
    if isinstance(plan, dict):
        plan = StudyPlan.from_dict(plan)
    if not plan.files:
        raise StudyError(plan.study_key, plan.skip_reason or "no files to convert")
    frames, value_warnings, value_issues = _study_frames(plan, cfg)
    voxels = sum(f.rows * f.columns for f in frames)
    if voxels > cfg.max_series_voxels:  # the plan checked it; the files may have changed since
        raise StudyError(plan.study_key, f"{voxels:,} voxels, more than ingest.max_series_voxels="
                                         f"{cfg.max_series_voxels:,}")
    try:
        header = pydicom.dcmread(plan.files[0], stop_before_pixels=True, force=True)
    except Exception as exc:
        raise StudyError(plan.study_key, f"{plan.files[0]}: unreadable header: {exc}") from None
    image_path = Path(study_dir) / "image.zarr"
    units = UNITS.get(plan.modality, "")
    attrs = {"study_key": plan.study_key, "modality": plan.modality, "units": units, "series_key": plan.series_key}
    dropped: list[str] = []
    fixed: list[str] = []
    while True:
        geo = build_geometry(frames, plan.study_key, on_inconsistency=cfg.on_inconsistency,
                             spacing_tolerance=cfg.spacing_tolerance)
        dtype = np.dtype(np.float32) if plan.photometric == PALETTE else storage_dtype(geo.frames)
        try:
            chunks, failed, fixed = _write_volume(image_path, geo, dtype, cfg, attrs)
        except _OutOfRange:
            log.info("study %s: values beyond int16; writing float32", plan.study_key)
            dtype = np.dtype(np.float32)
            chunks, failed, fixed = _write_volume(image_path, geo, dtype, cfg, attrs)
        if not failed:
            break
        # An undecodable slice is dropped and becomes a gap: the inconsistency policy decides.
        first_path, first_reason = failed[0][0].path, failed[0][1]
        if len(failed) == len(geo.frames):
            raise StudyError(plan.study_key, f"{first_path}: {first_reason}")
        if cfg.on_inconsistency == "refuse":
            raise StudyError(plan.study_key, f"{first_path}: {first_reason} (slice would be dropped, leaving a "
                                             "gap; ingest.on_inconsistency=refuse)")
        bad = {id(f) for f, _ in failed}
        dropped += [f"slice dropped, {reason}: {f.path}" for f, reason in failed]
        value_issues += [{"path": f.path, "reason": f"slice dropped: {reason}", "study_key": plan.study_key}
                         for f, reason in failed]
        for f, reason in failed:
            log.warning("study %s: dropped slice %s: %s", plan.study_key, f.path, reason)
        frames = [f for f in geo.frames if id(f) not in bad]
    series = {
        "series_key": plan.series_key,
        "description": plan.series_description,
        "n_instances": len(plan.files),
        "n_frames": len(geo.frames),
        "selected_because": plan.selected_because,
        "skipped": plan.skipped,
    }
    source = source_facts(header, keep_dates=cfg.keep_dates) if header is not None else {}
    warnings = list(plan.warnings) + value_warnings + fixed + dropped + geo.warnings
    if any(f.samples > 1 for f in geo.frames[:1]):
        warnings.append("RGB image converted to luminance (0.299 R + 0.587 G + 0.114 B)")
    if plan.photometric == PALETTE:
        warnings.append("PALETTE COLOR image: colour table applied, converted to luminance (0.299 R + 0.587 G + 0.114 B)")
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
        "dtype": dtype.name,
        "chunks": list(chunks),
        "series": series,
        "warnings": warnings,
        "issues": list(plan.issues) + value_issues,
        "source": source,
    }
