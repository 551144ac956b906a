"""The segmentation methods named in ``SegmentConfig.methods``: ``ct_tissues``,
``brain_tissues`` and ``otsu``. Each returns a :class:`Segmentation` (label image, names,
lesion candidates, warnings) and accepts NumPy, CuPy or Dask volumes (z, y, x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np

from .measure import lesion_candidates
from .measure import region_stats
from .morphology import IN_PLANE, binary_erosion, convex_hull_slices, keep_labels
from .segment import (
    CT_PRESETS, apply_thresholds, body_mask, ct_classes, kmeans_intensity, threshold_multiotsu, threshold_otsu,
)

__all__ = ["Segmentation", "ct_tissues", "brain_tissues", "otsu", "METHODS"]

CT_IDS = {"lung": 1, "fat": 2, "soft_tissue": 3, "bone": 4, "lesion": 5, "air": 6}  # as medpipe.phantom
BRAIN_IDS = {"csf": 1, "grey_matter": 2, "white_matter": 3}


@dataclass
class Segmentation:
    labels: Any
    names: dict[int, str]
    lesion_candidates: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _persist(a: Any) -> Any:
    """``a`` computed and held by the scheduler when it is a Dask array, else ``a``."""
    return dask.persist(a)[0] if isinstance(a, da.Array) else a


def ct_tissues(
    hu: Any,
    raw: Any = None,
    *,
    spacing: tuple[float, float, float],
    affine: np.ndarray | None = None,
    lesion_min_ml: float = 0.05,
    lesion_max_ml: float = 200.0,
    body_threshold: float = -500.0,
    lesion_threshold: float = -400.0,
    presets: dict[str, list[float]] | None = None,
) -> Segmentation:
    """CT tissues by HU presets inside the body, plus lesion candidates inside the lungs.

    Parameters
    ----------
    hu : array
        (Filtered) Hounsfield units; tissue classes come from it.
    raw : array, optional
        Unfiltered HU. Lesions are delineated and measured on it when given, because smoothing
        filters (a 3x3x3 median) round off the surface voxels of small spheres and bias their
        volume by several percent.
    lesion_threshold : float
        Lesion voxels: at least this HU inside the (hole-filled) lungs; -400 lies midway between
        lung (-850) and soft tissue (40), the partial-volume-neutral cut.
    presets : dict, optional
        HU ranges overriding :data:`~medpipe.ops.segment.CT_PRESETS` by name.

    Returns
    -------
    Segmentation
        Labels 1 lung, 2 fat, 3 soft tissue, 4 bone, 5 lesion, 6 air inside the body; 0 outside
        the body and between preset ranges.
    """
    ranges = {**CT_PRESETS, **{k: tuple(v) for k, v in (presets or {}).items()}}
    # Masks used by several later steps are computed once (Dask input; arrays pass through):
    # otherwise every use re-runs their chain of labelling and lookups from the volume up.
    body = _persist(body_mask(hu, body_threshold))
    ids = {name: CT_IDS[name] for name in ("air", "lung", "fat", "soft_tissue", "bone")}
    classes = _persist(ct_classes(hu, ids, ranges) * body.astype(np.uint8))
    lung = classes == CT_IDS["lung"]
    # The lungs' slice-wise convex hull encloses nodules that touch the pleura or mediastinum
    # (filling holes does not: they are not holes there). The hull's one-voxel rim also holds
    # staircase soft tissue along the lung edge: components lying mostly on the rim are dropped.
    hull = _persist(convex_hull_slices(lung))
    rim = hull & ~binary_erosion(hull, IN_PLANE)
    source = hu if raw is None else raw
    dense = hull & (source >= lesion_threshold)
    comp, candidates = lesion_candidates(dense, source, spacing=spacing, affine=affine,
                                         min_ml=lesion_min_ml, max_ml=lesion_max_ml)
    warnings = []
    if candidates:
        on_rim = {s["label"]: s["mean"] for s in region_stats(comp, rim.astype(np.float32), spacing=spacing)}
        candidates = [c for c in candidates if on_rim.get(c["id"], 0.0) < 0.5]
    if candidates:
        lesion = keep_labels(comp, [c["id"] for c in candidates])
        classes = classes * (~lesion).astype(np.uint8) + lesion.astype(np.uint8) * np.uint8(CT_IDS["lesion"])
    names = {v: k for k, v in CT_IDS.items()}
    return Segmentation(classes.astype(np.uint8), names, candidates, warnings)


def brain_tissues(
    image: Any,
    *,
    method: str = "kmeans",
    mask_threshold: float | None = None,
    nbins: int = 256,
) -> Segmentation:
    """MR T1 tissues: CSF, grey and white matter by intensity clustering inside a head mask.

    Parameters
    ----------
    method : {"kmeans", "multiotsu"}
        Three-class k-means on the histogram (thresholds midway between centres) or multi-Otsu.
    mask_threshold : float, optional
        Intensity above which a voxel belongs to the head; default half of Otsu's threshold of
        the whole volume (keeps dark CSF in, air out).

    Returns
    -------
    Segmentation
        Labels 1 CSF, 2 grey matter, 3 white matter; 0 outside the mask.
    """
    warnings = []
    t = threshold_otsu(image) * 0.5 if mask_threshold is None else float(mask_threshold)
    mask = body_mask(image, t)
    if method == "kmeans":
        centres = kmeans_intensity(image, 3, mask=mask, nbins=nbins)
        thresholds = (centres[:-1] + centres[1:]) / 2
    elif method == "multiotsu":
        thresholds = threshold_multiotsu(image, 3, mask=mask, nbins=nbins)
    else:
        raise ValueError(f"method must be 'kmeans' or 'multiotsu', got {method!r}")
    if not np.all(np.isfinite(thresholds)):
        warnings.append("brain_tissues: intensity clustering failed; labels may be empty")
    labels = apply_thresholds(image, thresholds, mask=mask)
    return Segmentation(labels, {v: k for k, v in BRAIN_IDS.items()}, [], warnings)


def otsu(image: Any, *, nbins: int = 256) -> Segmentation:
    """Foreground (label 1) above Otsu's threshold of the whole volume; works for 2-D (1, y, x)."""
    t = threshold_otsu(image, nbins=nbins)
    warnings = [] if math.isfinite(t) else ["otsu: threshold undefined (flat image)"]
    return Segmentation((image > t).astype(np.uint8), {1: "foreground"}, [], warnings)


METHODS = {"ct_tissues": ct_tissues, "brain_tissues": brain_tissues, "otsu": otsu}
