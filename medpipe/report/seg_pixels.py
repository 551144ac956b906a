"""The pixel data of a BINARY DICOM SEG packed slab by slab from the Zarr label image.

highdicom's ``Segmentation`` wants the whole label map as one array and packs its frames from
it, so the volume is held once more beside the packed frames. Here the label image is read a
slab of chunks at a time and each (slice, segment) frame that holds the segment is packed at
once into a temporary file (:func:`pack_label_frames`); highdicom is given a stand-in of the same shape that costs one
row per slice (:func:`presence_stand_in`), from which it builds every attribute but the pixel
data, with the same frames kept and in the same order as for the label map itself; the packed
frames are then joined in that order (:func:`frame_order`, :func:`join_frames`). Tests compare
the result with highdicom's own SEG of the same label map.

Frames are packed on their own, so this holds only where a frame's pixels fill whole bytes
(Rows x Columns a multiple of 8, as highdicom then packs them too); callers use highdicom's own
path otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels.utils import pack_bits

from .. import omezarr

__all__ = ["LabelFrames", "frame_order", "join_frames", "label_slabs", "pack_label_frames", "presence_stand_in"]


def label_slabs(image: Path) -> Iterator[tuple[int, np.ndarray]]:
    """``(z0, slab)`` of the label image of ``image`` (an OME-Zarr folder), one slab of chunks at
    a time, read in this thread (never as tasks of the run's cluster)."""
    lazy = omezarr.read_labels(image)
    z0 = 0
    for depth in lazy.chunks[0]:
        yield z0, np.asarray(lazy[z0:z0 + depth].compute(scheduler="sync"))
        z0 += depth


@dataclass
class LabelFrames:
    """The packed frames of a label image, written one after the other into ``file``:
    ``offsets[(slice, segment)]`` for each segment present in a slice, ``present[slice]`` the
    segment numbers present there (ascending), and the bytes of one frame (``frame_bytes``)."""

    file: BinaryIO
    offsets: dict[tuple[int, int], int]
    present: list[list[int]]
    frame_bytes: int


def pack_label_frames(slabs: Iterator[tuple[int, np.ndarray]], lut: np.ndarray, n_slices: int,
                      flips: tuple[bool, bool], file: BinaryIO) -> LabelFrames:
    """Pack each slice's binary frame of each segment it holds into ``file`` (the frames are
    kept on disk, not in memory, until they are joined in the SEG's order).

    Parameters
    ----------
    slabs : iterator of (int, ndarray)
        The label image slab by slab (:func:`label_slabs`), each ``(z0, labels[z0:z0 + n])``.
    lut : ndarray
        Label value to segment number (0: none); values past its end are no segment.
    n_slices : int
        Slices of the label image.
    flips : (bool, bool)
        Whether the source's rows / columns run opposite to the volume's.
    file : binary file
        Empty, open for writing and reading (a temporary file).

    Examples
    --------
    >>> import io
    >>> slab = np.array([[[0, 1, 1, 0, 0, 0, 0, 2]]], np.uint8)
    >>> got = pack_label_frames(iter([(0, slab)]), np.array([0, 1, 2], np.uint8), 1, (False, False), io.BytesIO())
    >>> got.present, got.offsets, got.file.getvalue().hex()
    ([[1, 2]], {(0, 1): 0, (0, 2): 1}, '0680')
    """
    offsets: dict[tuple[int, int], int] = {}
    present: list[list[int]] = [[] for _ in range(n_slices)]
    frame_bytes = end = 0
    for z0, slab in slabs:
        top = int(slab.max(initial=0))
        if top >= len(lut):  # values without a name: background
            lut = np.concatenate([lut, np.zeros(top + 1 - len(lut), lut.dtype)])
        for dz, plane in enumerate(slab):
            numbers = lut[plane]  # one slice's temporary
            if flips[0]:
                numbers = numbers[::-1, :]
            if flips[1]:
                numbers = numbers[:, ::-1]
            frame_bytes = numbers.size // 8
            counts = np.bincount(numbers.ravel(), minlength=1)
            for s in np.flatnonzero(counts[1:]) + 1:
                file.write(pack_bits(numbers == s, pad=False))
                offsets[(z0 + dz, int(s))] = end
                end += frame_bytes
                present[z0 + dz].append(int(s))
    return LabelFrames(file, offsets, present, frame_bytes)


def presence_stand_in(present: list[list[int]], slices: list[int | None], shape: tuple[int, int]) -> np.ndarray | None:
    """A label map of one frame per source frame (``slices[i]``: its Zarr slice or None) that
    holds the same segments in each frame as the label image, costing one row per frame.

    Each frame repeats one row holding the frame's segment numbers; None where a frame has more
    segments than columns (then the stand-in cannot say which it holds).
    """
    rows, columns = shape
    buffer = np.zeros((len(slices), columns), np.uint16 if any(s > 255 for p in present for s in p) else np.uint8)
    for i, k in enumerate(slices):
        numbers = present[k] if k is not None else []
        if len(numbers) > columns:
            return None
        buffer[i, :len(numbers)] = numbers
    return np.lib.stride_tricks.as_strided(buffer, shape=(len(slices), rows, columns),
                                           strides=(buffer.strides[0], 0, buffer.strides[1]), writeable=False)


def frame_order(seg: pydicom.Dataset, images: list[pydicom.Dataset], slices: list[int | None]) -> list[tuple[int | None, int]] | None:
    """``(slice, segment)`` of each frame of ``seg`` in order, from the source frame each frame
    is derived from; None where a frame names no single source frame of ``images``."""
    multi = len(images) == 1 and int(getattr(images[0], "NumberOfFrames", 1) or 1) > 1
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(images)}
    order: list[tuple[int | None, int]] = []
    for item in seg.get("PerFrameFunctionalGroupsSequence") or []:
        derivation = item.get("DerivationImageSequence") or []
        sources = derivation[0].get("SourceImageSequence") or [] if len(derivation) == 1 else []
        identification = item.get("SegmentIdentificationSequence") or []
        if len(sources) != 1 or len(identification) != 1:
            return None
        i = index.get(str(sources[0].ReferencedSOPInstanceUID))
        if i is None:
            return None
        if multi:
            i = int(sources[0].get("ReferencedFrameNumber") or 0) - 1
        if not 0 <= i < len(slices):
            return None
        order.append((slices[i], int(identification[0].ReferencedSegmentNumber)))
    return order


