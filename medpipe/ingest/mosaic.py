"""Siemens MOSAIC images: one 2-D frame that tiles a volume's slices, unpacked into those slices.

Siemens MR (fMRI, DTI) stores a whole volume as one image: ``NumberOfImagesInMosaic`` slices
(in the private CSA image header, element (0029,xx10)) in ``ceil(sqrt(n))`` tiles per row and
per column, in slice order row by row. ImagePositionPatient is that of the whole montage; the
first slice's position is corrected by half the montage's extra size, and the slices follow
along the CSA's SliceNormalVector, ``SpacingBetweenSlices`` apart (else SliceThickness). nibabel
(``nibabel.nicom``) does the CSA parsing and the geometry (:class:`MosaicWrapper`, as dcm2niix
does); this module only checks what it says and turns it into medpipe's frames. Those are then
sorted along ImageOrientationPatient's normal like any series' slices: where the CSA normal points
the other way, the volume's slice axis is nibabel's reversed (the same voxels in patient space).

Only images whose ImageType says MOSAIC are looked at, and only one header per series is read
(while planning): other files cost nothing. An image that says MOSAIC but cannot be unpacked
(no CSA image header, one that cannot be parsed, no NumberOfImagesInMosaic, tiles that do not
divide the image, geometry that does not agree) is named with the reason and processed as
before, as a 2-D montage, with a warning.

Series of several mosaic files
------------------------------
Each file of a mosaic series is a whole volume: one time point (fMRI) or one diffusion
direction (DTI). medpipe writes one 3-D volume per study, so it unpacks the *first* file by
InstanceNumber (Siemens numbers a series' volumes in acquisition order: the first time point,
the b = 0 image of a DTI series), and says in a warning how many later volumes (files) were not
used. Stacking them would mix time points (or diffusion weightings) as if they were slices;
a 4-D series needs a 4-D tool (dcm2niix writes one NIfTI of all volumes).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pydicom

from .geometry import Frame
from .scan import Instance

MOSAIC = "MOSAIC"
NORMAL_TOL = 1e-5  # | |n_csa . n_iop| - 1 |, as nibabel checks it (with an assert)
SHOWN = 3  # unused files named in a warning, then a count


class MosaicError(Exception):
    """Why an image that says MOSAIC cannot be unpacked."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Mosaic:
    """How to unpack one mosaic file (JSON-safe as a dict: it travels in the plan)."""

    n_images: int  # NumberOfImagesInMosaic: slices in the volume
    tiles_per_row: int  # ceil(sqrt(n_images)) tiles per row and per column
    tile_rows: int
    tile_columns: int
    position: tuple[float, float, float]  # the first slice's ImagePositionPatient (corrected), LPS mm
    normal: tuple[float, float, float]  # slice direction: IOP's normal, signed as the CSA's SliceNormalVector
    slice_spacing: float  # SpacingBetweenSlices, else SliceThickness (mm)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Mosaic":
        vector = lambda key: tuple(float(v) for v in d[key])  # noqa: E731
        return cls(int(d["n_images"]), int(d["tiles_per_row"]), int(d["tile_rows"]), int(d["tile_columns"]),
                   vector("position"), vector("normal"), float(d["slice_spacing"]))  # type: ignore[arg-type]


def is_mosaic(image_type: tuple[str, ...]) -> bool:
    """Whether ImageType (upper case, as the scan keeps it) says MOSAIC: the only check ordinary files pay."""
    return MOSAIC in image_type


def _nibabel() -> tuple[Any, Any]:
    """nibabel's CSA reader and DICOM wrappers, imported when a mosaic is met (``nibabel.nicom``
    warns on import that its readers are experimental: we use its CSA parsing and mosaic geometry,
    which dcm2niix agrees with, and check what they give)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader, dicomwrappers
    return csareader, dicomwrappers


def read_mosaic(path: str) -> Mosaic:
    """The mosaic facts of the file at ``path`` (header only); :class:`MosaicError` says why not."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:
        raise MosaicError(f"unreadable DICOM header: {type(exc).__name__}: {exc}") from None
    return mosaic_of(ds)


