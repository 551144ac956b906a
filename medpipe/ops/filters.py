"""Filters with SciPy's signatures for NumPy, CuPy and Dask arrays.

Each function derives its halo from the footprint (:func:`~medpipe.ops._overlap.halo_depth`)
and runs the SciPy (or ``cupyx.scipy``) function through one ``map_overlap``; on NumPy or
CuPy input it simply calls that function. Outputs have the input's array type.

>>> import numpy as np
>>> from scipy import ndimage
>>> a = np.random.default_rng(0).random((9, 10, 11), dtype=np.float32)
>>> import dask.array as da
>>> d = gaussian_filter(da.from_array(a, chunks=4), sigma=1.0)
>>> bool(np.allclose(d.compute(), ndimage.gaussian_filter(a, 1.0), rtol=1e-6))
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np

from . import _banded, _median3
from ._backend import get_ndi, get_xp
from ._overlap import apply_overlap, halo_depth, planar, planar_footprint

__all__ = [
    "gaussian_filter", "median_filter", "uniform_filter", "anisotropic_diffusion", "unsharp_mask",
    "gradient_magnitude", "window", "normalize", "resample",
]


def _check_image(image: Any) -> None:
    if not hasattr(image, "ndim") or not hasattr(image, "dtype"):
        raise TypeError(f"expected a NumPy, CuPy or Dask array, got {type(image).__name__}")
    if image.ndim < 1:
        raise ValueError("expected an array with at least one dimension")


# Block functions live at module level so that Dask workers can unpickle them.
def _crop(a: Any, axis: int, lo: int, hi: int) -> Any:
    if lo == 0 and hi == 0:
        return a
    index = [slice(None)] * a.ndim
    index[axis] = slice(lo, a.shape[axis] - hi)
    return a[tuple(index)]


def _gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """SciPy's order-0 Gaussian kernel (``scipy.ndimage._filters._gaussian_kernel1d``)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return phi / phi.sum()


def _gaussian_block(block: Any, sigma: Any, order: Any, mode: str, cval: float, truncate: float,
                    halo: tuple[tuple[int, int], ...]) -> Any:
    """SciPy's gaussian_filter pass by pass (same passes in the same order, each rounded to the
    input dtype), dropping each axis' halo right after its pass so that later passes skip it.

    Strided axes of NumPy float blocks go through :mod:`~medpipe.ops._banded` (3-6x faster
    than SciPy there); the contiguous last axis, derivatives and CuPy use (cupyx.)scipy.
    Every pass after the first works in place, like SciPy: fresh buffers per pass cost page
    faults, about 40 % more time on 160 MB blocks.
    """
    ndi = get_ndi(block)
    xp = get_xp(block)
    sigmas = np.broadcast_to(np.asarray(sigma, dtype=float), (block.ndim,))
    orders = np.broadcast_to(np.asarray(order, dtype=int), (block.ndim,))
    current, owned = block, False  # never write into the caller's block
    for ax in range(block.ndim):
        low, high = halo[ax]
        if sigmas[ax] <= 1e-15:  # scipy skips axes with sigma 0 too
            current = _crop(current, ax, low, high)
        elif orders[ax] == 0 and _banded.supports(current, ax, mode):
            current = _banded.correlate1d(current, _gaussian_weights(float(sigmas[ax]), truncate), ax, mode=mode,
                                          cval=cval, crop=(low, high), inplace=owned)
            owned = True
        else:
            out = current if owned else xp.empty_like(current)
            ndi.gaussian_filter1d(current, float(sigmas[ax]), axis=ax, order=int(orders[ax]), output=out,
                                  mode=mode, cval=cval, truncate=truncate)
            current, owned = _crop(out, ax, low, high), True
    return current if owned else current.copy()  # every sigma zero: a copy, as scipy returns


