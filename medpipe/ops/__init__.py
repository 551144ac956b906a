"""medpipe's operator library: filters, segmentation and measurement for NumPy, CuPy and Dask.

Every operator takes a NumPy, CuPy or Dask array and returns the same kind. ``FILTERS`` and
``SEGMENTERS`` map the operator names used in the configuration to functions.
"""

from __future__ import annotations

from ._backend import get_ndi, get_xp, gpu_available, resolve_device, to_device, to_numpy
from ._overlap import halo_depth
from .filters import (
    anisotropic_diffusion, gaussian_filter, gradient_magnitude, median_filter, normalize, resample,
    uniform_filter, unsharp_mask, window,
)
from ._label import label

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
    "FILTERS", "anisotropic_diffusion", "gaussian_filter", "get_ndi", "get_xp", "gpu_available",
    "gradient_magnitude", "halo_depth", "label", "median_filter", "normalize", "resample",
    "resolve_device", "to_device", "to_numpy", "uniform_filter", "unsharp_mask", "window",
]
