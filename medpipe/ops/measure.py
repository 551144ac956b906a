"""Per-label measurements in one pass over the volume (bincount reductions per block).

Each block yields, for every label ``0..n``: voxel count, intensity sum and sum of squares,
and per axis a (coordinate x label) histogram from which centroid and bounding box follow.
Blocks are reduced on the host, so the cost is one read of labels and image, whatever the
number of labels. Works on NumPy, CuPy and Dask arrays (CuPy blocks reduce on the GPU).

>>> import numpy as np
>>> lab = np.zeros((2, 4, 4), np.int32); lab[0, 1:3, 1:3] = 1
>>> s = region_stats(lab, np.ones(lab.shape), spacing=(2.0, 1.0, 1.0))[0]
>>> s["voxels"], s["volume_ml"], s["bbox"], s["centroid_mm"]
(4, 0.008, [[0, 1, 1], [1, 3, 3]], [1.5, 1.5, 0.0])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np

from ._backend import get_xp
from ._label import label

__all__ = ["region_stats", "stats_records", "label_counts", "lesion_candidates"]

_TABLE_LIMIT = 2**24  # above this many (coordinate, label) cells, fall back to weighted sums
# A block with at most 1/_SPARSE of its voxels labelled is measured from those voxels alone: the
# whole-block path makes 8-byte temporaries of every voxel (a page fault per 4 KiB of new memory).
_SPARSE = 8


def _host(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def _axis_tables(lab: Any, n: int) -> list[np.ndarray]:
    """Per axis, the (coordinate x label) voxel counts of a NumPy block, slice by slice.

    The same integers as one ``bincount`` of ``label + (n+1) * coordinate`` over the whole
    block, without its int64 temporaries of 8 bytes a voxel (new memory costs a page fault
    per 4 KiB here): one z-slice's keys stay in cache.
    """
    nz, ny, nx = lab.shape
    tables = [np.zeros((nz, n + 1), np.int64), np.zeros((ny, n + 1), np.int64), np.zeros((nx, n + 1), np.int64)]
    rows = (n + 1) * np.arange(ny, dtype=np.int64)[:, None]
    cols = (n + 1) * np.arange(nx, dtype=np.int64)[None, :]
    for z in range(nz):
        plane = lab[z].astype(np.int64)
        tables[0][z] = np.bincount(plane.ravel(), minlength=n + 1)
        tables[1] += np.bincount((plane + rows).ravel(), minlength=ny * (n + 1)).reshape(ny, n + 1)
        tables[2] += np.bincount((plane + cols).ravel(), minlength=nx * (n + 1)).reshape(nx, n + 1)
    return tables


def _slice_counts(lab: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of every label of a 3-D NumPy block, one z-slice at a time (exact integers,
    no block-sized int64 temporary)."""
    count = np.zeros(n + 1, np.int64)
    for z in range(lab.shape[0]):
        count += np.bincount(lab[z].ravel(), minlength=n + 1)
    return count