def _median_block(block: Any, size: Any = None, footprint: Any = None, mode: str = "reflect",
                  cval: float = 0.0) -> Any:
    """SciPy's median; 3x3x3 and in-plane 3x3 windows on NumPy blocks go through the exact
    sorting-network kernel :mod:`~medpipe.ops._median3` (about 20x faster), the rest
    (other sizes, footprints, CuPy, NaN) through (cupyx.)scipy."""
    if _median3.supports(block, size, footprint, mode, cval):
        return _median3.median3(block, size, mode=mode, cval=cval)
    if footprint is not None:  # cupyx wants the footprint on the device
        footprint = get_xp(block).asarray(footprint)
    return get_ndi(block).median_filter(block, size=size, footprint=footprint, mode=mode, cval=cval)


def _uniform_block(block: Any, **kw: Any) -> Any:
    return get_ndi(block).uniform_filter(block, **kw)


def _ggm_block(block: Any, **kw: Any) -> Any:
    return get_ndi(block).gaussian_gradient_magnitude(block, **kw)


def gaussian_filter(
    image: Any, sigma: float | Sequence[float], order: int = 0, mode: str = "reflect",
    cval: float = 0.0, truncate: float = 4.0,
) -> Any:
    """Gaussian filter (``scipy.ndimage.gaussian_filter``); halo ``int(sigma*truncate+0.5)``.

    Axes of length one are not smoothed (a single slice is a 2-D image); derivatives
    (``order`` > 0) keep SciPy's semantics on every axis.
    """
    _check_image(image)
    if not np.any(order):
        sigma = planar(sigma, image.shape, 0.0, "sigma")
    depth = halo_depth(image.ndim, sigma=sigma, truncate=truncate)
    return apply_overlap(_gaussian_block, image, depth, wrap=mode == "wrap", self_trim=True,
                         sigma=sigma, order=order, mode=mode, cval=cval, truncate=truncate)


def median_filter(
    image: Any, size: int | Sequence[int] | None = None, footprint: Any = None,
    mode: str = "reflect", cval: float = 0.0,
) -> Any:
    """Median filter (``scipy.ndimage.median_filter``); halo ``size//2``; axes of length one
    get size 1 (a single slice is a 2-D image).

    ``size=3`` on NumPy data runs an exact sorting-network kernel (:mod:`~medpipe.ops._median3`),
    equal to SciPy bit for bit; other windows, CuPy and float data holding NaN run SciPy's.

    >>> from scipy import ndimage
    >>> a = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    >>> bool(np.array_equal(median_filter(a, 3), ndimage.median_filter(a, 3)))
    True
    """
    _check_image(image)
    if size is None and footprint is None:
        raise ValueError("median_filter needs size or footprint")
    size, footprint = planar(size, image.shape, 1, "size"), planar_footprint(footprint, image.shape)
    depth = halo_depth(image.ndim, size=size, footprint=footprint)
    return apply_overlap(_median_block, image, depth, wrap=mode == "wrap",
                         size=size, footprint=footprint, mode=mode, cval=cval)


def uniform_filter(image: Any, size: int | Sequence[int] = 3, mode: str = "reflect", cval: float = 0.0) -> Any:
    """Mean over a box (``scipy.ndimage.uniform_filter``); halo ``size//2``; axes of length one
    get size 1."""
    _check_image(image)
    size = planar(size, image.shape, 1, "size")
    depth = halo_depth(image.ndim, size=size)
    return apply_overlap(_uniform_block, image, depth, wrap=mode == "wrap", size=size, mode=mode, cval=cval)


def gradient_magnitude(image: Any, sigma: float | Sequence[float] = 1.0, mode: str = "reflect",
                       cval: float = 0.0, truncate: float = 4.0) -> Any:
    """Gaussian gradient magnitude (``scipy.ndimage.gaussian_gradient_magnitude``).

    SciPy's semantics on every axis: along an axis of length one the derivative is zero for
    every mode but ``constant`` (where the edge is a step to ``cval``).
    """
    _check_image(image)
    depth = halo_depth(image.ndim, sigma=sigma, truncate=truncate)
    return apply_overlap(_ggm_block, image, depth, wrap=mode == "wrap",
                         sigma=sigma, mode=mode, cval=cval, truncate=truncate)


def _unsharp_block(block: Any, sigma: Any, amount: float, truncate: float) -> Any:
    blurred = get_ndi(block).gaussian_filter(block, sigma=sigma, truncate=truncate)
    return block + amount * (block - blurred)


