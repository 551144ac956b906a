"""Checks of what a file claims, made before anything is allocated from it or trusted.

A header can claim any Rows x Columns x frames; a decoder allocates what the header claims. So
every claim is checked, by arithmetic on header facts already parsed (no extra reads), against
the pixel data the file really holds and against ``ingest.max_series_voxels``. Rescale values
are checked for being finite numbers whose products stay finite in float32.

>>> pixel_claim_problem(65535, 65535, 1, 1, 16, "MONOCHROME2", 1200, False, 10**9)
'header claims 65535 x 65535 x 1 x 16-bit = 8.0 GiB but the pixel data holds 1.2 KiB'
>>> pixel_claim_problem(512, 512, 1, 1, 16, "MONOCHROME2", 524288, False, 10**9) is None
True
>>> rescale_problem("abc", "RescaleSlope", 16)
"RescaleSlope 'abc' is not a number"
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..config import IngestConfig
from .header import PixelElement

MAX_VOXELS: int = IngestConfig.model_fields["max_series_voxels"].default  # the default bound
# A frame may hold at most this share of ingest.max_series_voxels: 62.5 M voxels at the default
# (7900 x 7900), several times the largest mammogram or radiograph; it bounds a slab task's memory.
FRAME_SHARE = 16
# Compressed pixel data: a decoder allocates the claimed size up front. Real images compress a
# few times (lossless) to some tens of times (lossy); a claim beyond this ratio to the bytes
# present is a lie, unless it is small anyway (blank frames compress very well).
MAX_RATIO = 1000
SMALL_DECODED = 64 * 2**20
_F32_MAX = float(np.finfo(np.float32).max)


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units with one decimal.

    >>> human_bytes(512), human_bytes(1229), human_bytes(8 * 2**30)
    ('512 B', '1.2 KiB', '8.0 GiB')
    """
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def expected_bytes(rows: int, columns: int, frames: int, samples: int, bits: int, photometric: str) -> int:
    """Bytes of native pixel data the header implies, computed as pydicom does (1-bit packed,
    YBR_FULL_422 subsampled)."""
    n = rows * columns * frames * samples
    n = n // 8 + (n % 8 > 0) if bits == 1 else n * (bits // 8)
    return n // 3 * 2 if photometric == "YBR_FULL_422" else n


def pixel_claim_problem(rows: int, columns: int, frames: int, samples: int, bits: int, photometric: str,
                        nbytes: int | None, encapsulated: bool, max_series_voxels: int) -> str | None:
    """Why the pixel claims of a header cannot be trusted, or None.

    Parameters
    ----------
    rows, columns, frames, samples, bits : int
        Rows, Columns, NumberOfFrames, SamplesPerPixel, BitsAllocated as the header says
        (``bits`` 0 when absent: then only the voxel bounds apply).
    photometric : str
        PhotometricInterpretation.
    nbytes : int or None
        Native pixel data: its declared length. Encapsulated: the bytes the file holds after the
        element's header (an upper bound of the compressed data). None: unknown.
    encapsulated : bool
        Compressed (encapsulated) pixel data.
    max_series_voxels : int
        ``ingest.max_series_voxels``: a file may claim as many, a frame ``1/FRAME_SHARE`` of it.

    Returns
    -------
    str or None
        The reason, naming the claim and what contradicts it.
    """
    if frames < 1 or samples < 1:
        return f"header claims {frames} frame(s) of {samples} sample(s) per pixel"
    claim = f"{rows} x {columns} x {frames}" + (f" x {samples} samples" if samples != 1 else "") + \
        (f" x {bits}-bit" if bits > 0 else "")
    size = expected_bytes(rows, columns, frames, samples, bits, photometric) if bits > 0 else None
    if size is not None and nbytes is not None and not encapsulated and size > nbytes:
        return f"header claims {claim} = {human_bytes(size)} but the pixel data holds {human_bytes(nbytes)}"
    voxels = rows * columns * frames * samples
    if voxels > max_series_voxels:
        return f"header claims {claim} = {voxels:,} voxels, more than ingest.max_series_voxels={max_series_voxels:,}"
    frame_cap = max(1, max_series_voxels // FRAME_SHARE)
    if rows * columns * samples > frame_cap:
        return (f"header claims {claim}: {rows * columns * samples:,} voxels a frame, more than "
                f"ingest.max_series_voxels/{FRAME_SHARE}={frame_cap:,}")
    if encapsulated and size is not None and nbytes is not None and size > max(SMALL_DECODED, MAX_RATIO * nbytes):
        return (f"header claims {claim} = {human_bytes(size)} of compressed pixel data in {human_bytes(nbytes)} "
                f"(more than {MAX_RATIO}:1; a decoder would allocate the claim)")
    return None


def header_claim_problem(ds: Mapping[str, Any], pixels: PixelElement, max_series_voxels: int) -> str | None:
    """:func:`pixel_claim_problem` for a header (a pydicom Dataset, or the fast reader's dict)
    and its :class:`~.header.PixelElement` facts; also the element's own problem (truncation)."""
    if pixels.problem:
        return pixels.problem
    return pixel_claim_problem(
        _count(ds.get("Rows"), 0), _count(ds.get("Columns"), 0), _count(ds.get("NumberOfFrames"), 1),
        _count(ds.get("SamplesPerPixel"), 1), _count(ds.get("BitsAllocated"), 0),
        str(ds.get("PhotometricInterpretation", "") or ""), pixels.nbytes, pixels.encapsulated, max_series_voxels)


def _count(value: Any, default: int) -> int:
    """An integer header value; ``default`` when absent, blank or not a number (as the scan reads them)."""
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def rescale_number(value: Any, default: float) -> tuple[float, str | None]:
    """A rescale value as a float, and why it is not a finite number (or None); ``default``
    when absent or blank. Lists (several values) use their first, as pydicom's rescale does."""
    if value is None or isinstance(value, str) and not value.strip():
        return default, None
    if isinstance(value, list | tuple):
        if not value:
            return default, None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan, f"{value!r} is not a number"
    if not math.isfinite(number):
        return number, f"{str(value).strip()!r} is not finite"
    return number, None


def rescale_problem(value: Any, keyword: str, bits_stored: int, default: float = 1.0) -> str | None:
    """Why a RescaleSlope/RescaleIntercept value makes non-finite voxels, or None.

    A finite value can still overflow float32, the type physical values are computed in:
    ``|value| * 2**bits_stored`` must stay below float32's largest number (``bits_stored=0``
    for an intercept).

    >>> rescale_problem("1e400", "RescaleSlope", 16), rescale_problem(1e36, "RescaleSlope", 16)
    ("RescaleSlope '1e400' is not finite", 'RescaleSlope 1e+36 makes voxels beyond float32 (non-finite)')
    """
    number, problem = rescale_number(value, default)
    if problem:
        return f"{keyword} {problem}"
    if abs(number) * 2.0 ** bits_stored > _F32_MAX:
        return f"{keyword} {number:g} makes voxels beyond float32 (non-finite)"
    return None
