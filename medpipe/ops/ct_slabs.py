"""``ct_tissues`` of a study's Zarr volumes, streamed in z-slabs: memory bounded by the slab.

The same labels, lesion candidates and measurements as :func:`~medpipe.ops.methods.ct_tissues`
followed by :func:`~medpipe.ops.measure.region_stats` on the whole volume (tests compare them),
in three passes of one task per slab, each reading its slab from Zarr:

1. *body*: the voxels above the body threshold labelled in 3-D per slab, and the HU classes
   (before the body mask), both kept in compressed scratch files; per slab its label counts
   and its first and last slices (:func:`body_parts`). The host merges labels across slab
   faces (:func:`~medpipe.ops._label.merge_slabs`) and picks the largest component.
2. *classes*: per slab the body (relabelled through its table, holes filled per slice), the
   classes inside it, the lungs' slice-wise convex hull and its rim, and the dense voxels
   inside the hull labelled in 3-D with their statistics (:func:`class_parts`). Classes go to
   the label image, the dense voxels (few) to scratch. The host merges the dense components
   and chooses the lesion candidates.
3. *labels*: per slab the lesion voxels set in the classes (rewritten where any), and the
   per-label statistics of the final labels against the raw image (:func:`label_parts`),
   reduced on the host.

Intensity sums of integer images (CT in HU) are sums of integers in float64, exact whatever
their order, so the per-slab reduction gives the whole-volume figures bit for bit.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr

from .. import omezarr
from ._backend import get_ndi, get_xp, to_device, to_numpy
from ._heap import keep_heap
from ._label import check_structure, merge_slabs
from .measure import _block_stats, _foreground_stats, _reduce, small_label_stats, stats_records
from .methods import CT_IDS, Segmentation
from .morphology import _fill_holes_slices, _hull_slice
from .segment import CT_PRESETS, ct_classes

__all__ = ["SlabPlan", "slab_bounds", "ct_tissues_slabs", "body_parts", "class_parts", "label_parts", "rim_in_plane",
           "classes_by_slice"]

SLAB_VOXELS = 2**23  # about 32 slices of 512 x 512: a few hundred MB of temporaries per task
FACE = check_structure(None, 3)  # face connectivity, as ct_tissues labels body and lesions


def slab_bounds(depth: int, plane: int, chunk_z: int, voxels: int = SLAB_VOXELS) -> list[tuple[int, int]]:
    """Z-ranges of about ``voxels`` voxels, each a whole number of Zarr chunks (``chunk_z``).

    >>> slab_bounds(10, 512 * 512, 4, voxels=8 * 512 * 512)
    [(0, 8), (8, 10)]
    >>> slab_bounds(3, 64, 8)
    [(0, 3)]
    """
    step = max(chunk_z, voxels // max(plane, 1) // chunk_z * chunk_z)
    return [(z, min(z + step, depth)) for z in range(0, depth, step)]


@dataclass(frozen=True)
class SlabPlan:
    """What every slab task needs: the Zarr arrays' paths, the device and the parameters."""

    filtered: str
    raw: str
    labels: str
    scratch: str
    device: str
    body_threshold: float
    lesion_threshold: float
    ranges: dict[str, tuple[float, float]]
    pyramid: tuple[tuple[str, tuple[int, int, int]], ...] = ()  # label levels 1.. and their steps


def _read(path: str, z0: int, z1: int, device: str) -> Any:
    return to_device(zarr.open_array(path, mode="r")[z0:z1], device)


def _label(mask: Any) -> tuple[Any, int]:
    xp = get_xp(mask)
    lab, n = get_ndi(mask).label(mask, structure=xp.asarray(FACE), output=xp.int32)
    return lab, int(n)


def _faces(lab: Any) -> tuple[np.ndarray, np.ndarray]:
    return to_numpy(lab[0]).copy(), to_numpy(lab[-1]).copy()


def _raw_values(raw: Any) -> Any:
    """Raw intensities as ``segment_study`` measures them (float32): integers of up to 16 bits
    are exact in float32 and stay in their own dtype (half the memory); others are cast."""
    xp = get_xp(raw)
    if raw.dtype.kind in "iu" and raw.dtype.itemsize <= 2 or raw.dtype == xp.float32:
        return raw
    return raw.astype(xp.float32)


