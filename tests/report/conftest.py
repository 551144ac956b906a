"""A realistic processed study for the report tests: a phantom CT written as DICOM slices
(shuffled file order, identifying patient data), its image.zarr with labels, a saliency PNG
and the stage results the flow would hand to the report."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage as ndi

from medpipe import omezarr
from medpipe.config import Config
from medpipe.phantom import ct_phantom

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-12345", "PatientBirthDate": "19600101",
           "PatientSex": "F", "AccessionNumber": "ACC-999", "InstitutionName": "St Example Hospital",
           "ReferringPhysicianName": "House^Gregory"}
EVIL = "<script>document.title='pwned'</script><b>bold</b>"
SHAPE, SPACING = (20, 96, 96), (2.5, 2.0, 2.0)
ORIGIN = (-95.0, -95.0, -300.0)


@dataclass
class Study:
    dicom_dir: Path
    files: list[str]
    study_dir: Path
    labels: np.ndarray
    names: dict[int, str]
    stages: dict
    timings: dict
    provenance: dict
    study_uid: str
    series_uid: str


def write_ct_series(folder: Path, hu: np.ndarray, spacing, origin, description: str) -> tuple[list[str], str, str]:
    """Single-frame CT slices, one file per slice, files named in shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(3).permutation(hu.shape[0])
    files = []
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{n:04d}"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        for key, value in PATIENT.items():
            setattr(ds, key, value)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.Modality, ds.SeriesDescription, ds.StudyDescription = "CT", description, "CHEST"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber = "20240102", "101010", "1", 3
        ds.Manufacturer = "medpipe-tests"
        ds.InstanceNumber = int(hu.shape[0] - k)  # reversed on purpose: never sort by it
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = hu[k].astype(np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
    return files, study_uid, series_uid


def measurements(labels: np.ndarray, hu: np.ndarray, names: dict[int, str], spacing, affine) -> list[dict]:
    out = []
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for v, name in names.items():
        mask = labels == v
        n = int(mask.sum())
        if not n:
            continue
        zyx = np.argwhere(mask)
        c = zyx.mean(axis=0)
        centroid = (affine @ np.array([c[2], c[1], c[0], 1.0]))[:3]
        out.append({"label": v, "name": name, "voxels": n, "volume_ml": n * voxel_ml,
                    "bbox": [zyx.min(0).tolist(), (zyx.max(0) + 1).tolist()],
                    "centroid_mm": centroid.tolist(), "mean": float(hu[mask].mean()), "std": float(hu[mask].std())})
    return out


def build_study(root: Path) -> Study:
    ph = ct_phantom(shape=SHAPE, spacing=SPACING, n_lesions=2, seed=4)
    files, study_uid, series_uid = write_ct_series(root / "archive" / "Doe^Jane" / "CT", ph.hu, SPACING, ORIGIN, EVIL)
    study_dir = root / "out" / "studies" / "abcdef0123456789"
    affine = np.array([[SPACING[2], 0, 0, ORIGIN[0]], [0, SPACING[1], 0, ORIGIN[1]],
                       [0, 0, SPACING[0], ORIGIN[2]], [0, 0, 0, 1.0]])
    image = study_dir / "image.zarr"
    omezarr.write_image(image, ph.hu, SPACING, affine, levels=2)
    omezarr.write_labels(image, ph.labels, ph.label_names)
    (study_dir / "saliency").mkdir(parents=True)
    sal = (np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8)
    Image.fromarray(sal).save(study_dir / "saliency" / "slice_010.png")

    lesion_label = next(v for v, n in ph.label_names.items() if n == "lesion")
    comps, n = ndi.label(ph.labels == lesion_label)
    voxel_ml = float(np.prod(SPACING)) / 1000.0
    candidates = [{"id": i, "volume_ml": float((comps == i).sum() * voxel_ml),
                   "centroid_mm": [float(x) for x in ndi.center_of_mass(comps == i)], "mean_hu": 45.0}
                  for i in range(1, n + 1)]
    scores = np.clip(np.linspace(0.05, 0.95, SHAPE[0]) ** 2, 0, 1)
    stages = {
        "plan": {"study_key": study_dir.name, "modality": "CT", "series_key": "s3f00d", "series_description": EVIL,
                 "files": files, "fingerprint": "f1nger", "warnings": ["one localizer image ignored"],
                 "skipped": [{"series_key": "loc01", "series_description": "LOCALIZER", "modality": "CT",
                              "files": files[:1], "reason": "fewer than 4 slices"}],
                 "issues": [{"path": "archive/junk.txt", "reason": "not a DICOM file"}]},
        "ingest": {"modality": "CT", "shape": list(SHAPE), "spacing": list(SPACING), "affine_lps": affine.tolist(),
                   "series": {"series_description": EVIL, "slices": SHAPE[0], "source_folder": "/archive/Doe^Jane"},
                   "warnings": [], "issues": [], "source": "/archive/Doe^Jane/CT"},
        "filter": {"steps": [{"op": "median", "params": {"size": 3}}], "device": "cpu", "shape": list(SHAPE)},
        "segment": {"method": "ct_tissues", "labels": ph.label_names,
                    "measurements": measurements(ph.labels, ph.hu, ph.label_names, SPACING, affine),
                    "lesion_candidates": candidates, "warnings": []},
        "infer": {"model": {"name": "lesion-slice-cnn", "version": "1.2", "sha256": "ab" * 32, "path": "/models/x.keras"},
                  "output_kind": "slice_classification", "labels": ["no_lesion", "lesion"],
                  "slice_scores": scores.tolist(), "study_score": float(scores.max()), "study_label": "lesion",
                  "rule": "max", "flags": [], "saliency": [{"slice": 10, "score": float(scores[10]),
                                                           "png": "saliency/slice_010.png"}]},
    }
    cfg = Config()
    provenance = {"medpipe_version": "0.1.0", "run_id": "run-test", "config": cfg.model_dump(mode="json"),
                  "config_fingerprint": cfg.fingerprint(), "input_fingerprint": "f1nger",
                  "versions": {"python": "3.11", "highdicom": "0.28"}}
    timings = {"ingest": 1.2, "filter": 0.4, "segment": 0.8, "infer": 2.5}
    return Study(root / "archive", files, study_dir, ph.labels, ph.label_names, stages, timings, provenance,
                 study_uid, series_uid)


@pytest.fixture(scope="session")
def _study_template(tmp_path_factory) -> Study:
    return build_study(tmp_path_factory.mktemp("report-study"))


@pytest.fixture
def study(_study_template, tmp_path) -> Study:
    """A fresh copy of the processed study folder for each test (the DICOM files are shared)."""
    t = _study_template
    dst = tmp_path / "studies" / t.study_dir.name
    shutil.copytree(t.study_dir, dst)
    return Study(**{**t.__dict__, "study_dir": dst, "stages": copy.deepcopy(t.stages)})


def read_dicom(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)
