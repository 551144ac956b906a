"""Array-module dispatch and device choice: one code path for NumPy and CuPy.

Operators call :func:`get_xp` and :func:`get_ndi` on their input and never import CuPy
themselves, so the library runs where CuPy is absent. The device is configuration
(``cluster.device``: ``auto|cpu|gpu``); :func:`resolve_device` turns it into ``cpu`` or
``gpu`` and :func:`to_device` moves a (Dask) array there.

>>> import numpy as np
>>> get_xp(np.zeros(3)) is np
True
>>> resolve_device("cpu")
'cpu'
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np
import scipy.ndimage

try:  # CuPy is optional: the suite and CPU deployments run without it.
    import cupy
    import cupyx.scipy.ndimage as cupy_ndi
except Exception:  # ImportError, or a CUDA runtime that fails to load
    cupy = None
    cupy_ndi = None

DEVICES = ("auto", "cpu", "gpu")


def _meta_array(a: Any) -> Any:
    """The chunk type of a Dask array, or the array itself."""
    return getattr(a, "_meta", a)


def get_xp(a: Any) -> ModuleType:
    """``cupy`` for CuPy arrays (or Dask arrays of CuPy chunks), else ``numpy``."""
    if cupy is not None:
        return cupy.get_array_module(_meta_array(a))
    return np


def get_ndi(a: Any) -> ModuleType:
    """``cupyx.scipy.ndimage`` for CuPy arrays, else ``scipy.ndimage``."""
    return cupy_ndi if get_xp(a) is not np else scipy.ndimage


def is_gpu_array(a: Any) -> bool:
    return get_xp(a) is not np


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def resolve_device(device: str = "auto") -> str:
    """``cpu`` or ``gpu`` from ``auto|cpu|gpu``; ``auto`` picks the GPU when one is usable.

    Raises
    ------
    ValueError
        For an unknown name, or ``gpu`` where CuPy or a device is missing.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise ValueError("device 'gpu' requested but CuPy or a CUDA device is not available")
    return device


def to_device(a: Any, device: str) -> Any:
    """Move a NumPy/CuPy/Dask array to ``device`` (``cpu`` or ``gpu``); Dask stays lazy."""
    import dask.array as da

    want_gpu = resolve_device(device) == "gpu"
    if want_gpu == is_gpu_array(a):
        return a
    convert = cupy.asarray if want_gpu else cupy.asnumpy  # type: ignore[union-attr]
    if isinstance(a, da.Array):
        meta = convert(np.empty((0,) * a.ndim, a.dtype)) if want_gpu else np.empty((0,) * a.ndim, a.dtype)
        return a.map_blocks(convert, dtype=a.dtype, meta=meta)
    return convert(a)


def to_numpy(a: Any) -> Any:
    """A NumPy array (or Dask array of NumPy chunks) from any supported array."""
    return to_device(a, "cpu") if is_gpu_array(a) else a
