"""Segmentation: thresholds (CT presets in HU), Otsu, multi-Otsu, k-means, region growing,
watershed, body mask, and the per-modality methods the segment stage runs.

Histogram-based thresholds (Otsu, multi-Otsu, k-means) are computed from one global histogram
(``dask.array.histogram`` on Dask input), so they do not depend on chunking; the thresholds
are then applied voxel-wise.

>>> import numpy as np
>>> a = np.r_[np.zeros(50), np.ones(50) * 10.0]
>>> float(threshold_otsu(a)) < 10
True
>>> kmeans_intensity(a, k=2).round(1).tolist()
[0.0, 10.0]
"""

from __future__ import annotations

import math
from typing import Any

import dask
import dask.array as da
import numpy as np

from ._backend import get_xp
from ._label import label
from .morphology import fill_holes, keep_labels, largest_component

__all__ = [
    "CT_PRESETS", "threshold_range", "ct_classes", "histogram", "threshold_otsu", "threshold_multiotsu",
    "kmeans_intensity", "apply_thresholds", "region_grow", "watershed", "body_mask",
]

# Hounsfield ranges [low, high). Lung parenchyma and air overlap in reality; "air" inside the
# body is gas (airways, bowel), outside the body everything is background.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "air": (-np.inf, -950.0),
    "lung": (-950.0, -500.0),
    "fat": (-190.0, -30.0),
    "soft_tissue": (-30.0, 150.0),
    "bone": (150.0, np.inf),
}


def threshold_range(image: Any, low: float = -np.inf, high: float = np.inf) -> Any:
    """Boolean mask ``low <= image < high`` (any array type)."""
    if not high > low:
        raise ValueError(f"threshold_range needs high > low, got {low}, {high}")
    return (image >= low) & (image < high)


def ct_classes(hu: Any, ids: dict[str, int], presets: dict[str, tuple[float, float]] = CT_PRESETS) -> Any:
    """Label image from HU presets: voxels in ``presets[name]`` get ``ids[name]`` (0 elsewhere)."""
    unknown = set(ids) - set(presets)
    if unknown:
        raise ValueError(f"no HU preset for {sorted(unknown)}; presets: {sorted(presets)}")
    out = None
    for name, value in ids.items():
        low, high = presets[name]
        part = threshold_range(hu, low, high).astype(np.uint8) * np.uint8(value)
        out = part if out is None else out + part  # ranges do not overlap
    return out