def mosaic_of(ds: pydicom.Dataset) -> Mosaic:
    """The mosaic facts of a dataset (its header suffices), checked; :class:`MosaicError` says why not."""
    csareader, dicomwrappers = _nibabel()
    try:
        csa = csareader.get_csa_header(ds, "image")
    except Exception as exc:  # CSAReadError, struct.error on a truncated header, ...
        raise MosaicError("Siemens CSA image header (0029,xx10) cannot be parsed: "
                          f"{type(exc).__name__}: {exc}") from None
    if csa is None:
        raise MosaicError("no Siemens CSA image header (0029,xx10)")
    try:
        n = csareader.get_n_mosaic(csa)
    except (KeyError, TypeError, ValueError, IndexError):
        n = None
    if not isinstance(n, int | np.integer) or n < 1:
        raise MosaicError(f"CSA image header gives no NumberOfImagesInMosaic ({n!r})")
    n = int(n)
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        rows = columns = 0
    k = math.ceil(math.sqrt(n))
    if not rows or not columns or rows % k or columns % k:
        raise MosaicError(f"{rows} x {columns} image is not {k} x {k} tiles of whole pixels "
                          f"(NumberOfImagesInMosaic {n}, {k} tiles per row)")
    try:
        wrapper = dicomwrappers.MosaicWrapper(ds, csa, n)
        iop, position, sizes = wrapper.image_orient_patient, wrapper.image_position, wrapper.voxel_sizes
        if iop is None or position is None or sizes is None:
            raise MosaicError("no ImageOrientationPatient, ImagePositionPatient or PixelSpacing")
        csa_normal = csareader.get_slice_normal(csa)
        if csa_normal is not None:  # nibabel only asserts this: say it
            dot = float(np.dot(csa_normal, np.cross(iop[:, 0], iop[:, 1])))
            if not abs(abs(dot) - 1) <= NORMAL_TOL:
                raise MosaicError(f"CSA SliceNormalVector {list(map(float, csa_normal))} is not the normal of "
                                  f"ImageOrientationPatient (dot product {dot:.6f})")
        normal = wrapper.slice_normal
        wrapper.rotation_matrix  # noqa: B018 - raises when the orientation is not nearly orthogonal
    except MosaicError:
        raise
    except Exception as exc:  # a value nibabel cannot convert, a non-orthogonal orientation, ...
        raise MosaicError(f"mosaic geometry: {type(exc).__name__}: {exc}") from None
    spacing = float(sizes[2])
    values = [*position, *normal, spacing]
    if not all(np.isfinite(values)) or spacing <= 0:
        raise MosaicError(f"mosaic geometry not finite or slice spacing not positive ({spacing:g} mm)")
    return Mosaic(n, k, rows // k, columns // k, tuple(float(v) for v in position),  # type: ignore[arg-type]
                  tuple(float(v) for v in normal), spacing)  # type: ignore[arg-type]


def plan_mosaic(instances: list[Instance]) -> tuple[list[Instance], Mosaic | None, list[str]]:
    """What a series with MOSAIC images ingests: ``(instances, mosaic or None, warnings)``.

    Unpackable: the first mosaic file by InstanceNumber (then path) alone, its :class:`Mosaic`,
    and warnings saying so and naming the later volumes (files) not used (see the module's
    docstring). Not unpackable: the instances unchanged, None, and a warning naming the file and
    the reason (they are processed as 2-D montages). Reads one header; nothing for a series
    without MOSAIC images.
    """
    mosaics = [i for i in instances if is_mosaic(i.image_type)]
    if not mosaics:
        return instances, None, []
    first = min(mosaics, key=lambda i: (i.instance_number is None, i.instance_number or 0, i.path))
    try:
        if first.n_frames != 1 or first.per_frame_groups:
            raise MosaicError(f"{first.n_frames} frames: a mosaic is one frame")
        mosaic = read_mosaic(first.path)
    except MosaicError as exc:
        return instances, None, [
            f"{first.path}: Siemens MOSAIC image not unpacked: {exc.reason}; the series' {len(mosaics)} MOSAIC "
            "image(s) processed as 2-D montages of their tiles"]
    k = mosaic.tiles_per_row
    warnings_ = [f"Siemens MOSAIC image {first.path} unpacked into {mosaic.n_images} slices of {mosaic.tile_rows} x "
                 f"{mosaic.tile_columns} ({k} x {k} tiles, geometry from its CSA header)"]
    others = sorted((i for i in instances if i is not first),
                    key=lambda i: (i.instance_number is None, i.instance_number or 0, i.path))
    if others:
        named = ", ".join(i.path for i in others[:SHOWN])
        if len(others) > SHOWN:
            named += f" and {len(others) - SHOWN} more"
        warnings_.append(
            f"Siemens MOSAIC series of {len(instances)} files (each a volume: a time point or diffusion direction): "
            f"the first by InstanceNumber ({first.path}) is the study's volume; {len(others)} later volume(s) not "
            f"used: {named}")
    return [first], mosaic, warnings_


def tile_frames(montage: Frame, mosaic: Mosaic) -> list[Frame]:
    """The mosaic file's slices as frames: tile ``i`` (row ``i // k``, column ``i % k``, as nibabel
    and dcm2niix read them) at the first slice's position plus ``i`` slice spacings along the
    normal, with the file's rescale and in-plane geometry. They are decoded through pydicom (the
    whole montage, cut; ``Frame.tile``), then sorted along the slice normal like any series."""
    k, tr, tc = mosaic.tiles_per_row, mosaic.tile_rows, mosaic.tile_columns
    origin = np.asarray(mosaic.position, dtype=np.float64)
    step = np.asarray(mosaic.normal, dtype=np.float64) * mosaic.slice_spacing
    return [replace(montage, rows=tr, columns=tc, position=origin + i * step, raw=None,
                    tile=((i // k) * tr, (i % k) * tc, montage.rows, montage.columns))
            for i in range(mosaic.n_images)]
