"""Halo depth from an operator's footprint, and the one ``map_overlap`` every filter uses.

Boundary: medpipe passes ``boundary="none"`` to Dask. Blocks at the edge of the volume are
then *not* padded by Dask, so SciPy's own ``mode`` (reflect, nearest, constant, mirror)
handles the true volume edge exactly as on the whole array, and interior faces get real
neighbour data. This is exact for every SciPy mode except ``wrap``, which needs the opposite
face and maps to Dask's ``periodic``. (Dask's ``reflect`` equals SciPy's default ``reflect``,
half-sample symmetric, too; ``none`` is simply exact for all the other modes as well and
moves less data.)

Any shape: an axis held by one block (after merging short chunks) gets no halo at all, since
the block is the whole axis and SciPy's ``mode`` handles both of its ends; so halos never
exceed the array (a one- or two-slice volume under a Gaussian of depth 3 works). An axis of
length one is not an image axis: :func:`planar` gives it a neutral footprint (sigma 0, size
1, the footprint's middle plane), so a single slice is filtered as the 2-D image it is, also
under ``mode="constant"`` (for the other modes SciPy's 3-D result is the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np


def _per_axis(value: float | Sequence[float], ndim: int, name: str) -> tuple[float, ...]:
    if np.isscalar(value):
        return (float(value),) * ndim  # type: ignore[arg-type]
    value = tuple(float(v) for v in value)  # type: ignore[union-attr]
    if len(value) != ndim:
        raise ValueError(f"{name} must be a scalar or have {ndim} values, got {len(value)}")
    return value


def halo_depth(
    ndim: int,
    *,
    sigma: float | Sequence[float] | None = None,
    truncate: float = 4.0,
    size: int | Sequence[int] | None = None,
    footprint: Any = None,
    radius: int | Sequence[int] | None = None,
    iterations: int = 1,
) -> tuple[int, ...]:
    """Halo depth per axis from an operator's footprint.

    The rule is the kernel's reach: ``int(sigma*truncate + 0.5)`` for Gaussians (SciPy's own
    kernel radius), ``size//2`` for a box of ``size``, ``shape//2`` for a footprint, ``radius``
    as given; times ``iterations`` for operators applied repeatedly.

    >>> halo_depth(3, sigma=2)
    (8, 8, 8)
    >>> halo_depth(3, size=(1, 3, 5))
    (0, 1, 2)
    >>> halo_depth(2, radius=1, iterations=3)
    (3, 3)
    """
    if sigma is not None:
        reach = tuple(int(s * truncate + 0.5) for s in _per_axis(sigma, ndim, "sigma"))
    elif footprint is not None:
        shape = np.shape(footprint)
        if len(shape) != ndim:
            raise ValueError(f"footprint must have {ndim} dimensions, got {len(shape)}")
        reach = tuple(n // 2 for n in shape)
    elif size is not None:
        reach = tuple(int(s) // 2 for s in _per_axis(size, ndim, "size"))
    elif radius is not None:
        reach = tuple(math.ceil(r) for r in _per_axis(radius, ndim, "radius"))
    else:
        raise ValueError("one of sigma, size, footprint or radius is required")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    return tuple(r * iterations for r in reach)


def planar(value: Any, shape: Sequence[int], neutral: float, name: str = "value") -> Any:
    """Per-axis ``value`` with ``neutral`` on the axes of length one; ``value`` itself when
    no axis has length one (scalars stay scalars on ordinary volumes).

    >>> planar(0.7, (1, 64, 64), 0.0)
    (0.0, 0.7, 0.7)
    >>> planar(3, (2, 64, 64), 1)
    3
    >>> planar(None, (1, 4, 4), 1) is None
    True
    """
    if value is None or all(n > 1 for n in shape):
        return value
    per_axis = _per_axis(value, len(shape), name)
    return tuple(type(neutral)(neutral) if n == 1 else type(neutral)(v) for v, n in zip(per_axis, shape))


def planar_footprint(footprint: Any, shape: Sequence[int]) -> Any:
    """``footprint`` cut to its middle plane along the axes of length one (same ``ndim``).

    >>> planar_footprint(np.ones((3, 3, 3), bool), (1, 5, 5)).shape
    (1, 3, 3)
    """
    if footprint is None or all(n > 1 for n in shape):
        return footprint
    out = np.asarray(footprint)
    if out.ndim != len(shape):
        return footprint  # the operator's own check names the mismatch
    for ax, n in enumerate(shape):
        if n == 1:
            out = out.take([out.shape[ax] // 2], axis=ax)
    return out


def fit_chunks(chunks: tuple[tuple[int, ...], ...], depth: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Merge neighbouring chunks along each axis until every chunk is at least ``depth`` long.

    >>> fit_chunks(((4, 4, 4, 3),), (6,))
    ((8, 7),)
    """
    out = []
    for sizes, d in zip(chunks, depth):
        if len(sizes) == 1 or min(sizes) >= d:
            out.append(tuple(sizes))
            continue
        merged: list[int] = []
        acc = 0
        for s in sizes:
            acc += s
            if acc >= d:
                merged.append(acc)
                acc = 0
        if acc:  # a short tail joins the last full chunk
            if merged:
                merged[-1] += acc
            else:
                merged.append(acc)
        out.append(tuple(merged))
    return tuple(out)