def _host(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def histogram(image: Any, mask: Any = None, nbins: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Global histogram ``(counts, bin_centers)`` of ``image`` (inside ``mask``), host arrays."""
    values = image[mask] if mask is not None and not isinstance(image, da.Array) else image
    if isinstance(image, da.Array):
        lo, hi = dask.compute(image.min(), image.max()) if mask is None else \
            dask.compute(da.where(mask, image, np.inf).min(), da.where(mask, image, -np.inf).max())
        lo, hi = float(lo), float(hi)
        if not np.isfinite(lo) or hi <= lo:
            hi = lo + 1.0 if np.isfinite(lo) else 1.0
            lo = lo if np.isfinite(lo) else 0.0
        weights = None if mask is None else mask.astype(np.float64)
        counts, edges = da.histogram(image, bins=nbins, range=(lo, hi), weights=weights)
        counts = _host(counts.compute())
    else:
        xp = get_xp(values)
        if values.size == 0:  # an empty mask: no counts, as on Dask input
            edges = np.linspace(0.0, 1.0, nbins + 1)
            return np.zeros(nbins), (edges[:-1] + edges[1:]) / 2
        lo, hi = float(values.min()), float(values.max())
        hi = hi if hi > lo else lo + 1.0
        counts, edges = xp.histogram(values, bins=nbins, range=(lo, hi))
        counts, edges = _host(counts), _host(edges)
    edges = np.asarray(edges, dtype=np.float64)
    return counts.astype(np.float64), (edges[:-1] + edges[1:]) / 2


def threshold_otsu(image: Any, mask: Any = None, nbins: int = 256) -> float:
    """Otsu's threshold (``skimage.filters.threshold_otsu`` on the global histogram).

    A flat image (one occupied bin, e.g. a single voxel) gives that bin's centre, above its
    value, so nothing is foreground; an empty selection gives NaN.

    >>> threshold_otsu(np.zeros((1, 1, 1))) > 0
    True
    """
    from skimage.filters import threshold_otsu as _otsu

    counts, centers = histogram(image, mask, nbins)
    occupied = np.flatnonzero(counts)
    if occupied.size < 2:  # skimage's histogram path has no two classes to separate
        return float(centers[occupied[0]]) if occupied.size else math.nan
    return float(_otsu(hist=(counts, centers)))


def threshold_multiotsu(image: Any, classes: int = 3, mask: Any = None, nbins: int = 256) -> np.ndarray:
    """Multi-Otsu thresholds (``skimage.filters.threshold_multiotsu`` on the global histogram)."""
    from skimage.filters import threshold_multiotsu as _multi

    counts, centers = histogram(image, mask, nbins)
    if np.count_nonzero(counts) < classes:  # too few distinct values (tiny or flat images)
        return np.full(classes - 1, np.nan)
    return np.asarray(_multi(classes=classes, hist=(counts, centers)), dtype=np.float64)


def kmeans_intensity(image: Any, k: int = 3, mask: Any = None, nbins: int = 256, iters: int = 100) -> np.ndarray:
    """Sorted cluster centres of 1-D k-means on intensities (Lloyd on the histogram, quantile start)."""
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    counts, centers = histogram(image, mask, nbins)
    if counts.sum() == 0:  # empty mask: no centres
        return np.full(k, np.nan)
    cdf = np.cumsum(counts) / counts.sum()
    means = np.interp((np.arange(k) + 0.5) / k, cdf, centers)
    for _ in range(iters):
        assign = np.abs(centers[:, None] - means[None, :]).argmin(axis=1)
        new = np.array([np.average(centers[assign == j], weights=counts[assign == j])
                        if counts[assign == j].sum() > 0 else means[j] for j in range(k)])
        if np.allclose(new, means):
            break
        means = new
    return np.sort(means)


def apply_thresholds(image: Any, thresholds: Any, mask: Any = None) -> Any:
    """Classes ``1..len(thresholds)+1`` by ``thresholds`` (ascending); 0 outside ``mask``."""
    t = np.sort(np.asarray(thresholds, dtype=np.float64))
    out = None
    for value in t:  # class = 1 + number of thresholds below the voxel
        step = (image > value).astype(np.uint8)
        out = step if out is None else out + step
    out = (out if out is not None else (image * 0).astype(np.uint8)) + np.uint8(1)
    if mask is not None:
        out = out * mask.astype(np.uint8)
    return out.astype(np.uint8)


def region_grow(image: Any, seeds: list[tuple[int, ...]], low: float, high: float, structure: Any = None) -> Any:
    """Seeded region growing: the components of ``low <= image < high`` that contain a seed."""
    lab, n = label(threshold_range(image, low, high), structure=structure)
    values = [lab[tuple(s)] for s in seeds]
    if isinstance(lab, da.Array):
        values = dask.compute(*values)
    keep = np.array(sorted({int(_host(v)) for v in values} - {0}), dtype=np.int64)
    return keep_labels(lab, keep) if keep.size else lab < 0


def watershed(image: Any, markers: Any, mask: Any = None) -> Any:
    """Marker watershed on an edge map (``skimage.segmentation.watershed``).

    Watershed floods the whole basin and is not chunk-local: Dask and CuPy input is gathered to
    one host array (fine for the sizes medpipe segments this way; use for ROIs, not whole
    archives).
    """
    from skimage.segmentation import watershed as _ws

    arrays = [image, markers, mask]
    arrays = [a.compute() if isinstance(a, da.Array) else a for a in arrays]
    img, mk, ms = (None if a is None else _host(a) for a in arrays)
    return _ws(img, mk, mask=ms)


def body_mask(image: Any, threshold: float, in_plane: bool = True) -> Any:
    """Largest connected component above ``threshold``, holes filled (per slice by default)."""
    body = largest_component(image > threshold)
    return fill_holes(body, in_plane=in_plane)


