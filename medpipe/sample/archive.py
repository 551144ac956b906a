"""The sample archive: a small, deterministic, realistic DICOM archive built from local data.

Five studies, each with its own StudyInstanceUID and patient, in nested folders, some files
without a ``.dcm`` extension:

1. ``MR`` brain: nilearn's bundled MNI152 T1 template (2 mm) as an axial MR series, with the
   grey and white matter probability maps as reference segmentation (:func:`brain_reference`).
2. ``CT`` chest phantom (:func:`medpipe.phantom.ct_phantom`), file names shuffled so that name
   order differs from slice order; its truth lesion volumes are in the summary.
3. ``CT`` single slice shipped by pydicom (``CT_small.dcm``).
4. ``MR`` enhanced multi-frame object shipped by pydicom (``emri_small.dcm``).
5. ``CR`` radiograph shipped by pydicom-data (``RG3_J2KR.dcm``, JPEG 2000 lossless).

Nothing is downloaded: every input ships with nilearn, pydicom or pydicom-data.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..keys import study_key
from ..phantom import ct_phantom
from .series import stable_uid, write_series

MNI_RESOLUTION = 2
PHANTOM_SEED = 7
PHANTOM_STUDY_UID = stable_uid("medpipe-sample", "ct-phantom")
BRAIN_STUDY_UID = stable_uid("medpipe-sample", "mni152-brain")
# (file shipped by pydicom or pydicom-data, where it goes in the archive, modality)
SHIPPED_FILES = [
    ("CT_small.dcm", "site-b/2004/ct-slice/IMG00001", "CT"),
    ("emri_small.dcm", "site-b/2004/enhanced-mr/EMRI.dcm", "MR"),
    ("RG3_J2KR.dcm", "site-c/xray/RG3", "CR"),
]


@dataclass(frozen=True)
class _Volume:
    """A volume in medpipe's voxel order (z, y, x) with its DICOM geometry in LPS."""

    data: np.ndarray
    spacing_zyx: tuple[float, float, float]
    row: tuple[float, float, float]
    col: tuple[float, float, float]
    origin_lps: tuple[float, float, float]


def _nifti_to_dicom_order(img: Any) -> _Volume:
    """Reorder a NIfTI image into DICOM's radiological slice layout and LPS geometry.

    Rows run right to left (+x in LPS), columns anterior to posterior (+y), slices inferior to
    superior (+z), so a viewer shows the usual radiological axial view. The reordering is
    derived from the affine, so it works for any axis-aligned NIfTI image.
    """
    import nibabel as nib

    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    # Reorient to LPS axis codes: array axis 0 -> L(+x), 1 -> P(+y), 2 -> S(+z).
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    current = nib.orientations.io_orientation(img.affine)
    transform = nib.orientations.ornt_transform(current, target)
    reoriented = img.as_reoriented(transform)
    data = np.asanyarray(reoriented.dataobj, dtype=np.float32)  # (i, j, k) = (x, y, z)
    affine_lps = ras_to_lps @ reoriented.affine
    zooms = np.linalg.norm(affine_lps[:3, :3], axis=0)
    row = affine_lps[:3, 0] / zooms[0]
    col = affine_lps[:3, 1] / zooms[1]
    return _Volume(
        data=np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing_zyx=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
        row=tuple(map(float, row)),  # type: ignore[arg-type]
        col=tuple(map(float, col)),  # type: ignore[arg-type]
        origin_lps=tuple(map(float, affine_lps[:3, 3])),  # type: ignore[arg-type]
    )


@lru_cache(maxsize=1)
def _mni() -> tuple[_Volume, np.ndarray, np.ndarray]:
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    t1 = _nifti_to_dicom_order(load_mni152_template(resolution=MNI_RESOLUTION))
    gm = _nifti_to_dicom_order(load_mni152_gm_template(resolution=MNI_RESOLUTION)).data
    wm = _nifti_to_dicom_order(load_mni152_wm_template(resolution=MNI_RESOLUTION)).data
    return t1, gm, wm