def _scratch(plan: SlabPlan, name: str, z0: int) -> Path:
    return Path(plan.scratch) / f"{name}-{z0}.npy"


def _save(path: Path, a: Any) -> None:
    """A host copy of ``a`` in a scratch file, compressed (label images shrink 50-100x)."""
    from numcodecs import Blosc

    a = np.ascontiguousarray(to_numpy(a))
    path.write_bytes(Blosc("lz4", 1, Blosc.SHUFFLE).encode(a))
    path.with_suffix(".meta").write_text(f"{a.dtype.str} {' '.join(map(str, a.shape))}")


def _load(path: Path) -> np.ndarray:
    from numcodecs import Blosc

    dtype, *shape = path.with_suffix(".meta").read_text().split()
    return np.frombuffer(Blosc().decode(path.read_bytes()), dtype=dtype).reshape([int(n) for n in shape]).copy()


def _counts(lab: Any, n: int) -> np.ndarray:
    """Voxels of each label ``0..n``, slice by slice (no volume-sized int64 index copy)."""
    xp = get_xp(lab)
    total = xp.zeros(n + 1, xp.int64)
    for plane in lab:
        total += xp.bincount(plane.ravel(), minlength=n + 1)
    return to_numpy(total)


def body_parts(plan: SlabPlan, z0: int, z1: int) -> dict[str, Any]:
    """Pass 1 of a slab: the body-threshold labels (voxel counts, two face slices) and the HU
    classes before masking, both kept in scratch files for pass 2 (no second read of the
    filtered image)."""
    keep_heap()
    hu = _read(plan.filtered, z0, z1, plan.device)
    lab, n = _label(hu > plan.body_threshold)
    ids = {name: CT_IDS[name] for name in ("air", "lung", "fat", "soft_tissue", "bone")}
    _save(_scratch(plan, "classes", z0), classes_by_slice(hu, ids, plan.ranges))
    del hu
    _save(_scratch(plan, "body", z0), lab)
    _save_faces(plan, "body", z0, _faces(lab))
    return {"n": n, "counts": _counts(lab, n)}


def classes_by_slice(hu: Any, ids: dict[str, int], ranges: dict[str, tuple[float, float]]) -> Any:
    """:func:`~medpipe.ops.segment.ct_classes` of a NumPy volume one z-slice at a time into
    one output (the same comparisons and uint8 sums; a slice's masks stay in cache instead of
    a dozen volume-sized temporaries). Other arrays go to ``ct_classes``.

    >>> classes_by_slice(np.array([[[-1000.0, -700.0, 40.0, 500.0]]]), {"lung": 1, "bone": 4}, CT_PRESETS).tolist()
    [[[0, 1, 0, 4]]]
    """
    if get_xp(hu) is not np or hu.ndim != 3:
        return ct_classes(hu, ids, ranges)
    unknown = set(ids) - set(ranges)
    if unknown:
        raise ValueError(f"no HU preset for {sorted(unknown)}; presets: {sorted(ranges)}")
    for name in ids:
        low, high = ranges[name]
        if not high > low:
            raise ValueError(f"threshold_range needs high > low, got {low}, {high}")
    out = np.zeros(hu.shape, np.uint8)
    inside = np.empty(hu.shape[1:], bool)
    below = np.empty(hu.shape[1:], bool)
    for z in range(hu.shape[0]):
        for name, value in ids.items():
            low, high = ranges[name]
            np.greater_equal(hu[z], low, out=inside)
            np.less(hu[z], high, out=below)
            inside &= below
            np.add(out[z], np.uint8(value), out=out[z], where=inside)
    return out


def rim_in_plane(mask: Any) -> Any:
    """``mask & ~binary_erosion(mask, IN_PLANE)`` (border value 0): the voxels of ``mask`` with
    a face neighbour in their slice outside it or beyond the slice's edge.

    Four shifted comparisons instead of SciPy's general erosion (about 4x faster here).

    >>> m = np.ones((1, 3, 4), bool)
    >>> rim_in_plane(m).astype(int)[0].tolist()
    [[1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    """
    inner = mask.copy()
    if inner.shape[1] < 3 or inner.shape[2] < 3:
        inner[...] = False  # every voxel lies on an edge
    else:
        inner[:, 0] = inner[:, -1] = False
        inner[:, :, 0] = inner[:, :, -1] = False
        inner[:, 1:-1] &= mask[:, :-2] & mask[:, 2:]
        inner[:, :, 1:-1] &= mask[:, :, :-2] & mask[:, :, 2:]
    return mask & ~inner


