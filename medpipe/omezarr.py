"""OME-Zarr 0.5 (Zarr v3) images and label images.

Layout of ``image.zarr`` (see docs/output-contract.md)::

    image.zarr/                 group; attributes.ome.multiscales (axes z, y, x in millimetre)
      0/ 1/ 2/                  pyramid levels, level 0 at full resolution
      labels/segmentation/      label image with the same number of levels

Besides OME's scale and translation, ``attributes.medpipe.affine_lps`` holds the full 4x4
matrix from voxel indices ``(x, y, z, 1)`` (column, row, slice: the reverse of the array's
axis order) to patient LPS millimetres, because OME-Zarr cannot express rotations.

>>> import numpy as np, tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "image.zarr"
>>> _ = write_image(p, np.zeros((4, 8, 8), "float32"), spacing=(2.0, 1.0, 1.0), levels=1)
>>> read_meta(p).spacing
(2.0, 1.0, 1.0)
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from zarr.codecs import BloscCodec

OME_VERSION = "0.5"
AXES = [{"name": n, "type": "space", "unit": "millimeter"} for n in ("z", "y", "x")]
# Arrays carry the axes' names (OME-Zarr 0.5 requires dimension_names to match them) and keep
# their chunk files side by side as "c.z.y.x": nested "c/z/y/x" made new folders for almost
# every chunk, about 1-2 ms each on ext4 (RFC-2 lets OME-Zarr 0.5 use any chunk key encoding).
ARRAY_LAYOUT = {"dimension_names": ("z", "y", "x"), "chunk_key_encoding": {"name": "default", "separator": "."}}
LABELS_NAME = "segmentation"


def _compressors(dtype: Any = None) -> list[BloscCodec]:
    """Blosc, chosen per dtype on CT (figures in docs/benchmarks.md):

    * integers of 1-2 bytes (CT in HU, labels): lz4 level 5, bit-shuffled. On a 64x512x512
      phantom: ratio 2.42 against 2.47 for zstd level 1, but 3.4x faster to encode and 5x
      faster to decode, which every later stage does;
    * anything else (float32 filtered images): zstd level 1, byte-shuffled: ratio 5.6 against
      3.5 for lz4, which there costs more disk than it saves time.
    """
    dt = np.dtype(dtype) if dtype is not None else None
    if dt is not None and dt.kind in "iu" and dt.itemsize <= 2:
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
    return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")]


@dataclass(frozen=True)
class ImageMeta:
    """What a reader needs to place an image: shape, spacing, affine and medpipe's attributes."""

    shape: tuple[int, ...]
    dtype: str
    spacing: tuple[float, float, float]
    affine: np.ndarray
    levels: int
    attrs: dict[str, Any] = field(default_factory=dict)