def brain_reference() -> dict[str, Any]:
    """The brain study's reference: T1 volume and grey/white matter maps in ingested voxel order.

    Returns
    -------
    dict
        ``t1``, ``gm``, ``wm`` (float32 arrays of shape (z, y, x), the order in which
        :func:`medpipe.ingest.ingest_study` writes the volume), ``spacing`` (z, y, x) in mm and
        ``study_uid``.

    Examples
    --------
    >>> ref = brain_reference()
    >>> ref["gm"].shape == ref["t1"].shape
    True
    """
    t1, gm, wm = _mni()
    return {"t1": t1.data, "gm": gm, "wm": wm, "spacing": t1.spacing_zyx, "study_uid": BRAIN_STUDY_UID}


def phantom():
    """The CT phantom written into the sample archive (same seed, so the same truth)."""
    return ct_phantom(seed=PHANTOM_SEED)


def _shipped(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name}: not shipped by the installed pydicom / pydicom-data")
    return Path(path)


def write_sample_archive(dest: str | Path) -> dict[str, Any]:
    """Write the sample archive under ``dest`` and return a summary of it.

    The archive is deterministic: the same files, UIDs and pixel values on every call.

    Returns
    -------
    dict
        ``root`` and ``studies``: one entry per study with ``name``, ``study_uid``, ``study_key``,
        ``modality``, ``n_files`` and ``folder``; the phantom's entry adds
        ``truth_lesion_volumes_ml`` and the brain's ``reference`` (see :func:`brain_reference`).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    studies: list[dict[str, Any]] = []

    t1 = _mni()[0]
    slope = 1.0 / 4000.0  # template intensities are 0..1; 16-bit storage keeps 2.5e-4 precision
    brain_dir = dest / "site-a" / "brain" / "MNI152-T1"
    names = [f"{'slice' if k % 3 else 'IM'}{k:04d}" + (".dcm" if k % 2 else "") for k in range(t1.data.shape[0])]
    files = write_series(
        t1.data, t1.spacing_zyx, brain_dir, modality="MR",
        orientation=(t1.row, t1.col), origin_lps=t1.origin_lps,
        study_uid=BRAIN_STUDY_UID, series_uid=stable_uid("medpipe-sample", "mni152-t1"),
        patient_name="Template^Brain", patient_id="SAMPLE-MR-01", series_description="T1 MPRAGE MNI152",
        slope=slope, intercept=0.0, file_names=names, MagneticFieldStrength=3.0,
        StudyDescription="Sample brain MR", BodyPartExamined="HEAD",
    )
    studies.append({"name": "brain_mr", "study_uid": BRAIN_STUDY_UID, "modality": "MR",
                    "n_files": len(files), "folder": str(brain_dir.relative_to(dest)),
                    "shape": list(t1.data.shape), "reference": "medpipe.sample.brain_reference()"})

    ph = phantom()
    ct_dir = dest / "site-a" / "chest" / "phantom-ct"
    files = write_series(
        ph.hu, ph.spacing, ct_dir, modality="CT",
        study_uid=PHANTOM_STUDY_UID, series_uid=stable_uid("medpipe-sample", "ct-phantom-series"),
        patient_name="Phantom^Chest", patient_id="SAMPLE-CT-01", series_description="CHEST 2.5MM",
        origin_lps=(-(ph.hu.shape[2] - 1) * ph.spacing[2] / 2, -(ph.hu.shape[1] - 1) * ph.spacing[1] / 2, -60.0),
        intercept=-1024.0, slope=1.0, shuffle=True, seed=PHANTOM_SEED,
        file_names=[f"{k:08x}" for k in range(ph.hu.shape[0])], KVP=120.0,
        StudyDescription="Sample chest CT phantom", BodyPartExamined="CHEST",
    )
    studies.append({"name": "phantom_ct", "study_uid": PHANTOM_STUDY_UID, "modality": "CT",
                    "n_files": len(files), "folder": str(ct_dir.relative_to(dest)),
                    "shape": list(ph.hu.shape),
                    "truth_lesion_volumes_ml": [round(les.volume_ml, 4) for les in ph.lesions]})

    import pydicom

    for name, rel, modality in SHIPPED_FILES:
        src = _shipped(name)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        uid = str(pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID)
        studies.append({"name": Path(name).stem, "study_uid": uid, "modality": modality, "n_files": 1,
                        "folder": str(target.parent.relative_to(dest)), "source": name})
    for study in studies:  # the key under which ingest files the study (default salt)
        study["study_key"] = study_key(study["study_uid"])
    return {"root": str(dest), "studies": studies}
