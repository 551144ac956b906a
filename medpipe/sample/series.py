"""Write a volume as a DICOM series, one slice per file, with exact geometry.

Used by the sample archive and by tests that need oblique orientations, gaps, duplicate
positions, shuffled file names or planted canary values.

>>> import numpy as np, tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp())
>>> files = write_series(np.zeros((3, 4, 5), "int16"), (2.0, 1.0, 1.0), out, modality="CT")
>>> len(files), files[0].name
(3, 'IM0000.dcm')
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "PT": "1.2.840.10008.5.1.4.1.1.128",  # PET Image Storage
    "OT": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
}
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


def stable_uid(*parts: object) -> str:
    """A valid DICOM UID derived deterministically from ``parts``."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _storage(values: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, int]:
    """Stored integers for physical ``values`` and PixelRepresentation (0 unsigned, 1 signed)."""
    stored = np.rint((np.asarray(values, dtype=np.float64) - intercept) / slope)
    if stored.min() >= 0 and stored.max() <= 65535:
        return stored.astype(np.uint16), 0
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError(f"values need {stored.min()}..{stored.max()} stored, beyond 16 bits; choose slope/intercept")
    return stored.astype(np.int16), 1


def write_series(
    volume_zyx: np.ndarray,
    spacing_zyx: Sequence[float],
    out_dir: str | Path,
    *,
    modality: str = "CT",
    orientation: Sequence[Sequence[float]] = AXIAL,
    origin_lps: Sequence[float] = (0.0, 0.0, 0.0),
    positions_lps: Sequence[Sequence[float]] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_name: str = "Sample^Patient",
    patient_id: str = "SAMPLE-0001",
    patient_birth_date: str = "19700101",
    patient_sex: str = "O",
    study_date: str = "20240101",
    series_description: str = "",
    series_number: int = 1,
    slope: float | Sequence[float] = 1.0,
    intercept: float | Sequence[float] = 0.0,
    file_names: Sequence[str] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    file_meta: bool = True,
    **extra_tags: Any,
) -> list[Path]:
    """Write ``volume_zyx`` (physical values) as a single-frame DICOM series.

    Parameters
    ----------
    volume_zyx : ndarray, shape (Z, Y, X)
        Physical values (e.g. HU); stored as 16-bit integers through slope and intercept.
    spacing_zyx : (dz, dy, dx)
        Slice spacing along the normal, row spacing, column spacing in mm.
    out_dir : path
        Folder that receives the files (created). Names may contain sub-folders.
    orientation : (row cosines, column cosines)
        ImageOrientationPatient in LPS; the slice normal is their cross product.
    origin_lps : (x, y, z)
        ImagePositionPatient of slice 0.
    positions_lps : sequence of (x, y, z), optional
        Explicit per-slice ImagePositionPatient (gaps, duplicates, tilt); overrides the
        regular positions derived from ``origin_lps`` and ``spacing_zyx[0]``.
    slope, intercept : float or per-slice sequence
        RescaleSlope / RescaleIntercept, per slice if sequences.
    file_names : sequence of str, optional
        Relative file names, one per slice (default ``IM0000.dcm`` ...).
    shuffle : bool
        Assign file names in a random (seeded) order so that name order differs from slice order.
    file_meta : bool
        Write the preamble and file meta group; ``False`` writes a bare dataset.
    **extra_tags
        Any further DICOM keywords set on every slice (e.g. ``InstitutionName="X"``).

    Returns
    -------
    list of Path
        The written files, in slice order.
    """
    vol = np.asarray(volume_zyx)
    if vol.ndim != 3:
        raise ValueError(f"volume_zyx must be 3-D (z, y, x), got shape {vol.shape}")
    nz, ny, nx = vol.shape
    row = np.asarray(orientation[0], dtype=float)
    col = np.asarray(orientation[1], dtype=float)
    normal = np.cross(row, col)
    if positions_lps is None:
        positions = [np.asarray(origin_lps, float) + k * float(spacing_zyx[0]) * normal for k in range(nz)]
    else:
        positions = [np.asarray(p, float) for p in positions_lps]
        if len(positions) != nz:
            raise ValueError(f"positions_lps has {len(positions)} entries for {nz} slices")
    slopes = np.broadcast_to(np.asarray(slope, float), (nz,))
    intercepts = np.broadcast_to(np.asarray(intercept, float), (nz,))
    names = list(file_names) if file_names is not None else [f"IM{k:04d}.dcm" for k in range(nz)]
    if len(names) != nz:
        raise ValueError(f"file_names has {len(names)} entries for {nz} slices")
    if shuffle:
        names = [names[i] for i in np.random.default_rng(seed).permutation(nz)]
    study_uid = study_uid or stable_uid("study", patient_id, seed)
    series_uid = series_uid or stable_uid("series", study_uid, series_number, seed)
    sop_class = SOP_CLASSES.get(modality, SOP_CLASSES["OT"])
    out_dir = Path(out_dir)
    written = []
    for k in range(nz):
        stored, pixel_rep = _storage(vol[k], slopes[k], intercepts[k])
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = stable_uid("sop", series_uid, seed, k, names[k])
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = stable_uid("for", study_uid)
        ds.Modality = modality
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = patient_birth_date
        ds.PatientSex = patient_sex
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = series_description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Manufacturer = "medpipe"
        ds.ManufacturerModelName = "sample-writer"
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [float(spacing_zyx[1]), float(spacing_zyx[2])]
        ds.SliceThickness = float(spacing_zyx[0])
        ds.SliceLocation = float(positions[k] @ normal)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_rep
        ds.RescaleSlope = float(slopes[k])
        ds.RescaleIntercept = float(intercepts[k])
        ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        for keyword, value in extra_tags.items():
            setattr(ds, keyword, value)
        path = out_dir / names[k]
        path.parent.mkdir(parents=True, exist_ok=True)
        if file_meta:
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.file_meta = meta
            ds.save_as(path, enforce_file_format=True)
        else:  # a bare dataset, as some old archives hold: no preamble, no file meta
            ds.save_as(path, implicit_vr=True, little_endian=True)
        written.append(path)
    return written


def read_series_uids(path: str | Path) -> tuple[str, str]:
    """(StudyInstanceUID, SeriesInstanceUID) of one file, for tests."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