def apply_overlap(
    func: Callable[..., Any],
    image: Any,
    depth: Sequence[int],
    *,
    wrap: bool = False,
    dtype: Any = None,
    self_trim: bool = False,
    **kwargs: Any,
) -> Any:
    """Apply ``func(block, **kwargs)`` to a NumPy/CuPy array directly or to a Dask array blockwise.

    For Dask, chunks shorter than the halo are merged first (and the input chunking restored
    afterwards), then one ``map_overlap`` with ``boundary="none"`` (``periodic`` when
    ``wrap``, i.e. SciPy's ``mode="wrap"``) runs ``func`` with the halo ``depth``. Axes left
    in one block get no halo: the block holds the whole axis, so the result is exact without
    one, and Dask refuses a halo deeper than the array.

    With ``self_trim``, ``func`` also receives ``halo``: per axis the ``(low, high)`` halo
    widths of its block, and returns the block without them. Separable operators use this to
    drop an axis' halo right after filtering along it, so later passes skip those voxels.
    """
    if not isinstance(image, da.Array):
        if self_trim:
            return func(image, halo=((0, 0),) * image.ndim, **kwargs)
        return func(image, **kwargs)
    depth = tuple(int(d) for d in depth)
    if len(depth) != image.ndim:
        raise ValueError(f"depth has {len(depth)} values for a {image.ndim}-d image")
    original = image.chunks
    fitted = fit_chunks(original, depth)
    work = image.rechunk(fitted) if fitted != original else image
    depth = tuple(0 if len(sizes) == 1 else d for sizes, d in zip(fitted, depth))
    if self_trim:
        boundary = "periodic" if wrap else "none"
        extended = da.overlap.overlap(work, depth=dict(enumerate(depth)), boundary=boundary)
        out_dtype = image.dtype if dtype is None else np.dtype(dtype)
        out = extended.map_blocks(
            _trimmed_call, op=func, depth=depth, wrap=wrap, kwargs=kwargs,
            chunks=work.chunks, dtype=out_dtype, meta=image._meta.astype(out_dtype),
        )
        return out.rechunk(original) if fitted != original else out
    out = work.map_overlap(
        func,
        depth=dict(enumerate(depth)),
        boundary="periodic" if wrap else "none",
        dtype=image.dtype if dtype is None else dtype,
        meta=image._meta.astype(image.dtype if dtype is None else dtype),
        **kwargs,
    )
    return out.rechunk(original) if fitted != original else out


def _trimmed_call(block: Any, op: Callable[..., Any], depth: tuple[int, ...], wrap: bool,
                  kwargs: dict[str, Any], block_info: dict | None = None) -> Any:
    """Call ``func`` with the halo widths this block actually has (none outside the volume)."""
    info = block_info[0]
    loc, num = info["chunk-location"], info["num-chunks"]
    halo = tuple(
        (d if wrap or i > 0 else 0, d if wrap or i < n - 1 else 0)  # periodic pads every block
        for d, i, n in zip(depth, loc, num)
    )
    return op(block, halo=halo, **kwargs)
