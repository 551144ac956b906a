"""Images and label images as OME-Zarr groups: create, write whole, read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from .chunks import _compressors, choose_chunks, store_aligned
from .ngff import (
    ARRAY_LAYOUT, LABELS_NAME, add_label_name, default_affine, image_attrs, image_label_attrs, read_meta,
)
from .pyramid import build_pyramid


def create_image(
    path: str | Path,
    shape: tuple[int, int, int],
    dtype: Any,
    spacing: tuple[float, float, float],
    affine: np.ndarray | None = None,
    *,
    chunks: tuple[int, int, int] | None = None,
    attrs: dict[str, Any] | None = None,
    name: str = "image",
) -> zarr.Array:
    """Create an OME-Zarr image group and return its empty level-0 array for streaming writes.

    Call :func:`build_pyramid` after filling it.
    """
    dtype = np.dtype(dtype)
    affine = default_affine(spacing) if affine is None else np.asarray(affine, dtype=float)
    chunks = chunks or choose_chunks(shape, dtype.itemsize)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, compressors=_compressors(dtype),
                             fill_value=0, **ARRAY_LAYOUT)
    group.attrs.update(image_attrs(name, spacing, affine, attrs))
    return arr


def write_image(
    path: str | Path,
    data: np.ndarray | da.Array,
    spacing: tuple[float, float, float],
    affine: np.ndarray | None = None,
    *,
    chunks: tuple[int, int, int] | None = None,
    levels: int = 3,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write a whole volume (NumPy or Dask) as an OME-Zarr image with ``levels`` pyramid levels."""
    arr = create_image(path, data.shape, data.dtype, spacing, affine, chunks=chunks, attrs=attrs)
    store_aligned(data, arr)
    build_pyramid(path, levels)
    return Path(path)


def read_image(path: str | Path, level: int = 0) -> da.Array:
    """The image at pyramid ``level`` as a Dask array over its Zarr chunks."""
    return da.from_zarr(zarr.open_array(str(Path(path) / str(level)), mode="r"))


def write_labels(
    image_path: str | Path,
    labels: np.ndarray | da.Array,
    names: dict[int, str],
    *,
    name: str = LABELS_NAME,
    colors: dict[int, tuple[int, int, int, int]] | None = None,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write a label image under ``image.zarr/labels/<name>`` with as many levels as the image."""
    image_path = Path(image_path)
    meta = read_meta(image_path)
    if tuple(labels.shape) != tuple(meta.shape):
        raise ValueError(f"{image_path}: labels of shape {labels.shape} do not match image shape {meta.shape}")
    dtype = np.dtype(labels.dtype) if np.dtype(labels.dtype).kind in "iu" else np.dtype("uint16")
    arr = create_labels(image_path, dtype, names, name=name, colors=colors, attrs=attrs)
    store_aligned(labels.astype(dtype), arr)
    return finish_labels(image_path, name)


def create_labels(
    image_path: str | Path,
    dtype: Any,
    names: dict[int, str],
    *,
    name: str = LABELS_NAME,
    colors: dict[int, tuple[int, int, int, int]] | None = None,
    attrs: dict[str, Any] | None = None,
) -> zarr.Array:
    """The empty level 0 of label image ``image.zarr/labels/<name>`` (the image's shape and
    chunks), for writers that fill it block by block (:func:`write_block`); then call
    :func:`finish_labels`. :func:`write_labels` does both around one array."""
    image_path = Path(image_path)
    meta = read_meta(image_path)
    add_label_name(image_path, name)
    label_path = image_path / "labels" / name
    arr = create_image(label_path, meta.shape, np.dtype(dtype), meta.spacing, meta.affine,
                       chunks=zarr.open_array(str(image_path / "0"), mode="r").chunks, attrs=attrs, name=name)
    group = zarr.open_group(str(label_path), mode="r+")
    group.attrs["ome"] = {**dict(group.attrs["ome"]), "image-label": image_label_attrs(names, colors)}
    return arr


def finish_labels(image_path: str | Path, name: str = LABELS_NAME) -> Path:
    """Build the pyramid of a label image whose level 0 is written; returns its folder."""
    image_path = Path(image_path)
    label_path = image_path / "labels" / name
    build_pyramid(label_path, read_meta(image_path).levels, labels=True)
    return label_path


def read_labels(image_path: str | Path, name: str = LABELS_NAME, level: int = 0) -> da.Array:
    return read_image(Path(image_path) / "labels" / name, level)
