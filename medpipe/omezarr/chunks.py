"""Chunk shapes, codecs and the fast chunk writer: whole Zarr chunks encoded with Blosc in the
calling thread and written as the chunk files the Zarr v3 spec names (:func:`write_block`).
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from zarr.codecs import BloscCodec


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


def chunk_bytes(path: str | Path, level: int = 0) -> int:
    """Uncompressed bytes of one chunk of a level (for checks on the >= 1 MB rule)."""
    arr = zarr.open_array(str(Path(path) / str(level)), mode="r")
    return math.prod(arr.chunks) * arr.dtype.itemsize


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
