"""Slice preprocessing shared by training and inference: window, normalise, resample, crop.

A slice goes through exactly these steps in both places, so the model sees at run time what
it saw in training:

1. clip to the intensity window ``(low, high)`` and scale it to ``[0, 1]``;
2. resample in-plane to ``spacing_mm`` (bilinear), or, with no target spacing, resize the
   whole slice to ``size x size``;
3. centre-crop or zero-pad to ``size x size`` (zero is the window's low end: air for CT);
4. repeat into ``channels``.

>>> import numpy as np
>>> x = preprocess_slices(np.full((2, 64, 64), 40.0), (4.0, 4.0), size=128, window=(-1000, 400),
...                       spacing_mm=2.0)
>>> x.shape, x.dtype
((2, 128, 128, 1), dtype('float32'))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class SliceGeometry:
    """How one slice shape maps onto the model grid: zoom factors, resampled shape, offsets."""

    shape: tuple[int, int]
    zoom: tuple[float, float]
    resampled: tuple[int, int]
    size: int

    def offsets(self) -> tuple[int, int]:
        """Start of the crop (>= 0) or of the padding (< 0, negated) along y and x."""
        return tuple((r - self.size) // 2 for r in self.resampled)  # type: ignore[return-value]


def slice_geometry(
    shape: tuple[int, int], pixel_spacing: tuple[float, float], size: int, spacing_mm: float | None
) -> SliceGeometry:
    """Zoom factors and resampled shape of a ``shape`` slice for a ``size`` model grid."""
    if spacing_mm is None:
        zoom = (size / shape[0], size / shape[1])
    else:
        zoom = (pixel_spacing[0] / spacing_mm, pixel_spacing[1] / spacing_mm)
    resampled = tuple(max(1, int(round(n * f))) for n, f in zip(shape, zoom))
    return SliceGeometry(tuple(shape), zoom, resampled, size)  # type: ignore[arg-type]


def window_normalise(slices: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to ``window`` and scale to ``[0, 1]`` as float32 (NaN stays NaN)."""
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"window must satisfy low < high, got {window}")
    out = np.clip(np.asarray(slices, dtype=np.float32), low, high)
    out -= low
    out /= high - low
    return out


def _zoom_slices(stack: np.ndarray, shape: tuple[int, int], *, order: int) -> np.ndarray:
    """Resample each slice to ``shape`` in 2D (a 3D zoom would mix neighbouring slices' NaNs)."""
    factors = (shape[0] / stack.shape[1], shape[1] / stack.shape[2])
    out = np.empty((stack.shape[0], *shape), stack.dtype)
    for i, sl in enumerate(stack):
        out[i] = ndi.zoom(sl, factors, order=order, mode="nearest", grid_mode=True)[: shape[0], : shape[1]]
    return out


def _crop_or_pad(stack: np.ndarray, geom: SliceGeometry) -> np.ndarray:
    n = stack.shape[0]
    out = np.zeros((n, geom.size, geom.size), np.float32)
    src, dst = [], []
    for r, off in zip(geom.resampled, geom.offsets()):
        if off >= 0:
            src.append(slice(off, off + geom.size))
            dst.append(slice(0, geom.size))
        else:
            src.append(slice(0, r))
            dst.append(slice(-off, -off + r))
    out[:, dst[0], dst[1]] = stack[:, src[0], src[1]]
    return out


def preprocess_slices(
    slices: np.ndarray,
    pixel_spacing: tuple[float, float],
    *,
    size: int,
    window: tuple[float, float],
    spacing_mm: float | None = None,
    channels: int = 1,
) -> np.ndarray:
    """Turn ``(n, y, x)`` slices into a ``(n, size, size, channels)`` float32 model batch.

    Parameters
    ----------
    slices : ndarray, shape (n, y, x)
        Intensities (Hounsfield units for CT).
    pixel_spacing : (float, float)
        Row and column spacing of the slices in millimetres.
    size : int
        Model input height and width.
    window : (float, float)
        Intensity window mapped to ``[0, 1]``.
    spacing_mm : float, optional
        Target in-plane spacing; ``None`` resizes the whole slice to ``size``.
    channels : int
        Channels the model expects; the grey slice is repeated.

    Returns
    -------
    ndarray, shape (n, size, size, channels), float32
    """
    slices = np.asarray(slices)
    if slices.ndim != 3:
        raise ValueError(f"slices must have shape (n, y, x), got {slices.shape}")
    geom = slice_geometry(slices.shape[1:], pixel_spacing, size, spacing_mm)
    stack = window_normalise(slices, window)
    if geom.resampled != geom.shape:
        stack = _zoom_slices(stack, geom.resampled, order=1)
    stack = _crop_or_pad(stack, geom)
    return np.repeat(stack[..., None], channels, axis=-1) if channels > 1 else stack[..., None]


def restore_slices(model_grid: np.ndarray, geom: SliceGeometry, *, order: int = 0) -> np.ndarray:
    """Map ``(n, size, size)`` model-grid maps (e.g. masks) back onto the original slice grid."""
    n = model_grid.shape[0]
    resampled = np.zeros((n, *geom.resampled), model_grid.dtype)
    src, dst = [], []
    for r, off in zip(geom.resampled, geom.offsets()):
        if off >= 0:
            dst.append(slice(off, off + geom.size))
            src.append(slice(0, geom.size))
        else:
            dst.append(slice(0, r))
            src.append(slice(-off, -off + r))
    resampled[:, dst[0], dst[1]] = model_grid[:, src[0], src[1]]
    if geom.resampled == geom.shape:
        return resampled
    return _zoom_slices(resampled, geom.shape, order=order)
