"""medpipe's operator library: filters, segmentation and measurement for NumPy, CuPy and Dask.

Every operator takes a NumPy, CuPy or Dask array and returns the same kind. ``FILTERS`` and
``SEGMENTERS`` map the operator names used in the configuration to functions.

Modules: ``filters`` (SciPy-signature filters), ``_label`` (chunked connected components),
``morphology``, ``segment`` (thresholds, clustering, region growing), ``methods`` (the
per-modality segmentations), ``measure`` (per-label statistics), ``stage`` (the filter and
segment stages on study folders), ``filter_slabs`` and ``ct_slabs`` (those stages streamed in
z-slabs straight from and to Zarr).
"""

from __future__ import annotations

# scikit-image loads its subpackages lazily, parsing their stub files (ast.parse) on first use.
# CPython 3.11 can then fail with "SystemError: AST constructor recursion depth mismatch"
# (gh-106905) when two threads parse at once, as Dask's worker threads would: load them here.
import skimage.filters  # noqa: F401
import skimage.measure  # noqa: F401
import skimage.morphology  # noqa: F401
import skimage.segmentation  # noqa: F401
import skimage.util  # noqa: F401

from ._backend import get_ndi, get_xp, gpu_available, resolve_device, to_device, to_numpy
from ._overlap import halo_depth
from .filters import (
    anisotropic_diffusion, gaussian_filter, gradient_magnitude, median_filter, normalize, resample,
    uniform_filter, unsharp_mask, window,
)
from ._label import label
from .measure import label_counts, lesion_candidates, region_stats
from .methods import METHODS as SEGMENTERS
from .morphology import binary_closing, binary_erosion, binary_opening, fill_holes, largest_component
from .segment import (
    CT_PRESETS, body_mask, kmeans_intensity, region_grow, threshold_multiotsu, threshold_otsu, threshold_range,
)

# Names the configuration uses (FilterStep.op) -> functions. All keep the image's shape.
FILTERS = {
    "gaussian": gaussian_filter,
    "median": median_filter,
    "mean": uniform_filter,
    "anisotropic_diffusion": anisotropic_diffusion,
    "unsharp_mask": unsharp_mask,
    "window": window,
    "normalize": normalize,
    "gradient_magnitude": gradient_magnitude,
}

__all__ = [
    "CT_PRESETS", "SEGMENTERS", "binary_closing", "binary_erosion", "binary_opening", "body_mask", "fill_holes",
    "kmeans_intensity", "label_counts", "largest_component", "lesion_candidates", "region_grow", "region_stats",
    "threshold_multiotsu", "threshold_otsu", "threshold_range",
    "FILTERS", "anisotropic_diffusion", "gaussian_filter", "get_ndi", "get_xp", "gpu_available",
    "gradient_magnitude", "halo_depth", "label", "median_filter", "normalize", "resample",
    "resolve_device", "to_device", "to_numpy", "uniform_filter", "unsharp_mask", "window",
]