def _slice_sums(lab: np.ndarray, img: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-label sums of ``img`` and of its squares (float64) over a 3-D NumPy block, slice by
    slice, equal bit for bit to one ``bincount`` over the whole block.

    ``bincount`` adds each bin's weights in input order, starting from zero. Each slice's call
    starts with one weight per label holding that label's sum so far (``0 + s`` is ``s``), so
    every label's sum is the same sequence of additions as over the whole block, without the
    block-sized float64 and int64 temporaries (8 bytes a voxel each, a page fault per 4 KiB).
    """
    keys = np.arange(n + 1, dtype=np.int64)
    total = np.zeros(n + 1)
    total_sq = np.zeros(n + 1)
    for z in range(lab.shape[0]):
        flat = np.concatenate([keys, lab[z].ravel()])
        w = img[z].astype(np.float64).ravel()
        total = np.bincount(flat, weights=np.concatenate([total, w]), minlength=n + 1)
        total_sq = np.bincount(flat, weights=np.concatenate([total_sq, w * w]), minlength=n + 1)
    return total, total_sq


def _foreground_stats(lab: np.ndarray, img: Any, n: int, offset: Sequence[int]) -> dict[str, np.ndarray]:
    """:func:`_block_stats` of a NumPy block from its labelled voxels alone (few of them, as
    lesion candidates in a volume): equal to it for every label ``1..n``.

    ``bincount`` adds each bin's values in the order of its input, and the labelled voxels are
    taken in the block's order, so every float sum is the same addition as over the whole
    block. Label 0 (background) gets its voxel count only (its sums and geometry are zero).
    """
    nd = lab.ndim
    where = np.flatnonzero(lab)
    values = lab.ravel()[where].astype(np.int64)
    count = np.bincount(values, minlength=n + 1)
    count[0] = lab.size - int(count[1:].sum())
    out: dict[str, np.ndarray] = {"count": count}
    if img is not None:
        w = img.ravel()[where].astype(np.float64)
        # (float64 also when no voxel is labelled: bincount gives int64 for empty input)
        out["sum"] = np.bincount(values, weights=w, minlength=n + 1).astype(np.float64)
        out["sumsq"] = np.bincount(values, weights=w * w, minlength=n + 1).astype(np.float64)
        out["sum"][0] = out["sumsq"][0] = 0.0
    csum = np.zeros((nd, n + 1))
    lo = np.full((nd, n + 1), np.iinfo(np.int64).max, np.int64)
    hi = np.full((nd, n + 1), -1, np.int64)
    for ax, coord in enumerate(np.unravel_index(where, lab.shape)):
        m = lab.shape[ax]
        table = np.bincount(values + (n + 1) * coord, minlength=m * (n + 1)).reshape(m, n + 1)
        table[:, 0] = 0
        present = table > 0
        any_ = present.any(axis=0)
        csum[ax] = (table * np.arange(m)[:, None]).sum(axis=0) + offset[ax] * np.where(np.arange(n + 1) > 0, count, 0)
        lo[ax] = np.where(any_, present.argmax(axis=0) + offset[ax], lo[ax])
        hi[ax] = np.where(any_, m - 1 - present[::-1].argmax(axis=0) + offset[ax], hi[ax])
    out.update(csum=csum, lo=lo, hi=hi)
    return out


def _block_stats(lab: Any, img: Any, n: int, offset: Sequence[int], geometry: bool = True,
                 foreground: bool = False) -> dict[str, np.ndarray]:
    """Per-label statistics of one block; ``foreground=True`` allows skipping the background's
    sums and geometry (:func:`_foreground_stats`, taken for NumPy blocks mostly background)."""
    xp = get_xp(lab)
    if lab.size and int(lab.max()) > n:
        raise ValueError(f"label {int(lab.max())} exceeds n={n}")
    nd = lab.ndim
    if (foreground and geometry and xp is np and lab.size
            and all(lab.shape[ax] * (n + 1) <= _TABLE_LIMIT for ax in range(nd))
            and np.count_nonzero(lab) <= lab.size // _SPARSE):
        return _foreground_stats(lab, img, n, offset)
    fast = xp is np and nd == 3 and all(lab.shape[ax] * (n + 1) <= _TABLE_LIMIT for ax in range(nd))
    tables = _axis_tables(lab, n) if fast and geometry else None
    if tables is not None:
        out = {"count": tables[0].sum(axis=0)}
    elif xp is np and nd == 3:
        out = {"count": _slice_counts(lab, n)}
    else:
        out = {"count": _host(xp.bincount(lab.astype(xp.int64, copy=False).ravel(), minlength=n + 1)).astype(np.int64)}
    if img is not None and xp is np and nd == 3:
        out["sum"], out["sumsq"] = _slice_sums(lab, img, n)
    elif img is not None:
        # One bincount over the whole block, as before: float sums in this order, exactly.
        flat = lab.astype(xp.int64, copy=False).ravel()
        w = img.astype(xp.float64).ravel()
        out["sum"] = _host(xp.bincount(flat, weights=w, minlength=n + 1))
        out["sumsq"] = _host(xp.bincount(flat, weights=w * w, minlength=n + 1))
    if not geometry:  # voxel counts (and sums) only
        return out
    lab = lab.astype(xp.int64, copy=False) if tables is None else lab
    flat = lab.ravel()
    csum = np.zeros((nd, n + 1))
    lo = np.full((nd, n + 1), np.iinfo(np.int64).max, np.int64)
    hi = np.full((nd, n + 1), -1, np.int64)
    for ax in range(nd):
        m = lab.shape[ax]
        idx = xp.arange(m).reshape([-1 if i == ax else 1 for i in range(nd)])
        if m * (n + 1) <= _TABLE_LIMIT:
            if tables is not None:
                table = tables[ax]
            else:
                table = _host(xp.bincount((lab + (n + 1) * idx).ravel(), minlength=m * (n + 1))).reshape(m, n + 1)
            present = table > 0
            any_ = present.any(axis=0)
            csum[ax] = (table * np.arange(m)[:, None]).sum(axis=0) + offset[ax] * out["count"]
            lo[ax] = np.where(any_, present.argmax(axis=0) + offset[ax], lo[ax])
            hi[ax] = np.where(any_, m - 1 - present[::-1].argmax(axis=0) + offset[ax], hi[ax])
        else:  # many labels: weighted coordinate sums, bounding boxes from find_objects
            coords = xp.broadcast_to(idx, lab.shape).ravel().astype(xp.float64)
            csum[ax] = _host(xp.bincount(flat, weights=coords, minlength=n + 1)) + offset[ax] * out["count"]
    if any(lab.shape[ax] * (n + 1) > _TABLE_LIMIT for ax in range(nd)):
        import scipy.ndimage

        for i, sl in enumerate(scipy.ndimage.find_objects(_host(lab), max_label=n), start=1):
            if sl is not None:
                lo[:, i] = [s.start + o for s, o in zip(sl, offset)]
                hi[:, i] = [s.stop - 1 + o for s, o in zip(sl, offset)]
    out.update(csum=csum, lo=lo, hi=hi)
    return out


def small_label_stats(lab: np.ndarray, img: np.ndarray, n: int, offset: Sequence[int]) -> dict[str, np.ndarray] | None:
    """:func:`_block_stats` of a 3-D NumPy block of few labels (``0..n``) against an integer
    image of a narrow range (CT in HU), in three unweighted ``bincount`` calls per z-slice on
    reused int64 key buffers: (row, label), (column, label) and (label, intensity) counts.

    Counts, coordinate sums and bounding boxes are the same integers; intensity sums and sums
    of squares come from the (label, intensity) histogram in exact integer arithmetic, so
    they equal :func:`_block_stats`'s float sums whenever those are exact (sums of integers
    below 2**53, as every CT study's are). ``None`` where this does not apply (other dtypes,
    a range of more than 2**16 values, many labels): use :func:`_block_stats`.
    """
    if (lab.ndim != 3 or lab.dtype.kind not in "iu" or img.dtype.kind not in "iu" or img.dtype.itemsize > 2
            or n > 255 or lab.size == 0):
        return None
    lo_v, hi_v = int(img.min()), int(img.max())
    width = hi_v - lo_v + 1
    if int(lab.max()) > n:
        raise ValueError(f"label {int(lab.max())} exceeds n={n}")
    nz, ny, nx = lab.shape
    k = n + 1
    key = np.empty((ny, nx), np.int64)
    rows = k * np.arange(ny, dtype=np.int64)[:, None]
    cols = k * np.arange(nx, dtype=np.int64)[None, :]
    zt = np.zeros((nz, k), np.int64)
    yt = np.zeros(ny * k, np.int64)
    xt = np.zeros(nx * k, np.int64)
    joint = np.zeros(k * width, np.int64)
    for z in range(nz):
        np.add(lab[z], rows, out=key)
        yt += np.bincount(key.ravel(), minlength=ny * k)
        np.add(lab[z], cols, out=key)
        xt += np.bincount(key.ravel(), minlength=nx * k)
        np.multiply(lab[z], np.int64(width), out=key)
        key += img[z]
        key -= lo_v
        part = np.bincount(key.ravel(), minlength=k * width)
        joint += part
        zt[z] = part.reshape(k, width).sum(axis=1)
    joint = joint.reshape(k, width)
    values = np.arange(lo_v, hi_v + 1, dtype=np.int64)
    count = joint.sum(axis=1)
    out: dict[str, np.ndarray] = {"count": count,
                                  "sum": (joint @ values).astype(np.float64),
                                  "sumsq": (joint @ (values * values)).astype(np.float64)}
    csum = np.zeros((3, k))
    lo = np.full((3, k), np.iinfo(np.int64).max, np.int64)
    hi = np.full((3, k), -1, np.int64)
    for ax, table in enumerate((zt, yt.reshape(ny, k), xt.reshape(nx, k))):
        m = table.shape[0]
        present = table > 0
        any_ = present.any(axis=0)
        csum[ax] = (table * np.arange(m)[:, None]).sum(axis=0) + offset[ax] * count
        lo[ax] = np.where(any_, present.argmax(axis=0) + offset[ax], lo[ax])
        hi[ax] = np.where(any_, m - 1 - present[::-1].argmax(axis=0) + offset[ax], hi[ax])
    out.update(csum=csum, lo=lo, hi=hi)
    return out


def _reduce(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    total = {k: v.copy() for k, v in parts[0].items()}
    for p in parts[1:]:
        for k in ("count", "sum", "sumsq", "csum"):
            if k in p:
                total[k] += p[k]
        if "lo" in p:
            total["lo"] = np.minimum(total["lo"], p["lo"])
            total["hi"] = np.maximum(total["hi"], p["hi"])
    return total


def _stats(labels: Any, image: Any, n: int | None, geometry: bool = True,
           foreground: bool = False) -> dict[str, np.ndarray]:
    if isinstance(labels, da.Array) or isinstance(image, da.Array):
        labels = labels if isinstance(labels, da.Array) else da.from_array(labels, chunks=labels.shape)
        if n is None:
            n = int(labels.max().compute())
        if image is not None:
            image = da.asarray(image).rechunk(labels.chunks)
        starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in labels.chunks]
        lab_blocks = labels.to_delayed()
        img_blocks = image.to_delayed() if image is not None else None
        tasks = []
        for idx in np.ndindex(*labels.numblocks):
            offset = [int(starts[a][i]) for a, i in enumerate(idx)]
            img_b = img_blocks[idx] if img_blocks is not None else None
            tasks.append(dask.delayed(_block_stats)(lab_blocks[idx], img_b, n, offset, geometry, foreground))
        return _reduce(list(dask.compute(*tasks)))
    if n is None:
        n = int(labels.max()) if labels.size else 0
    return _block_stats(labels, image, n, [0] * labels.ndim, geometry, foreground)


def label_counts(labels: Any, n: int | None = None) -> np.ndarray:
    """Voxel count of every label ``0..n`` (host NumPy array)."""
    return _stats(labels, None, n, geometry=False)["count"]


def region_stats(
    labels: Any,
    image: Any = None,
    *,
    spacing: Sequence[float],
    affine: np.ndarray | None = None,
    n: int | None = None,
    names: dict[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Measurements of every non-empty label ``1..n``.

    Parameters
    ----------
    labels : int array (NumPy, CuPy or Dask), axes (z, y, x)
    image : array, optional
        Intensities for ``mean`` and ``std`` (``None`` gives ``None`` there).
    spacing : (z, y, x) millimetres
    affine : 4x4 array, optional
        Voxel ``(x, y, z, 1)`` to patient LPS mm (``medpipe.omezarr`` convention); default
        axis-aligned from ``spacing``.
    n : int, optional
        Highest label; computed when omitted.
    names : dict, optional
        Label value to name.

    Returns
    -------
    list of dict
        ``label, name, voxels, volume_ml, bbox`` (``[[z0, y0, x0], [z1, y1, x1]]``, half-open
        like slices), ``centroid_mm`` (``[x, y, z]`` LPS), ``mean``, ``std``.
    """
    if labels.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"expected 3-d labels (z, y, x) and 3 spacings, got {labels.ndim}-d, {len(spacing)}")
    if image is not None and tuple(image.shape) != tuple(labels.shape):
        raise ValueError(f"image shape {image.shape} does not match labels {labels.shape}")
    return stats_records(_stats(labels, image, n, foreground=True), spacing=spacing, affine=affine, names=names)


