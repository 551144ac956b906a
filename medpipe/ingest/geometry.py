"""Slice geometry: per-frame headers, sorting along the slice normal, consistency checks, affine.

Conventions (those of :mod:`medpipe.omezarr`): the volume is indexed (z, y, x) = (slice, row,
column); the 4x4 affine maps voxel indices (x, y, z, 1) to patient LPS millimetres, with
columns ``row_cosines * column_spacing``, ``column_cosines * row_spacing``, the mean step
between consecutive slice positions, and the first slice's ImagePositionPatient.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom

from ..errors import InputError, StudyError
from .checks import MAX_VOXELS, header_claim_problem, rescale_number, rescale_problem
from .scan import pixel_element

DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ORIENTATION_TOL = 1e-4  # direction cosines
DUPLICATE_TOL = 1e-3  # mm along the normal
TILT_TOL_DEG = 0.1


@dataclass
class Frame:
    """One 2-D image to place: a single-frame file, or frame ``index`` of a multi-frame file."""

    path: str
    index: int | None
    rows: int
    columns: int
    samples: int
    slope: float = 1.0
    intercept: float = 0.0
    position: np.ndarray | None = None
    orientation: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, float] | None = None
    thickness: float | None = None
    spacing_between: float | None = None  # SpacingBetweenSlices, for frames without positions
    raw: tuple[int, int, int, int] | None = None  # (offset, BitsAllocated, BitsStored, PixelRepresentation)
    floats: bool = False  # float pixel data (may hold NaN/Inf; never stored as int16)
    # A slice of a Siemens mosaic (.mosaic): (top, left) of its tile and (rows, columns) of the
    # whole montage, which is decoded and cut; rows and columns above are the tile's.
    tile: tuple[int, int, int, int] | None = None


def frames_from_columns(files: list[str], cols: dict[str, list[Any]]) -> list[Frame]:
    """Frames of single-frame files from the scan's header facts (``StudyPlan.headers``)."""
    tup = lambda v: tuple(v) if v is not None else None  # noqa: E731
    floats = cols.get("floats") or [False] * len(files)  # plans made before the column existed
    return [
        Frame(path, None, rows, columns, samples, float(rescale[0]), float(rescale[1]),
              None if pos is None else np.asarray(pos, dtype=np.float64), tup(ori), tup(spacing),  # type: ignore[arg-type]
              thick, between, tup(raw), bool(flt))  # type: ignore[arg-type]
        for path, rows, columns, samples, rescale, pos, ori, spacing, thick, between, raw, flt in zip(
            files, cols["rows"], cols["columns"], cols["samples_per_pixel"], cols["rescale"], cols["position"],
            cols["orientation"], cols["pixel_spacing"], cols["slice_thickness"], cols["spacing_between"],
            cols["raw_pixels"], floats, strict=True)
    ]


@dataclass
class Geometry:
    """The frames in volume order and where the volume lies."""

    frames: list[Frame]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # z, y, x in mm
    affine: np.ndarray
    warnings: list[str] = field(default_factory=list)


def _first(seq: Any) -> Any:
    return seq[0] if seq is not None and len(seq) else None