def join_frames(packed: LabelFrames, order: list[tuple[int | None, int]], pixels: BinaryIO) -> BinaryIO:
    """``pixels`` (an empty temporary file) holding the SEG's pixel data, at its start: the
    packed frames in ``order``, an empty frame where a slice lacks the segment, padded to an
    even length as highdicom pads it. Frames are copied one at a time: the pixel data is never
    held in memory (pydicom writes it from the file, as a buffered value)."""
    f, size = packed.file, packed.frame_bytes
    f.flush()
    empty = bytes(size)
    for k, s in order:
        offset = packed.offsets.get((k, s)) if k is not None else None
        pixels.write(empty if offset is None else os.pread(f.fileno(), size, offset))
    if size * len(order) % 2:
        pixels.write(b"0")
    pixels.flush()
    pixels.seek(0)
    return pixels


def metadata_only_segmentation(**kwargs: object) -> pydicom.Dataset:
    """``highdicom.seg.Segmentation(**kwargs)`` with empty pixel data: every other attribute as
    highdicom makes it from ``pixel_array``, a stand-in of :func:`presence_stand_in`.

    highdicom keeps a frame where its (plane, segment) array has any pixel set and then packs
    it; here that array is one pixel (whether the stand-in's row holds the segment) and packs to
    nothing, so the frames kept are the label map's, at the cost of one pixel each.
    """
    import highdicom as hd

    seg = _no_pixels_class(hd)(**kwargs)
    seg.__class__ = hd.seg.Segmentation  # what it is once its pixel data is set
    return seg


_NO_PIXELS: dict[int, type] = {}


def _no_pixels_class(hd: object) -> type:
    """highdicom's Segmentation made to keep frames by a stand-in's first row and to encode them
    to nothing (made once). Tests compare its metadata with highdicom's own of the label map."""
    if not _NO_PIXELS:
        class _NoPixels(hd.seg.Segmentation):  # type: ignore[attr-defined,name-defined,misc]
            @staticmethod
            def _get_segment_pixel_array(pixel_array: np.ndarray, segment_number: int, **_: object) -> np.ndarray:
                return np.array([segment_number in pixel_array[0]], np.uint8)

            def _encode_pixels_native(self, planes: np.ndarray) -> bytes:
                return b""

        _NO_PIXELS[0] = _NoPixels
    return _NO_PIXELS[0]