def unsharp_mask(image: Any, sigma: float | Sequence[float] = 1.0, amount: float = 1.0,
                 truncate: float = 4.0) -> Any:
    """Enhancement: ``image + amount * (image - gaussian(image, sigma))`` (float input expected).

    Integer input is computed in float32. Axes of length one are not blurred.
    """
    _check_image(image)
    image = _as_float(image)
    sigma = planar(sigma, image.shape, 0.0, "sigma")
    depth = halo_depth(image.ndim, sigma=sigma, truncate=truncate)
    return apply_overlap(_unsharp_block, image, depth, sigma=sigma, amount=float(amount), truncate=truncate)


def _diffusion_block(block: Any, niter: int, kappa: float, gamma: float) -> Any:
    """Perona-Malik with zero flux across the array edge; identical float operations per voxel."""
    xp = get_xp(block)
    u = block.astype(xp.float32, copy=True)
    for _ in range(niter):
        update = xp.zeros_like(u)
        for ax in range(u.ndim):
            if u.shape[ax] < 2:
                continue
            d = xp.diff(u, axis=ax)
            flux = d * xp.exp(-((d / kappa) ** 2))
            lo = tuple(slice(0, -1) if i == ax else slice(None) for i in range(u.ndim))
            hi = tuple(slice(1, None) if i == ax else slice(None) for i in range(u.ndim))
            update[lo] += flux
            update[hi] -= flux
        u += xp.float32(gamma) * update
    return u


def anisotropic_diffusion(image: Any, niter: int = 5, kappa: float = 50.0, gamma: float = 0.1) -> Any:
    """Edge-preserving Perona-Malik diffusion (exponential conductance), float32 output.

    Parameters
    ----------
    image : array
        NumPy, CuPy or Dask array.
    niter : int
        Iterations; the halo is ``niter`` voxels (each iteration reaches one neighbour).
    kappa : float
        Gradient (intensity units) above which diffusion stops: edges stronger than ``kappa``
        are kept.
    gamma : float
        Step size, at most ``1 / (2 * ndim)`` for stability.
    """
    _check_image(image)
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    if not 0 < gamma <= 1.0 / (2 * image.ndim):
        raise ValueError(f"gamma must be in (0, {1.0 / (2 * image.ndim):.3g}] for stability, got {gamma}")
    if kappa <= 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    depth = (int(niter),) * image.ndim
    return apply_overlap(_diffusion_block, image, depth, dtype=np.float32,
                         niter=int(niter), kappa=float(kappa), gamma=float(gamma))


def _as_float(image: Any) -> Any:
    return image if np.dtype(image.dtype).kind == "f" else image.astype(np.float32)


def _window_block(block: Any, low: float, high: float) -> Any:
    xp = get_xp(block)
    out = (xp.clip(block.astype(xp.float32), low, high) - xp.float32(low)) / xp.float32(high - low)
    return out.astype(xp.float32)


def window(image: Any, low: float, high: float) -> Any:
    """Intensity window: clip to ``[low, high]`` and scale to ``[0, 1]`` (float32).

    >>> window(np.array([-1000, 40, 2000]), -160, 240).tolist()
    [0.0, 0.5, 1.0]
    """
    _check_image(image)
    if not high > low:
        raise ValueError(f"window needs high > low, got low={low}, high={high}")
    if isinstance(image, da.Array):
        return image.map_blocks(_window_block, low=float(low), high=float(high), dtype=np.float32)
    return _window_block(image, float(low), float(high))


def _affine_block(block: Any, scale: float, offset: float) -> Any:
    xp = get_xp(block)
    return ((block.astype(xp.float32) - xp.float32(offset)) * xp.float32(scale)).astype(xp.float32)


