"""Slices of a study's Zarr image read and preprocessed into a model batch.

Shared by the inference stage (:mod:`medpipe.inference.stage`) and the saliency maps
(:mod:`medpipe.inference.saliency`), which both read slices the way the model expects them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .. import omezarr
from .model import ModelInfo
from .preprocess import preprocess_slices

__all__ = ["load_batch", "read_batch", "read_slices"]


def read_batch(image_path: str | Path, start: int, stop: int, info: ModelInfo,
               pixel_spacing: tuple[float, float] | None = None) -> np.ndarray:
    """Slices ``start:stop`` of a Zarr image, preprocessed into a model batch.

    ``pixel_spacing`` (row, column mm) saves reading the image metadata when the caller has it.
    """
    if pixel_spacing is None:
        pixel_spacing = omezarr.read_meta(image_path).spacing[1:]
    # Level 0 straight from Zarr: a Dask graph per batch (read_image) costs twice the decode.
    arr = zarr.open_array(str(Path(image_path) / "0"), mode="r")
    return load_batch(arr, start, stop, info, pixel_spacing)[0]


def read_slices(image_path: str | Path, slices: list[int], info: ModelInfo) -> np.ndarray:
    """The listed slices of a Zarr image (any order), preprocessed into one model batch."""
    pixel_spacing = omezarr.read_meta(image_path).spacing[1:]
    arr = zarr.open_array(str(Path(image_path) / "0"), mode="r")
    raw = np.stack([arr[int(z)] for z in slices])
    return preprocess_slices(raw, pixel_spacing, size=info.size, window=info.window, spacing_mm=info.spacing_mm,
                             channels=info.channels)


def load_batch(arr: Any, start: int, stop: int, info: ModelInfo,
               pixel_spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Read and preprocess slices ``start:stop``: the batch, non-finite slices, slice shape."""
    raw = arr[start:stop]
    batch = preprocess_slices(raw, pixel_spacing, size=info.size, window=info.window,
                              spacing_mm=info.spacing_mm, channels=info.channels)
    bad_input = np.empty(0, np.int64)
    if raw.dtype.kind == "f":  # integer pixels window to finite values
        bad_input = start + np.flatnonzero(~np.isfinite(batch).reshape(batch.shape[0], -1).all(axis=1))
    return batch, bad_input, raw.shape[1:]
