"""A filter pipeline over a Zarr volume in z-slabs: one task per slab reads the slab and a
halo from Zarr, runs every step on it and writes its part of the output's chunks.

No Dask overlap, concatenation or rechunk copies, and memory bounded by the slab. The result
equals the pipeline on the whole volume: a slab's halo is the sum of the steps' reaches along
z (:func:`pipeline_halo`), so every voxel written saw the same neighbours, and the volume's
own ends get each filter's boundary mode as before. Steps that are not local (``normalize``
takes statistics of the whole volume; ``mode="wrap"`` reaches the other end) have no halo:
the caller runs those pipelines on Dask arrays instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import dask
import numpy as np
import zarr

from .. import omezarr
from ._backend import to_device, to_numpy
from ._heap import keep_heap
from . import _median3
from ._overlap import halo_depth
from .filters import median_filter

__all__ = ["pipeline_halo", "filter_slabs"]

# Each slab-local operator's reach along z from its parameters (defaults filled in).
_REACH: dict[str, Callable[[dict[str, Any]], int]] = {
    "median": lambda p: halo_depth(3, size=p["size"], footprint=p["footprint"])[0],
    "gaussian": lambda p: halo_depth(3, sigma=p["sigma"], truncate=p["truncate"])[0],
    "mean": lambda p: halo_depth(3, size=p["size"])[0],
    "gradient_magnitude": lambda p: halo_depth(3, sigma=p["sigma"], truncate=p["truncate"])[0],
    "unsharp_mask": lambda p: halo_depth(3, sigma=p["sigma"], truncate=p["truncate"])[0],
    "anisotropic_diffusion": lambda p: int(p["niter"]),
    "window": lambda p: 0,
}


def pipeline_halo(steps: Sequence[Any], funcs: Sequence[Callable[..., Any]]) -> int | None:
    """Slices of halo along z that make a slab's output exact, or ``None`` where a step is
    not slab-local (unknown reach, global statistics, ``mode="wrap"``).

    >>> from medpipe.config import FilterStep
    >>> from medpipe.ops import FILTERS
    >>> steps = [FilterStep(op="median", params={"size": 3}), FilterStep(op="gaussian", params={"sigma": 1})]
    >>> pipeline_halo(steps, [FILTERS[s.op] for s in steps])
    5
    >>> pipeline_halo([FilterStep(op="normalize")], [FILTERS["normalize"]]) is None
    True
    """
    total = 0
    for step, func in zip(steps, funcs):
        reach = _REACH.get(step.op)
        if reach is None:
            return None
        try:
            bound = inspect.signature(func).bind(None, **step.params)
        except TypeError:
            return None  # bad parameters: the Dask path reports them as the stage always did
        bound.apply_defaults()
        params = dict(bound.arguments)
        if params.get("mode") == "wrap":
            return None
        total += reach(params)
    return total


def _filter_slab(source: str, target: str, z0: int, z1: int, halo: int, funcs: Sequence[Callable[..., Any]],
                 params: Sequence[dict[str, Any]], device: str) -> None:
    keep_heap()
    src = zarr.open_array(source, mode="r")
    lo, hi = max(0, z0 - halo), min(src.shape[0], z1 + halo)
    stored = src[lo:hi]
    first = 0
    if device == "cpu" and funcs and _median_on_stored(stored, funcs[0], params[0]):
        work, first = median_filter(stored, **params[0]).astype(np.float32), 1
    else:
        work = to_device(stored.astype(np.float32), device)
    del stored
    for func, p in zip(funcs[first:], params[first:]):
        work = func(work, **p)
    out = np.asarray(to_numpy(work)[z0 - lo: z0 - lo + (z1 - z0)], dtype=np.float32)
    omezarr.write_block(zarr.open_array(target, mode="r+"), (z0, 0, 0), np.ascontiguousarray(out))


def _median_on_stored(stored: np.ndarray, func: Callable[..., Any], params: dict[str, Any]) -> bool:
    """Whether a first median step can run on the stored integers and be cast afterwards.

    A median picks one of its inputs, and integers of up to 16 bits convert to float32 exactly
    and in order, so the median of the float32 copy is the float32 of the median: the same
    values, from the sorting-network kernel on 2-byte items (about 3x faster than on float32).
    Only where that kernel takes the case (a constant ``cval`` the dtype holds exactly).
    """
    if func is not median_filter or stored.dtype.kind not in "iu" or stored.dtype.itemsize > 2:
        return False
    bound = inspect.signature(median_filter).bind(None, **params)
    bound.apply_defaults()
    p = bound.arguments
    return _median3.supports(stored, p["size"], p["footprint"], p["mode"], p["cval"])


def filter_slabs(source: str, target: str, bounds: Sequence[tuple[int, int]], halo: int,
                 funcs: Sequence[Callable[..., Any]], params: Sequence[dict[str, Any]], device: str) -> None:
    """Run the pipeline ``funcs`` (with ``params``) over Zarr array ``source`` into ``target``
    (float32, same shape and chunks), one task per z-range of ``bounds`` (whole chunks) on the
    active Dask scheduler."""
    tasks = [dask.delayed(_filter_slab, pure=False)(source, target, z0, z1, halo, funcs, params, device)
             for z0, z1 in bounds]
    dask.compute(*tasks)
