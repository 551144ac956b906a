"""Helpers for ingest tests (imported by name: the test folders have no __init__.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medpipe.config import IngestConfig
from medpipe.ingest import ingest_study, plan_studies, scan_archive
from medpipe.omezarr import read_image, read_meta


def oblique_orientation(deg_a: float = 20.0, deg_b: float = 10.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Row and column cosines of an axial plane rotated about two axes."""
    a, b = np.radians(deg_a), np.radians(deg_b)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rot = rx @ rz
    return tuple(rot[:, 0]), tuple(rot[:, 1])


def ramp_volume(shape=(6, 10, 12), seed: int = 0) -> np.ndarray:
    """A volume whose every voxel differs, so any misplaced slice or axis shows."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    return (z * 100 + y * 7 + x + rng.integers(0, 3, shape) - 500).astype(np.int16)


def run_ingest(root: Path, out: Path, cfg: IngestConfig | None = None):
    """scan + plan + ingest every plannable study; returns (plans, results by study key, scan)."""
    cfg = cfg or IngestConfig()
    scan = scan_archive(root, cfg)
    plans = plan_studies(scan, cfg)
    results = {p.study_key: ingest_study(p, out / p.study_key, cfg) for p in plans if p.files}
    return plans, results, scan


def load(out: Path, key: str) -> tuple[np.ndarray, object]:
    path = out / key / "image.zarr"
    return read_image(path).compute(), read_meta(path)


def enhanced_mr(stored_zyx: np.ndarray, positions, slopes, intercepts) -> pydicom.Dataset:
    """An enhanced MR object (pydicom's emri_small.dcm made over) holding ``stored_zyx`` as
    16-bit stored values, with per-frame positions and rescale in its functional groups.

    Shared groups give an axial orientation, pixel spacing (0.9, 0.7) and thickness 1.5.
    """
    src = pydicom.dcmread(get_testdata_file("emri_small.dcm", download=False))
    n = stored_zyx.shape[0]
    src.NumberOfFrames = n
    src.Rows, src.Columns = stored_zyx.shape[1:]
    src.PixelData = np.asarray(stored_zyx).astype(np.uint16).tobytes()
    shared, ori, meas = Dataset(), Dataset(), Dataset()
    ori.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    meas.PixelSpacing = [0.9, 0.7]
    meas.SliceThickness = 1.5
    shared.PlaneOrientationSequence = Sequence([ori])
    shared.PixelMeasuresSequence = Sequence([meas])
    src.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for i in range(n):
        item, pos, pvt = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = list(positions[i])
        pvt.RescaleSlope, pvt.RescaleIntercept = slopes[i], intercepts[i]
        item.PlanePositionSequence = Sequence([pos])
        item.PixelValueTransformationSequence = Sequence([pvt])
        per.append(item)
    src.PerFrameFunctionalGroupsSequence = Sequence(per)
    return src