def _group_value(ds: Any, frame: Any, seq: str, keyword: str) -> Any:
    """A functional-group attribute: the per-frame value, else the shared one, else None."""
    for source in (frame, _first(ds.get("SharedFunctionalGroupsSequence"))):
        if source is None:
            continue
        item = _first(source.get(seq))
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _float(value: Any, default: float | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def read_frames(path: str, max_series_voxels: int = MAX_VOXELS) -> tuple[list[Frame], list[tuple[int | None, str]]]:
    """The frames of one file with their geometry and rescale (per frame for enhanced objects).

    The header's pixel claims are checked against its pixel data first (as the scan does: the
    file may have changed since), raising :class:`~medpipe.errors.InputError`. Returns the
    frames and ``(frame index or None, reason)`` for each frame whose rescale values are not
    finite numbers (their slope and intercept are then NaN: the caller applies the policy).
    """
    with open(path, "rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        pixels = pixel_element(fp, os.fstat(fp.fileno()).st_size, ds)
    problem = header_claim_problem(ds, pixels, max_series_voxels) if pixels.present else "no pixel data"
    if problem:
        raise InputError(path, problem)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    stored_bits = int(ds.get("BitsStored", bits) or bits or 16)
    spacing = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    between = _float(ds.get("SpacingBetweenSlices"), None)
    problems: list[tuple[int | None, str]] = []

    def rescale(index: int | None, slope: Any, intercept: Any) -> tuple[float, float]:
        why = "; ".join(p for p in (rescale_problem(slope, "RescaleSlope", stored_bits, 1.0),
                                    rescale_problem(intercept, "RescaleIntercept", 0, 0.0)) if p)
        if why:
            problems.append((index, why))
            return np.nan, np.nan
        return rescale_number(slope, 1.0)[0], rescale_number(intercept, 0.0)[0]

    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if n == 1 and per_frame is None:
        return [Frame(path, None, rows, cols, samples, *rescale(None, slope, intercept),
                      _array(ds.get("ImagePositionPatient"), 3), _floats(ds.get("ImageOrientationPatient"), 6),
                      spacing, _float(ds.get("SliceThickness"), None), between,  # type: ignore[arg-type]
                      floats=pixels.floats)], problems
    frames = []
    for i in range(n):
        fg = per_frame[i] if per_frame is not None and i < len(per_frame) else None
        f_slope = _group_value(ds, fg, "PixelValueTransformationSequence", "RescaleSlope")
        f_int = _group_value(ds, fg, "PixelValueTransformationSequence", "RescaleIntercept")
        pos = _array(_group_value(ds, fg, "PlanePositionSequence", "ImagePositionPatient"), 3)
        ori = _floats(_group_value(ds, fg, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        f_spacing = _floats(_group_value(ds, fg, "PixelMeasuresSequence", "PixelSpacing"), 2) or spacing
        thick = _float(_group_value(ds, fg, "PixelMeasuresSequence", "SliceThickness"),
                       _float(ds.get("SliceThickness"), None))
        f_rescale = rescale(i, slope if f_slope is None else f_slope, intercept if f_int is None else f_int)
        frames.append(Frame(path, i, rows, cols, samples, *f_rescale, pos,
                            ori or _floats(ds.get("ImageOrientationPatient"), 6), f_spacing,  # type: ignore[arg-type]
                            thick, between, floats=pixels.floats))
    return frames, problems


def _array(value: Any, n: int) -> np.ndarray | None:
    v = _floats(value, n)
    return None if v is None else np.asarray(v, dtype=np.float64)


def _inconsistent(msg: str, study_key: str, on_inconsistency: str, warnings: list[str]) -> None:
    if on_inconsistency == "refuse":
        raise StudyError(study_key, f"{msg} (ingest.on_inconsistency=refuse)")
    warnings.append(msg)


def _majority(frames: list[Frame], key: Any, what: str, study_key: str, policy: str,
              warnings: list[str]) -> list[Frame]:
    counts = Counter(key(f) for f in frames)
    if len(counts) <= 1:
        return frames
    keep, n_keep = counts.most_common(1)[0]
    _inconsistent(f"mixed {what} in the series ({len(counts)} kinds); kept the {n_keep} frame(s) of the most "
                  f"common one, dropped {len(frames) - n_keep}", study_key, policy, warnings)
    return [f for f in frames if key(f) == keep]


def _pixel_spacing(spacing: tuple[float, float] | None, warnings: list[str]) -> tuple[float, float]:
    r"""The in-plane spacing, or 1 mm with a warning when absent or not positive (real radiographs
    carry ``0\0``, which would make a singular affine and zero volumes).

    >>> w = []; _pixel_spacing((0.0, 0.0), w), w
    ((1.0, 1.0), ['PixelSpacing 0\\0 is not positive; 1 mm assumed'])
    """
    if spacing is None:
        warnings.append("no PixelSpacing; 1 mm assumed")
        return (1.0, 1.0)
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        warnings.append(f"PixelSpacing {spacing[0]:g}\\{spacing[1]:g} is not positive; 1 mm assumed")
        return (1.0, 1.0)
    return spacing


def build_geometry(
    frames: list[Frame],
    study_key: str,
    *,
    on_inconsistency: str = "warn",
    spacing_tolerance: float = 0.05,
) -> Geometry:
    """Sort ``frames`` along the slice normal, check them, and compute the volume's geometry.

    Detects mixed shapes, mixed orientations, duplicate positions (dropped, keeping the
    first), inconsistent spacing (missing slices) and gantry tilt. Each is a warning, or a
    :class:`~medpipe.errors.StudyError` with ``on_inconsistency="refuse"``. The affine uses the
    mean step between slice positions, so a tilted series keeps its true (sheared) geometry.
    """
    if not frames:
        raise StudyError(study_key, "no image frames to convert")
    warnings: list[str] = []
    frames = _majority(frames, lambda f: (f.rows, f.columns, f.samples), "image shapes", study_key,
                       on_inconsistency, warnings)
    positioned = [f for f in frames if f.position is not None]
    if len(frames) > 1 and 0 < len(positioned) < len(frames):
        _inconsistent(f"{len(frames) - len(positioned)} frame(s) without ImagePositionPatient dropped",
                      study_key, on_inconsistency, warnings)
        frames = positioned
    first = frames[0]
    orientation = first.orientation
    if orientation is not None:
        frames = _majority(frames, lambda f: tuple(np.round(np.asarray(f.orientation or orientation) / ORIENTATION_TOL)),
                           "orientations", study_key, on_inconsistency, warnings)
        orientation = frames[0].orientation
    if orientation is None:
        orientation = DEFAULT_ORIENTATION
        if len(frames) == 1 and first.position is None:
            pass  # a projection radiograph or secondary capture: no patient geometry to keep
        else:
            warnings.append("no ImageOrientationPatient; axial orientation assumed")
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:], float)
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    pixel_spacing = _pixel_spacing(first.pixel_spacing, warnings)
    thickness = next((v for v in (first.spacing_between, first.thickness) if v and v > 0), None)

    if all(f.position is not None for f in frames):
        dist = np.array([float(f.position @ normal) for f in frames])  # type: ignore[operator]
        order = np.argsort(dist, kind="stable")
        frames = [frames[i] for i in order]
        dist = dist[order]
        dup = np.concatenate([[False], np.diff(dist) < DUPLICATE_TOL])
        if dup.any():
            _inconsistent(f"{int(dup.sum())} slice(s) at duplicate positions dropped (first kept)",
                          study_key, on_inconsistency, warnings)
            frames = [f for f, d in zip(frames, dup) if not d]
            dist = dist[~dup]
        origin = frames[0].position
        if len(frames) > 1:
            steps = np.diff(dist)
            median = float(np.median(steps))
            if np.any(np.abs(steps - median) > spacing_tolerance * median):
                missing = int(np.sum(np.rint(steps / median) - 1).clip(0))
                _inconsistent(
                    f"inconsistent slice spacing ({steps.min():.4g} to {steps.max():.4g} mm, median {median:.4g} mm"
                    + (f"; about {missing} missing slice(s)" if missing else "") + ")",
                    study_key, on_inconsistency, warnings)
            step = (frames[-1].position - frames[0].position) / (len(frames) - 1)  # type: ignore[operator]
            along = float(step @ normal)
            tilt = float(np.degrees(np.arctan2(np.linalg.norm(step - along * normal), along)))
            if tilt > TILT_TOL_DEG:
                _inconsistent(f"gantry tilt of {tilt:.2f} degrees (sheared affine kept)", study_key,
                              on_inconsistency, warnings)
            dz = along
        else:
            dz = thickness or 1.0
            step = normal * dz
    else:
        if len(frames) > 1:
            warnings.append("no slice positions; frames stacked in file order")
        origin = np.zeros(3)
        dz = thickness or 1.0
        step = normal * dz
    affine = np.eye(4)
    affine[:3, 0] = row * pixel_spacing[1]
    affine[:3, 1] = col * pixel_spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = origin  # type: ignore[assignment]
    return Geometry(frames, (len(frames), first.rows, first.columns),
                    (float(dz), float(pixel_spacing[0]), float(pixel_spacing[1])), affine, warnings)