def normalize(image: Any, method: str = "zscore", percentiles: tuple[float, float] = (1.0, 99.0)) -> Any:
    """Intensity normalisation over the whole volume (float32).

    ``zscore``: zero mean, unit standard deviation; ``minmax``: to ``[0, 1]``; ``percentile``:
    ``percentiles`` map to 0 and 1 (values outside are not clipped).
    """
    _check_image(image)
    lazy = isinstance(image, da.Array)
    xp = get_xp(image)
    if method == "zscore":
        stats = (image.mean(dtype=np.float64), image.std(dtype=np.float64))
    elif method == "minmax":
        stats = (image.min(), image.max())
    elif method == "percentile":
        flat = image.ravel() if lazy else image.ravel()
        if lazy:
            q = da.percentile(flat.astype(np.float64), list(percentiles))  # approximate per block merge
            stats = (q[0], q[1])
        else:
            q = xp.percentile(flat, list(percentiles))
            stats = (q[0], q[1])
    else:
        raise ValueError(f"method must be 'zscore', 'minmax' or 'percentile', got {method!r}")
    if lazy:
        import dask

        stats = dask.compute(*stats)
    a, b = float(stats[0]), float(stats[1])
    if method == "zscore":
        offset, scale = a, 1.0 / b if b > 0 else 1.0
    else:
        offset, scale = a, 1.0 / (b - a) if b > a else 1.0
    if lazy:
        return image.map_blocks(_affine_block, scale=scale, offset=offset, dtype=np.float32)
    return _affine_block(image, scale, offset)


def resample(
    image: Any, spacing: Sequence[float], target_spacing: Sequence[float], order: int = 1,
    mode: str = "nearest",
) -> Any:
    """Resample to ``target_spacing`` (same units as ``spacing``); voxel 0 centres stay aligned.

    The output shape is ``round(shape * spacing / target_spacing)``. On Dask input each output
    block reads only the input region it maps to (plus the spline's reach) and shifts the
    transform by its offset, so it equals the whole-volume result.
    """
    _check_image(image)
    if len(spacing) != image.ndim or len(target_spacing) != image.ndim:
        raise ValueError(f"spacing and target_spacing need {image.ndim} values")
    if min(spacing) <= 0 or min(target_spacing) <= 0:
        raise ValueError("spacings must be positive")
    factors = [t / s for s, t in zip(spacing, target_spacing)]
    shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(image.shape, spacing, target_spacing))
    matrix = np.asarray(factors)
    if isinstance(image, da.Array):
        return _resample_dask(image, np.asarray(factors), shape, order, mode)
    xp = get_xp(image)
    return get_ndi(image).affine_transform(image, xp.asarray(matrix), output_shape=shape, order=order, mode=mode)


def _resample_block(block: Any, factors: np.ndarray, start: np.ndarray, out_shape: tuple[int, ...],
                    order: int, mode: str) -> Any:
    xp = get_xp(block)
    return get_ndi(block).affine_transform(block, xp.asarray(factors), offset=xp.asarray(start),
                                           output_shape=out_shape, order=order, mode=mode)


def _resample_dask(image: da.Array, factors: np.ndarray, shape: tuple[int, ...], order: int, mode: str) -> da.Array:
    """Each output block from the input region it needs (its coordinates' range +- order + 1)."""
    if order > 1:
        raise ValueError("resample of Dask arrays supports order 0 or 1 (no global spline prefilter)")
    if mode not in ("nearest", "constant"):
        raise ValueError(f"resample mode {mode!r} not supported on Dask arrays; use 'nearest' or 'constant'")
    out_chunks = tuple(da.core.normalize_chunks(min(c[0], n), (n,))[0] for c, n in zip(image.chunks, shape))
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in out_chunks]
    blocks = np.empty([len(c) for c in out_chunks], dtype=object)
    for idx in np.ndindex(*blocks.shape):
        o0 = np.array([starts[a][i] for a, i in enumerate(idx)])
        size = tuple(out_chunks[a][i] for a, i in enumerate(idx))
        lo = np.floor(o0 * factors).astype(int) - 1
        hi = np.ceil((o0 + np.array(size) - 1) * factors).astype(int) + 2
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, image.shape)
        piece = image[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
        # Coordinates inside the piece: out * f - lo; clamp (mode nearest) matches the whole volume
        # because the piece reaches the true edge wherever a coordinate falls outside it.
        blocks[idx] = piece.rechunk(piece.shape).map_blocks(
            _resample_block, factors=factors, start=o0 * factors - lo, out_shape=size, order=order,
            mode=mode, chunks=size, dtype=image.dtype)
    return da.block(blocks.tolist())