def _crop_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The y/x bounding box of a slab's True voxels (all z), or an empty box."""
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    if rows.size == 0:
        return (slice(None), slice(0, 0), slice(0, 0))
    return (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))


def class_parts(plan: SlabPlan, z0: int, z1: int, body_keep: np.ndarray) -> dict[str, Any]:
    """Pass 2 of a slab: classes written to the label image; dense components' statistics.

    ``body_keep``: this slab's body-threshold labels to "in the body" (boolean table).
    """
    keep_heap()
    lab = _load(_scratch(plan, "body", z0))
    body = body_keep[lab]
    del lab
    body = _fill_holes_slices(body)  # in-plane holes: slice by slice on the host
    classes = _load(_scratch(plan, "classes", z0))
    classes *= body
    del body
    lung = classes == CT_IDS["lung"]
    hull = np.stack([_hull_slice(s) if s.any() else s for s in lung])
    del lung
    raw = _raw_values(_read(plan.raw, z0, z1, "cpu"))
    dense = hull & (raw >= np.float32(plan.lesion_threshold))
    # Dense voxels lie in the lungs' hull: label and measure them inside its y/x box only.
    box = _crop_box(hull)
    offset = (z0, box[1].start or 0, box[2].start or 0)
    hull, dense, raw = hull[box], dense[box], raw[box]
    rim = rim_in_plane(hull)
    comp, n = _label(dense) if dense.size else (np.zeros(dense.shape, np.int32), 0)
    del dense
    where = np.flatnonzero(comp)
    values = comp.ravel()[where]
    stats = _foreground_stats(comp, raw, n, offset) if comp.size else {
        "count": np.zeros(1, np.int64), "sum": np.zeros(1), "sumsq": np.zeros(1), "csum": np.zeros((3, 1)),
        "lo": np.full((3, 1), np.iinfo(np.int64).max, np.int64), "hi": np.full((3, 1), -1, np.int64)}
    stats["rim"] = np.bincount(values[rim.ravel()[where]], minlength=n + 1)
    # Voxels as flat indices into the whole slab, for pass 3.
    coords = np.unravel_index(where, comp.shape)
    flat = np.ravel_multi_index((coords[0], coords[1] + offset[1], coords[2] + offset[2]), classes.shape)
    np.save(_scratch(plan, "dense-where", z0), flat.astype(np.int64))
    np.save(_scratch(plan, "dense-values", z0), values)
    omezarr.write_block(zarr.open_array(plan.labels, mode="r+"), (z0, 0, 0), classes)
    _save_faces(plan, "dense", z0, _faces_in(comp, box, classes.shape))
    return {"n": n, "stats": stats}


def _save_faces(plan: SlabPlan, name: str, z0: int, faces: tuple[np.ndarray, np.ndarray]) -> None:
    """A slab's two face slices in scratch: the host reads them a pair of slabs at a time
    (:class:`_Faces`), so that what it holds does not grow with the series."""
    for side, face in zip(("first", "last"), faces):
        _save(_scratch(plan, f"{name}-face-{side}", z0), face)


class _Faces:
    """``faces[k]`` = slab ``k``'s (first, last) face slices, read from scratch when asked."""

    def __init__(self, plan: SlabPlan, name: str, bounds: list[tuple[int, int]]):
        self.plan, self.name, self.bounds = plan, name, bounds

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        z0 = self.bounds[k][0]
        return (_load(_scratch(self.plan, f"{self.name}-face-first", z0)),
                _load(_scratch(self.plan, f"{self.name}-face-last", z0)))