def choose_chunks(shape: tuple[int, ...], itemsize: int, target_mb: float = 4.0) -> tuple[int, int, int]:
    """Chunk shape near ``target_mb`` MiB: whole rows and columns up to 512, then depth in z.

    CT and MR slices (512x512 and smaller) are then whole in every chunk: a chunk is a
    contiguous stack of slices of the ingest slab (compressed without a copy), and reading a
    slice touches one chunk. Larger images (radiographs, mammograms) are tiled at 512.

    >>> choose_chunks((300, 512, 512), 4, 4.0)
    (4, 512, 512)
    >>> choose_chunks((300, 3000, 2000), 2, 4.0)
    (8, 512, 512)
    >>> choose_chunks((1, 64, 64), 4)
    (1, 64, 64)
    """
    z, y, x = shape
    cy, cx = min(y, 512), min(x, 512)
    depth = max(1, int(target_mb * 2**20 // (cy * cx * itemsize)))
    return (min(z, depth), cy, cx)


def default_affine(spacing: tuple[float, float, float], origin: tuple[float, float, float] = (0, 0, 0)) -> np.ndarray:
    """Axis-aligned affine from (z, y, x) spacing and an (x, y, z) LPS origin."""
    aff = np.eye(4)
    aff[0, 0], aff[1, 1], aff[2, 2] = spacing[2], spacing[1], spacing[0]
    aff[:3, 3] = origin
    return aff


def _translation(affine: np.ndarray, spacing: tuple[float, float, float]) -> list[float]:
    """Origin expressed along the volume's own z, y, x axes (exact when axis-aligned)."""
    directions = affine[:3, :3] / np.asarray([spacing[2], spacing[1], spacing[0]])
    t_xyz = directions.T @ affine[:3, 3]
    return [float(t_xyz[2]), float(t_xyz[1]), float(t_xyz[0])]


def _multiscales(name: str, scales: list[list[float]], translations: list[list[float]]) -> list[dict[str, Any]]:
    datasets = [
        {
            "path": str(i),
            "coordinateTransformations": [
                {"type": "scale", "scale": s},
                {"type": "translation", "translation": t},
            ],
        }
        for i, (s, t) in enumerate(zip(scales, translations))
    ]
    return [{"name": name, "axes": AXES, "datasets": datasets}]


def _factors(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Downsampling factors for the next level: 2 along axes long enough to halve."""
    return tuple(2 if n >= 32 else 1 for n in shape)  # type: ignore[return-value]


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
    group.attrs.update(
        {
            "ome": {
                "version": OME_VERSION,
                "multiscales": _multiscales(name, [list(map(float, spacing))], [_translation(affine, spacing)]),
            },
            "medpipe": {"affine_lps": affine.tolist(), "spacing_zyx": list(map(float, spacing)), **(attrs or {})},
        }
    )
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


def store_aligned(data: np.ndarray | da.Array, target: zarr.Array) -> None:
    """Store ``data`` into ``target`` with one writer per Zarr chunk (no partial-chunk races),
    each encoding its chunks itself (:func:`write_block`)."""
    if isinstance(data, np.ndarray):
        write_block(target, (0,) * data.ndim, data)
        return
    da.store(data.rechunk(target.chunks), _BlockWriter(target), lock=False)


class _BlockWriter:
    """``da.store`` target that hands each block to :func:`write_block` (picklable for workers)."""

    def __init__(self, array: zarr.Array):
        self.array = array
        self.shape, self.dtype = array.shape, array.dtype

    def __setitem__(self, region: tuple[slice, ...], block: np.ndarray) -> None:
        write_block(self.array, tuple(s.start or 0 for s in region), np.asarray(block))


def pyramid_factors(shape: tuple[int, ...], levels: int) -> list[tuple[int, int, int]]:
    """Downsampling factors from each level to the next, for at most ``levels`` levels in all.

    >>> pyramid_factors((40, 512, 512), 3)
    [(2, 2, 2), (1, 2, 2)]
    """
    out: list[tuple[int, int, int]] = []
    shape = tuple(shape)
    for _ in range(1, levels):
        f = _factors(shape)
        if f == (1, 1, 1):
            break
        out.append(f)
        shape = tuple(n // k for n, k in zip(shape, f))
    return out


def downsample(block: np.ndarray, factors: tuple[int, ...], *, labels: bool = False) -> np.ndarray:
    """One pyramid step of a NumPy block: mean of ``factors`` boxes (rounded for integer dtypes),
    or every ``factors``-th voxel for labels. Trailing voxels that fill no whole box are dropped.

    >>> downsample(np.arange(8, dtype="int16").reshape(2, 2, 2), (2, 2, 2))
    array([[[4]]], dtype=int16)
    """
    if labels:
        sub = block[tuple(slice(None, None, k) for k in factors)]
        return np.ascontiguousarray(sub[tuple(slice(0, n // k) for n, k in zip(block.shape, factors))])
    if block.ndim == 3 and block.dtype.kind in "iu" and block.dtype.itemsize <= 2:
        return _downsample_small_int(block, factors)
    work = np.float32 if block.dtype.itemsize <= 2 or block.dtype == np.float32 else np.float64
    total: np.ndarray | None = None
    for offset in np.ndindex(*factors):  # sum of strided views: several times faster than reshape+mean
        view = block[tuple(slice(o, (n // k) * k, k) for o, n, k in zip(offset, block.shape, factors))]
        total = view.astype(work) if total is None else np.add(total, view, out=total)
    mean = np.multiply(total, work(1.0 / math.prod(factors)), out=total)
    if block.dtype.kind in "iu":
        mean = np.rint(mean, out=mean)
    return mean.astype(block.dtype, copy=False)


def _downsample_small_int(block: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """:func:`downsample` of 8/16-bit integers, one output plane at a time: its input planes
    are added as whole contiguous planes in int32, then rows, then columns, all in cache
    (1.0 ms against 1.6 ms for an 8x512x512 int16 slab). Integer sums are exact and the
    scaling is the same float32 operation, so the means equal the general path's."""
    kz, ky, kx = factors
    nz, ny, nx = (n // k for n, k in zip(block.shape, factors))
    out = np.empty((nz, ny, nx), block.dtype)
    planes = np.empty(block.shape[1:], np.int32)
    rows = np.empty((ny, block.shape[2]), np.int32)
    boxes = np.empty((ny, nx), np.int32)
    mean = np.empty((ny, nx), np.float32)
    scale = np.float32(1.0 / (kz * ky * kx))
    for z in range(nz):
        _sum_into(planes, [block[z * kz + o] for o in range(kz)])
        _sum_into(rows, [planes[o : ny * ky : ky] for o in range(ky)])
        _sum_into(boxes, [rows[:, o : nx * kx : kx] for o in range(kx)])
        np.multiply(boxes, scale, out=mean)
        out[z] = np.rint(mean, out=mean)
    return out


def _sum_into(total: np.ndarray, parts: list[np.ndarray]) -> None:
    """``total[...] = sum(parts)`` in ``total``'s dtype, without temporaries."""
    if len(parts) == 1:
        np.copyto(total, parts[0])
        return
    np.add(parts[0], parts[1], out=total, dtype=total.dtype)
    for part in parts[2:]:
        np.add(total, part, out=total)


def write_block(target: zarr.Array, start: tuple[int, ...], block: np.ndarray) -> None:
    """``target[start : start + block.shape] = block``, encoding whole chunks in this thread.

    For a local store with medpipe's codecs (little-endian bytes, then Blosc) and a block that
    covers whole chunks (or runs to the array's end), each chunk is compressed with NumPy's
    view of the block and written as the chunk file the Zarr v3 spec names, in the calling
    thread (Blosc releases the GIL). Zarr's own path funnels every chunk through its event loop
    and copies each one several times; on the ingest benchmark this halves the time of writing
    level 0 on 2 threads. Anything else goes through Zarr's ``__setitem__``.
    """
    region = tuple(slice(s, s + n) for s, n in zip(start, block.shape))
    codec = _direct_codec(target)
    chunks = target.chunks
    aligned = all(s % c == 0 and (n % c == 0 or s + n == size)
                  for s, n, c, size in zip(start, block.shape, chunks, target.shape))
    if codec is None or not aligned or block.dtype != target.dtype:
        target[region] = block
        return
    root = Path(target.store_path.store.root) / target.store_path.path
    fill = target.fill_value
    for index in np.ndindex(*(math.ceil(n / c) for n, c in zip(block.shape, chunks))):
        part = block[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))]
        key = target.metadata.encode_chunk_key(tuple(s // c + i for s, c, i in zip(start, chunks, index)))
        path = root / key
        if part.flat[0] == fill and not np.any(part != fill):  # as Zarr: no file for a fill-only chunk
            path.unlink(missing_ok=True)
            continue
        if part.shape != chunks:  # edge chunks are stored whole, padded with the fill value
            padded = np.full(chunks, fill, dtype=block.dtype)
            padded[tuple(slice(0, n) for n in part.shape)] = part
            part = padded
        data = codec.encode(np.ascontiguousarray(part))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
        except FileNotFoundError:  # the chunk's folder is new: only then make it
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        os.replace(tmp, path)


def _direct_codec(target: zarr.Array) -> Any:
    """The numcodecs Blosc that Zarr would apply to ``target``'s chunks, or None where
    :func:`write_block` must leave the writing to Zarr (other store, codecs or layout)."""
    from zarr.codecs import BytesCodec
    from zarr.storage import LocalStore

    meta = target.metadata
    codecs = getattr(meta, "codecs", ())
    if (not isinstance(target.store_path.store, LocalStore) or len(codecs) != 2
            or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec)
            or getattr(codecs[0].endian, "value", None) != "little" or target.dtype.byteorder == ">"
            or getattr(meta, "chunk_grid", None).__class__.__name__ != "RegularChunkGrid"):
        return None
    return numcodecs_blosc(codecs[1])


def numcodecs_blosc(blosc: BloscCodec, dtype: Any = None) -> Any:
    """The numcodecs ``Blosc`` with the settings of Zarr's ``BloscCodec`` (what Zarr runs).

    An array's codec knows its item size; give ``dtype`` for one not yet bound to an array
    (its ``typesize`` is 1 until then, which makes shuffling useless for int16).
    """
    from numcodecs import Blosc

    shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
    typesize = np.dtype(dtype).itemsize if dtype is not None else blosc.typesize
    return Blosc(cname=blosc.cname.value, clevel=blosc.clevel, shuffle=shuffle[blosc.shuffle.value],
                 blocksize=blosc.blocksize, typesize=typesize)


def create_levels(
    path: str | Path, levels: int, *, z_chunks: list[int] | None = None, labels: bool = False,
) -> list[zarr.Array]:
    """Create empty pyramid levels 1.. of an image whose level 0 exists; update its multiscales.

    Returns every level's array, level 0 first. ``z_chunks`` gives each new level's chunk depth
    (default: level 0's), e.g. so that each writer of a level-0 slab owns whole chunks below it.
    """
    group = zarr.open_group(str(path), mode="r+")
    ome = dict(group.attrs["ome"])
    ms = ome["multiscales"][0]
    base = ms["datasets"][0]["coordinateTransformations"]
    scale = list(base[0]["scale"])
    trans = list(base[1]["translation"])
    scales, translations = [scale], [trans]
    level0 = group["0"]
    arrays = [level0]
    shape = tuple(level0.shape)
    for level, f in enumerate(pyramid_factors(shape, levels), start=1):
        shape = tuple(n // k for n, k in zip(shape, f))
        trans = [t + (k - 1) * s / 2 if not labels else t for t, k, s in zip(trans, f, scale)]
        scale = [s * k for s, k in zip(scale, f)]
        depth = z_chunks[level - 1] if z_chunks else level0.chunks[0]
        chunks = tuple(min(c, n) for c, n in zip((depth, *level0.chunks[1:]), shape))
        arrays.append(group.create_array(
            str(level), shape=shape, chunks=chunks, dtype=level0.dtype,
            compressors=_compressors(level0.dtype), fill_value=0, overwrite=True, **ARRAY_LAYOUT,
        ))
        scales.append(scale)
        translations.append(trans)
    ms = {**ms, "datasets": _multiscales(ms.get("name", "image"), scales, translations)[0]["datasets"]}
    ome["multiscales"] = [ms]
    group.attrs["ome"] = ome
    return arrays


def build_pyramid(path: str | Path, levels: int, *, labels: bool = False) -> None:
    """Write levels 1..levels-1 by 2x downsampling of level 0 and update the multiscales metadata.

    Images are averaged (:func:`downsample`); label images take every second voxel so that label
    values stay valid.
    """
    arrays = create_levels(path, levels, labels=labels)
    current = da.from_zarr(arrays[0])
    for arr in arrays[1:]:
        f = tuple(a // b for a, b in zip(current.shape, arr.shape))
        trimmed = current[tuple(slice(0, n * k) for n, k in zip(arr.shape, f))]
        # whole boxes per block, so each block downsamples on its own
        trimmed = trimmed.rechunk(tuple(max(k, c // k * k) for c, k in zip(trimmed.chunksize, f)))
        down = trimmed.map_blocks(downsample, f, labels=labels, dtype=arr.dtype,
                                  chunks=tuple(tuple(c // k for c in cs) for cs, k in zip(trimmed.chunks, f)))
        store_aligned(down, arr)
        current = da.from_zarr(arr)


def read_image(path: str | Path, level: int = 0) -> da.Array:
    """The image at pyramid ``level`` as a Dask array over its Zarr chunks."""
    return da.from_zarr(zarr.open_array(str(Path(path) / str(level)), mode="r"))


def read_meta(path: str | Path) -> ImageMeta:
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    mp = dict(attrs.get("medpipe", {}))
    level0 = group["0"]
    spacing = tuple(float(s) for s in mp.get("spacing_zyx") or
                    attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"])
    affine = np.asarray(mp.get("affine_lps", default_affine(spacing)), dtype=float)
    return ImageMeta(
        shape=tuple(level0.shape), dtype=str(level0.dtype), spacing=spacing,  # type: ignore[arg-type]
        affine=affine, levels=len(attrs["ome"]["multiscales"][0]["datasets"]), attrs=mp,
    )


def update_attrs(path: str | Path, **values: Any) -> None:
    """Merge ``values`` into ``attributes.medpipe`` of an image or label group."""
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["medpipe"] = {**dict(group.attrs.get("medpipe", {})), **values}


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
    root = zarr.open_group(str(image_path), mode="r+")
    labels_group = root.require_group("labels")
    existing = list(dict(labels_group.attrs).get("ome", {}).get("labels", []))
    labels_group.attrs["ome"] = {"version": OME_VERSION, "labels": sorted(set(existing) | {name})}
    dtype = np.dtype(labels.dtype) if np.dtype(labels.dtype).kind in "iu" else np.dtype("uint16")
    label_path = image_path / "labels" / name
    arr = create_image(label_path, meta.shape, dtype, meta.spacing, meta.affine,
                       chunks=root["0"].chunks, attrs=attrs, name=name)
    store_aligned(labels.astype(dtype), arr)
    group = zarr.open_group(str(label_path), mode="r+")
    colors = colors or {v: _color(v) for v in names}
    group.attrs["ome"] = {
        **dict(group.attrs["ome"]),
        "image-label": {
            "version": OME_VERSION,
            "colors": [{"label-value": int(v), "rgba": list(c)} for v, c in sorted(colors.items())],
            "properties": [{"label-value": int(v), "name": n} for v, n in sorted(names.items())],
            "source": {"image": "../../"},
        },
    }
    build_pyramid(label_path, meta.levels, labels=True)
    return label_path


def read_labels(image_path: str | Path, name: str = LABELS_NAME, level: int = 0) -> da.Array:
    return read_image(Path(image_path) / "labels" / name, level)


def label_names(image_path: str | Path, name: str = LABELS_NAME) -> dict[int, str]:
    group = zarr.open_group(str(Path(image_path) / "labels" / name), mode="r")
    props = group.attrs["ome"]["image-label"]["properties"]
    return {int(p["label-value"]): p["name"] for p in props}


_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
]


def _color(value: int) -> tuple[int, int, int, int]:
    r, g, b = _PALETTE[(int(value) - 1) % len(_PALETTE)]
    return (r, g, b, 255 if value else 0)


def chunk_bytes(path: str | Path, level: int = 0) -> int:
    """Uncompressed bytes of one chunk of a level (for checks on the >= 1 MB rule)."""
    arr = zarr.open_array(str(Path(path) / str(level)), mode="r")
    return math.prod(arr.chunks) * arr.dtype.itemsize
