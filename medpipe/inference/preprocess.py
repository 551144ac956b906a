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


def _window_into(src: np.ndarray, low: float, high: float) -> np.ndarray:
    """``window_normalise`` of ``src`` as a new float32 array, in place after the one conversion."""
    out = src.astype(np.float32)  # the only copy; int16 HU converts exactly
    np.clip(out, low, high, out=out)
    out -= low
    out /= high - low
    return out


def _crop_ranges(geom: SliceGeometry) -> tuple[list[slice], list[slice]]:
    """Per axis: the resampled-grid range that survives the crop, and where it lands in the output."""
    src, dst = [], []
    for r, off in zip(geom.resampled, geom.offsets()):
        if off >= 0:
            src.append(slice(off, off + geom.size))
            dst.append(slice(0, geom.size))
        else:
            src.append(slice(0, r))
            dst.append(slice(-off, -off + r))
    return src, dst


def _integer_steps(geom: SliceGeometry) -> tuple[int, int] | None:
    """Downsampling steps ``k`` when every resampled pixel covers exactly ``k`` input pixels."""
    if any(r > n or n % r for n, r in zip(geom.shape, geom.resampled)):
        return None
    return geom.shape[0] // geom.resampled[0], geom.shape[1] // geom.resampled[1]


def _taps(k: int, part: slice) -> list[slice]:
    """Input indices that bilinear ``ndi.zoom`` (grid_mode) reads for resampled range ``part``.

    Resampled pixel ``o`` sits at input coordinate ``k*o + (k-1)/2``: one pixel when ``k`` is
    odd, the mean of two neighbours when it is even (weights 1/2 each).
    """
    a, b = k * part.start, k * part.stop
    if k % 2:
        return [slice(a + (k - 1) // 2, b, k)]
    return [slice(a + k // 2 - 1, b, k), slice(a + k // 2, b, k)]


def _clip_dtype(dtype: np.dtype, low: float, high: float) -> np.dtype:
    """Where to clip: integer pixels against an integral window inside their range stay integers
    (exact, half the bytes of float32); anything else goes to float32 as ``window_normalise`` does."""
    if dtype.kind in "iu" and low.is_integer() and high.is_integer():
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return np.dtype(np.float32)


def _downsample_integer(slices: np.ndarray, geom: SliceGeometry, steps: tuple[int, int],
                        window: tuple[float, float], out: np.ndarray) -> None:
    """Window and downsample by integer ``steps`` straight into the model grid ``out``.

    Bilinear ``ndi.zoom(grid_mode=True)`` by ``1/k`` reads one input pixel (``k`` odd) or the
    mean of two (``k`` even) per axis, so each tap is a strided view: clipped into one small
    reused buffer, summed into ``out``, then scaled once. Same numbers as windowing, zooming and
    cropping, to a float32 rounding or two (the sum of integer taps is exact); only the input
    pixels the kept part of the grid needs are read (a quarter of them or fewer), and nothing
    of the input's size is allocated (page faults cost as much as the arithmetic in a Dask
    worker, which returns freed memory to the system at once).
    """
    low, high = window
    src, dst = _crop_ranges(geom)
    ys, xs = _taps(steps[0], src[0]), _taps(steps[1], src[1])
    view = out[:, dst[0], dst[1]]
    tmp = np.empty(view.shape, _clip_dtype(slices.dtype, low, high))
    bounds = (low, high) if tmp.dtype.kind == "f" else (int(low), int(high))
    for i, (ty, tx) in enumerate((ty, tx) for ty in ys for tx in xs):
        np.clip(slices[:, ty, tx], *bounds, out=tmp, casting="unsafe")
        if i == 0:
            np.copyto(view, tmp, casting="unsafe")
        else:
            np.add(view, tmp, out=view, casting="unsafe")
    n_taps = len(ys) * len(xs)
    if n_taps > 1:
        view /= n_taps  # 2 or 4: exact
    view -= low
    view /= high - low


def _resample_cropped(slices: np.ndarray, geom: SliceGeometry, window: tuple[float, float],
                      out: np.ndarray) -> None:
    """Window and bilinearly resample only the part of each slice that survives the crop.

    ``ndi.zoom(grid_mode=True)`` puts resampled pixel ``o`` at input coordinate
    ``(o + 0.5) * s - 0.5`` with ``s = n / resampled``; the same mapping, shifted to the kept
    range, goes to ``ndi.affine_transform`` (a diagonal matrix runs zoom's own kernel) over the
    input rows and columns it touches (plus a pixel of margin), so a large field of view is
    not windowed and resampled only to be cropped away.
    """
    src, dst = _crop_ranges(geom)
    scale, offset, rows = [], [], []
    for n, r, part in zip(geom.shape, geom.resampled, src):
        s = n / r
        first = (part.start + 0.5) * s - 0.5
        last = (part.stop - 1 + 0.5) * s - 0.5
        lo = max(0, int(np.floor(first)) - 1)
        hi = min(n, int(np.floor(last)) + 3)
        scale.append(s)
        offset.append(first - lo)
        rows.append(slice(lo, hi))
    stack = _window_into(slices[:, rows[0], rows[1]], *window)
    shape = (src[0].stop - src[0].start, src[1].stop - src[1].start)
    view = out[:, dst[0], dst[1]]
    for i, sl in enumerate(stack):  # 2D per slice: a 3D transform would mix neighbouring slices' NaNs
        ndi.affine_transform(sl, scale, offset, output_shape=shape, output=view[i], order=1, mode="nearest")


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
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"window must satisfy low < high, got {window}")
    geom = slice_geometry(slices.shape[1:], pixel_spacing, size, spacing_mm)
    out = np.zeros((slices.shape[0], size, size), np.float32)  # zero: the window's low end
    steps = _integer_steps(geom)
    # Integral factors (1 mm -> 2 mm, or none): strided means instead of interpolation. Not with
    # NaN/inf pixels: zoom's kernel also reads weight-0 neighbours, so they spread one pixel further.
    if steps is not None and (steps == (1, 1) or slices.dtype.kind in "iub" or np.isfinite(slices).all()):
        _downsample_integer(slices, geom, steps, (low, high), out)
    else:
        _resample_cropped(slices, geom, (low, high), out)
    return np.repeat(out[..., None], channels, axis=-1) if channels > 1 else out[..., None]


def restore_slices(model_grid: np.ndarray, geom: SliceGeometry, *, order: int = 0) -> np.ndarray:
    """Map ``(n, size, size)`` model-grid maps (e.g. masks) back onto the original slice grid."""
    n = model_grid.shape[0]
    resampled = np.zeros((n, *geom.resampled), model_grid.dtype)
    on_resampled, on_model = _crop_ranges(geom)  # the crop, run backwards
    resampled[:, on_resampled[0], on_resampled[1]] = model_grid[:, on_model[0], on_model[1]]
    if geom.resampled == geom.shape:
        return resampled
    return _zoom_slices(resampled, geom.shape, order=order)