def _faces_in(comp: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """First and last z-slice of labels ``comp`` cropped to ``box``, as whole slices of ``shape``."""
    faces = []
    for z in (0, -1):
        face = np.zeros(shape[1:], np.int32)
        if comp.size:
            face[box[1:]] = comp[z]
        faces.append(face)
    return faces[0], faces[1]


def label_parts(plan: SlabPlan, z0: int, z1: int, lesion_keep: np.ndarray, lesion_value: int,
                n_labels: int) -> dict[str, np.ndarray]:
    """Pass 3 of a slab: lesion voxels set in its classes (rewritten where any), and the
    statistics of its final labels ``0..n_labels`` against the raw image."""
    keep_heap()
    target = zarr.open_array(plan.labels, mode="r+")
    labels = target[z0:z1]
    where = np.load(_scratch(plan, "dense-where", z0))[lesion_keep[np.load(_scratch(plan, "dense-values", z0))]]
    if where.size:
        labels.ravel()[where] = lesion_value
        omezarr.write_block(target, (z0, 0, 0), labels)
    for path, step in plan.pyramid:  # this slab's rows of each level: every step-th voxel
        level = zarr.open_array(path, mode="r+")
        part = labels[::step[0], ::step[1], ::step[2]]
        part = part[: level.shape[0] - z0 // step[0], : level.shape[1], : level.shape[2]]
        if part.shape[0] > 0:
            omezarr.write_block(level, (z0 // step[0], 0, 0), np.ascontiguousarray(part))
    raw = _raw_values(_read(plan.raw, z0, z1, plan.device))
    if get_xp(raw) is np:
        fast = small_label_stats(labels, raw, n_labels, (z0, 0, 0))
        if fast is not None:
            return fast
    return _block_stats(to_device(labels, plan.device), raw, n_labels, (z0, 0, 0), foreground=True)


def _globalise(parts: list[dict[str, np.ndarray]], tables: list[np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Per-slab statistics of local labels summed into global labels ``0..n`` (exact: counts,
    coordinate and integer-intensity sums are integers)."""
    nd = 3
    out = {"count": np.zeros(n + 1, np.int64), "csum": np.zeros((nd, n + 1)),
           "lo": np.full((nd, n + 1), np.iinfo(np.int64).max, np.int64), "hi": np.full((nd, n + 1), -1, np.int64)}
    for key in ("sum", "sumsq", "rim"):
        if all(key in p for p in parts):
            out[key] = np.zeros(n + 1)
    for part, table in zip(parts, tables):
        for key in ("count", "sum", "sumsq", "rim"):
            if key in out:
                np.add.at(out[key], table[1:], part[key][1:])
        for ax in range(nd):
            np.add.at(out["csum"][ax], table[1:], part["csum"][ax][1:])
            np.minimum.at(out["lo"][ax], table[1:], part["lo"][ax][1:])
            np.maximum.at(out["hi"][ax], table[1:], part["hi"][ax][1:])
    return out


def _compute(tasks: list[Any]) -> list[Any]:
    return list(dask.compute(*tasks))


def ct_tissues_slabs(
    study_dir: Path,
    filtered_path: Path,
    *,
    spacing: tuple[float, float, float],
    affine: np.ndarray | None = None,
    device: str = "cpu",
    lesion_min_ml: float = 0.05,
    lesion_max_ml: float = 200.0,
    body_threshold: float = -500.0,
    lesion_threshold: float = -400.0,
    presets: dict[str, list[float]] | None = None,
    slab_voxels: int = SLAB_VOXELS,
) -> tuple[Segmentation, list[dict[str, Any]]]:
    """:func:`~medpipe.ops.methods.ct_tissues` of ``filtered_path`` (classes) and the study's
    ``image.zarr`` level 0 (lesions, measurements), written as its label image.

    Returns the :class:`Segmentation` (``labels`` is the label image's level-0 path) and the
    measurements of every label (:func:`~medpipe.ops.measure.region_stats`'s records).
    Slab tasks run on the active Dask scheduler (the cluster's, in a run).
    """
    study_dir = Path(study_dir)
    image_path = study_dir / "image.zarr"
    raw = zarr.open_array(str(image_path / "0"), mode="r")
    depth, ny, nx = raw.shape
    names = {v: k for k, v in CT_IDS.items()}
    omezarr.create_labels(image_path, np.uint8, names)
    scratch = study_dir / ".segment-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    plan = SlabPlan(str(filtered_path), str(image_path / "0"), str(image_path / "labels" / omezarr.LABELS_NAME / "0"),
                    str(scratch), device, float(body_threshold), float(lesion_threshold),
                    {**CT_PRESETS, **{k: tuple(v) for k, v in (presets or {}).items()}})
    bounds = slab_bounds(depth, ny * nx, raw.chunks[0], slab_voxels)
    pyramid = _slab_pyramid(image_path, bounds)
    plan = replace(plan, pyramid=pyramid or ())
    try:
        parts = _compute([dask.delayed(body_parts, pure=False)(plan, z0, z1) for z0, z1 in bounds])
        tables, n = merge_slabs([p["n"] for p in parts], _Faces(plan, "body", bounds), FACE)
        counts = np.zeros(n + 1, np.int64)
        for part, table in zip(parts, tables):
            np.add.at(counts, table, part["counts"])
        counts[0] = 0
        best = int(np.argmax(counts)) if n else -1  # no voxel above the threshold: no body
        keeps = [table == best for table in tables]
        del parts, counts

        parts = _compute([dask.delayed(class_parts, pure=False)(plan, z0, z1, keep)
                          for (z0, z1), keep in zip(bounds, keeps)])
        tables, n = merge_slabs([p["n"] for p in parts], _Faces(plan, "dense", bounds), FACE)
        comp = _globalise([p["stats"] for p in parts], tables, n)
        del parts
        candidates = _candidates(comp, spacing, affine, lesion_min_ml, lesion_max_ml)
        lesion = np.zeros(n + 1, bool)
        lesion[[c["id"] for c in candidates]] = True

        lesion_value = CT_IDS["lesion"]
        parts = _compute([dask.delayed(label_parts, pure=False)(plan, z0, z1, lesion[table], lesion_value,
                                                                  max(names))
                          for (z0, z1), table in zip(bounds, tables)])
        measurements = stats_records(_reduce(parts), spacing=spacing, affine=affine, names=names)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if pyramid is None:
        omezarr.finish_labels(image_path)
    return Segmentation(plan.labels, names, candidates, []), measurements


def _slab_pyramid(image_path: Path,
                  bounds: list[tuple[int, int]]) -> tuple[tuple[str, tuple[int, int, int]], ...] | None:
    """The label image's levels 1.. (created empty) with their steps from level 0, when every
    slab's rows of every level are whole chunks of it (each slab task then writes its own);
    else ``None`` (the pyramid is built from level 0 afterwards)."""
    label_path = image_path / "labels" / omezarr.LABELS_NAME
    arrays = omezarr.create_levels(label_path, omezarr.read_meta(image_path).levels, labels=True)
    out, step = [], (1, 1, 1)
    for prev, arr in zip(arrays, arrays[1:]):
        step = tuple(s * (a // b) for s, a, b in zip(step, prev.shape, arr.shape))
        depth, rows = arr.chunks[0], arr.shape[0]
        for z0, z1 in bounds:
            j0, j1 = z0 // step[0], min(rows, -(-z1 // step[0]))
            if z0 % step[0] or (j0 < rows and (j0 % depth or ((j1 - j0) % depth and j1 != rows))):
                return None
        if tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
            return None  # tiled slices: leave them to build_pyramid
        out.append((str(label_path / str(len(out) + 1)), step))
    return tuple(out)


def _candidates(comp: dict[str, np.ndarray], spacing: tuple[float, float, float], affine: np.ndarray | None,
                min_ml: float, max_ml: float) -> list[dict[str, Any]]:
    """:func:`~medpipe.ops.measure.lesion_candidates`'s selection, then ``ct_tissues``'s: in the
    volume range, ordered by decreasing volume, and not lying mostly on the hull's rim."""
    stats = stats_records(comp, spacing=spacing, affine=affine)
    keep = [s for s in stats if min_ml <= s["volume_ml"] <= max_ml]
    keep.sort(key=lambda s: -s["voxels"])
    # ct_tissues' rim test: the mean of the rim mask over the component (as float sums: exact).
    out = [s for s in keep if float(comp["rim"][s["label"]]) / s["voxels"] < 0.5]
    return [{"id": s["label"], "voxels": s["voxels"], "volume_ml": s["volume_ml"], "centroid_mm": s["centroid_mm"],
             "bbox": s["bbox"], "mean": s["mean"]} for s in out]