def stats_records(st: dict[str, np.ndarray], *, spacing: Sequence[float], affine: np.ndarray | None = None,
                  names: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """:func:`region_stats`'s records from reduced per-label statistics (``count``, ``csum``,
    ``lo``, ``hi`` and optionally ``sum``, ``sumsq``, as :func:`_block_stats` and
    :func:`_reduce` make them); label 0 is not reported."""
    if affine is None:
        from ..omezarr import default_affine

        affine = default_affine(tuple(spacing))  # type: ignore[arg-type]
    voxel_ml = math.prod(spacing) / 1000.0
    out = []
    for value in np.nonzero(st["count"])[0]:
        if value == 0:
            continue
        c = int(st["count"][value])
        zyx = st["csum"][:, value] / c
        xyz1 = np.array([zyx[2], zyx[1], zyx[0], 1.0])
        mean = std = None
        if "sum" in st:
            mean = float(st["sum"][value] / c)
            std = float(math.sqrt(max(st["sumsq"][value] / c - mean * mean, 0.0)))
        out.append({
            "label": int(value),
            "name": (names or {}).get(int(value), f"label_{int(value)}"),
            "voxels": c,
            "volume_ml": round(c * voxel_ml, 6),
            "bbox": [[int(v) for v in st["lo"][:, value]], [int(v) + 1 for v in st["hi"][:, value]]],
            "centroid_mm": [round(float(v), 3) for v in (affine @ xyz1)[:3]],
            "mean": mean,
            "std": std,
        })
    return out


def lesion_candidates(
    mask: Any,
    image: Any = None,
    *,
    spacing: Sequence[float],
    affine: np.ndarray | None = None,
    min_ml: float = 0.0,
    max_ml: float = math.inf,
    structure: Any = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Connected components of ``mask`` whose volume lies in ``[min_ml, max_ml]``.

    Returns
    -------
    labels : int32 array
        The components of ``mask`` (all of them, numbered ``1..n``).
    candidates : list of dict
        ``id`` (the component's label), ``voxels``, ``volume_ml``, ``centroid_mm``, ``bbox``,
        ``mean``, ordered by decreasing volume.
    """
    lab, n = label(mask, structure=structure)
    if n == 0:
        return lab, []
    stats = region_stats(lab, image, spacing=spacing, affine=affine, n=n)
    keep = [s for s in stats if min_ml <= s["volume_ml"] <= max_ml]
    keep.sort(key=lambda s: -s["voxels"])
    return lab, [
        {"id": s["label"], "voxels": s["voxels"], "volume_ml": s["volume_ml"], "centroid_mm": s["centroid_mm"],
         "bbox": s["bbox"], "mean": s["mean"]}
        for s in keep
    ]
