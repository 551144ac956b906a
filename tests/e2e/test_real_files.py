"""End to end on files nobody on the project wrote: real scanner files that installed packages ship.

The archive is built from copies of files shipped by nibabel (``nicom/tests/data``: Siemens and
Philips MR), pynetdicom (``tests/dicom_files``: GE CT, Toshiba MR, Elekta RT portal image) and
pydicom-data (radiograph, ultrasound, enhanced CT, SEG; files that ``medpipe sample-archive`` and
the other tests do not use), then ``medpipe run`` processes it the way a user would: the console
script, its embedded Prefect server, a Dask cluster of two worker processes.

Every file must be accounted for, and each gets the outcome a careful user would expect
(:data:`FILES`): part of a processed study (``ok``), in a study skipped with a reason
(``skipped``), or named with a reason in the operator's log (``issue``).

The subset (20 of about 90 candidate files): every distinct vendor, modality, transfer syntax and
object kind once, leaving out what only repeats a case at a higher cost (pydicom-data's
120-frame colour ultrasound alone took a minute of worker time; the 896 x 896 Siemens DWI
mosaics repeat nibabel's smaller ones). The run takes 1.5 to 2.5 minutes on two shared cores.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import zarr
from pydicom.data import get_testdata_file

from medpipe.keys import study_key, uid_key

pytestmark = pytest.mark.slow

MEDPIPE = str(Path(sys.executable).with_name("medpipe"))
OK, SKIPPED, ISSUE = "ok", "skipped", "issue"


@dataclass(frozen=True)
class RealFile:
    """One shipped file: where it comes from, where it goes in the archive, what must happen to it."""

    package: str  # nibabel | pynetdicom | pydicom-data
    name: str  # file name in the package's test data
    dest: str  # path in the archive; a source ending in .gz is unpacked unless dest keeps .gz
    outcome: str  # OK | SKIPPED | ISSUE
    text: str | None = None  # OK: a warning of the study; SKIPPED / ISSUE: part of the reason


FILES = [
    # nibabel 5.4: Siemens DTI mosaics (two files of one series, the second without extension)
    RealFile("nibabel", "0.dcm", "siemens/dti/0.dcm", OK, "Siemens MOSAIC"),
    RealFile("nibabel", "1.dcm", "siemens/dti/IM0001", OK, "Siemens MOSAIC"),
    RealFile("nibabel", "slicethickness_empty_string.dcm", "siemens/mip/mip.dcm", OK),  # JPEG 2000, empty thickness
    RealFile("nibabel", "csa_slice_norm.dcm", "siemens/csa/csa.dcm", ISSUE, "image object without pixel data"),
    RealFile("nibabel", "decimal_rescale.dcm", "siemens/rescale/r.dcm", ISSUE,
             "without StudyInstanceUID/SeriesInstanceUID"),  # nibabel stripped its UIDs
    RealFile("nibabel", "philips_mprage.dcm.gz", "philips/mprage.dcm", OK),  # enhanced MR, 176 frames (blanked)
    RealFile("nibabel", "siemens_dwi_0.dcm.gz", "left-compressed/siemens_dwi_0.dcm.gz", ISSUE, "not a DICOM file"),
    # pynetdicom 3.0: the same GE CT slice twice, once with a file meta that lies about its syntax
    RealFile("pynetdicom", "CTImageStorage.dcm", "ge-ct/CTImageStorage.dcm", OK, "dropped 1 duplicate instance"),
    RealFile("pynetdicom", "CTImageStorage_bad_meta.dcm", "ge-ct/bad_meta.dcm", OK, "dropped 1 duplicate instance"),
    # one Toshiba MR slice as two instances at one position: explicit big endian and JPEG 2000
    RealFile("pynetdicom", "MRImageStorage_ExplicitVRBigEndian.dcm", "toshiba-mr/be.dcm", OK,
             "duplicate positions dropped"),
    RealFile("pynetdicom", "MRImageStorage_JPG2000_Lossless.dcm", "toshiba-mr/j2k.dcm", OK,
             "duplicate positions dropped"),
    RealFile("pynetdicom", "RTImageStorage.dcm", "elekta/portal.dcm", SKIPPED, "modality RTIMAGE not in ingest.modalities"),
    RealFile("pynetdicom", "SCImageStorage_Deflated.dcm", "sc/deflated.dcm", OK),
    # pydicom-data 1.0
    RealFile("pydicom-data", "RG1_J2KI.dcm", "cr/RG1", OK, "PixelSpacing 0\\0 is not positive; 1 mm assumed"),
    RealFile("pydicom-data", "MR-SIEMENS-DICOM-WithOverlays.dcm", "siemens/overlays.dcm", OK),
    RealFile("pydicom-data", "eCT_Supplemental.dcm", "enhanced-ct/eCT.dcm", OK),
    RealFile("pydicom-data", "explicit_VR-UN.dcm", "ct-un/ct.dcm", OK),
    RealFile("pydicom-data", "gdcm-US-ALOKA-16.dcm", "us/aloka.dcm", OK, "PALETTE COLOR image"),
    RealFile("pydicom-data", "OT-PAL-8-face.dcm", "ot/face", OK, "PALETTE COLOR image"),  # no file meta
    RealFile("pydicom-data", "liver.dcm", "seg/liver.dcm", SKIPPED, "modality SEG not in ingest.modalities"),
]


def shipped(package: str, name: str) -> Path:
    """The file as the installed package ships it (the test extra installs all three)."""
    if package == "nibabel":
        path = Path(str(importlib.resources.files("nibabel") / "nicom" / "tests" / "data" / name))
    elif package == "pynetdicom":
        path = Path(str(importlib.resources.files("pynetdicom") / "tests" / "dicom_files" / name))
    else:
        path = Path(get_testdata_file(name, download=False) or name)
    assert path.is_file(), f"{package} does not ship {name}: install the test extra (pip install -e .[test])"
    return path


def build_archive(root: Path) -> None:
    for f in FILES:
        src, dest = shipped(f.package, f.name), root / f.dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.name.endswith(".gz") and not f.dest.endswith(".gz"):  # as a user would unpack it
            dest.write_bytes(gzip.decompress(src.read_bytes()))
        else:
            shutil.copyfile(src, dest)


def header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True, force=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root, out = tmp_path_factory.mktemp("real-archive"), tmp_path_factory.mktemp("real-out")
    build_archive(root)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the embedded server
    proc = subprocess.run([MEDPIPE, "run", str(root), "--out", str(out), "--workers", "2"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert (out / "run.json").is_file(), proc.stdout + proc.stderr
    record = json.loads((out / "run.json").read_text())
    log = [json.loads(line) for line in (out / "private" / "file-issues.jsonl").read_text().splitlines()]
    return {"root": root, "out": out, "proc": proc, "run": record,
            "issues": {e["path"]: e for e in log if e["run_id"] == record["run_id"]},
            "studies": {s["study_key"]: s for s in record["studies"]}}


def report(run: dict[str, Any], key: str) -> dict[str, Any]:
    return json.loads((run["out"] / "studies" / key / "report.json").read_text())


def test_run_succeeds(run: dict[str, Any]) -> None:
    proc = run["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not [s for s in run["run"]["studies"] if s["status"] == "failed"]


def test_every_file_processed_or_named_with_a_reason(run: dict[str, Any]) -> None:
    """No file of the archive goes unexplained, whatever the expectations below say."""
    for path in sorted(p for p in run["root"].rglob("*") if p.is_file()):
        rel = str(path.relative_to(run["root"]))
        if rel in run["issues"]:
            assert run["issues"][rel]["reason"], rel
            continue
        uid = str(header(path).get("StudyInstanceUID", ""))
        study = run["studies"].get(study_key(uid)) if uid else None
        assert study is not None, f"{rel}: neither in a study nor named"
        assert study["status"] == "ok" or study["status"] == "skipped" and study.get("reason"), (rel, study)


@pytest.mark.parametrize("f", FILES, ids=[f.dest for f in FILES])
def test_outcome(run: dict[str, Any], f: RealFile) -> None:
    path = run["root"] / f.dest
    if f.outcome == ISSUE:
        issue = run["issues"].get(f.dest)
        assert issue is not None, f"{f.dest} is not named in file-issues.jsonl"
        assert f.text in issue["reason"], issue
        assert issue["file_id"] in {i["file_id"] for i in run["run"]["issues"]}  # run.json names it by token
        return
    assert f.dest not in run["issues"], run["issues"][f.dest]
    ds = header(path)
    study = run["studies"][study_key(str(ds.StudyInstanceUID))]
    assert study["status"] == f.outcome, study
    if f.outcome == SKIPPED:
        assert f.text in study["reason"], study
        return
    rep = report(run, study["study_key"])
    assert rep["series"]["used"]["series_key"] == uid_key(str(ds.SeriesInstanceUID))  # its series was the one used
    if f.text:
        assert any(f.text in w for w in rep["warnings"]), rep["warnings"]


def _volume(run: dict[str, Any], dest: str) -> tuple[np.ndarray, dict[str, Any]]:
    key = study_key(str(header(run["root"] / dest).StudyInstanceUID))
    return zarr.open_array(str(run["out"] / "studies" / key / "image.zarr" / "0"), mode="r")[:], report(run, key)


def test_volumes_have_the_expected_shape_and_spacing(run: dict[str, Any]) -> None:
    mprage, rep = _volume(run, "philips/mprage.dcm")
    assert mprage.shape == (176, 256, 256) and np.allclose(rep["spacing"], [1.0, 1.0, 1.0])
    ect, rep = _volume(run, "enhanced-ct/eCT.dcm")
    assert ect.shape == (2, 512, 512) and rep["spacing"][0] == pytest.approx(10.0)
    cr, rep = _volume(run, "cr/RG1")
    assert cr.shape[0] == 1 and min(rep["spacing"]) > 0  # PixelSpacing 0\0 in the file


def test_big_endian_slice_decoded_like_the_little_endian_original(run: dict[str, Any]) -> None:
    """Of the two instances at one position the first (big endian) is kept: the same pixels as
    pydicom's little-endian MR_small, the source of both."""
    volume, _ = _volume(run, "toshiba-mr/be.dcm")
    expected = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    np.testing.assert_array_equal(volume[0], expected)


def test_palette_images_are_luminance_not_indices(run: dict[str, Any]) -> None:
    face, _ = _volume(run, "ot/face")
    assert face.dtype == np.float32 and face.max() > 255  # 16-bit colour table entries, not 8-bit indices


def test_no_archive_path_in_the_public_record(run: dict[str, Any]) -> None:
    text = (run["out"] / "run.json").read_text()
    assert not [f.dest for f in FILES if f.dest in text]


def test_siemens_mosaic_that_does_not_tile_is_named_and_kept_as_montages(run: dict[str, Any]) -> None:
    """nibabel's 0.dcm and 1.dcm keep a DTI mosaic's header (CSA: 48 slices, so 7 x 7 tiles) over
    256 x 256 pixels of a ramp (nibabel cut the 896 x 896 mosaic down; its own ``get_data`` fails on
    them): 256 is not 7 tiles of whole pixels, so the first is named with that reason and both stay
    2-D montages (3 mm apart). Unpacking is tested on nibabel's full-size mosaics
    (``siemens_dwi_*.dcm.gz``) in tests/ingest/test_mosaic.py."""
    volume, rep = _volume(run, "siemens/dti/0.dcm")
    assert volume.shape == (2, 256, 256)
    assert any("Siemens MOSAIC image not unpacked: 256 x 256 image is not 7 x 7 tiles of whole pixels" in w
               for w in rep["warnings"]), rep["warnings"]


def test_seg_written_for_enhanced_mr_with_per_frame_pixel_measures(run: dict[str, Any]) -> None:
    key = study_key(str(header(run["root"] / "philips/mprage.dcm").StudyInstanceUID))
    assert "seg" in run["studies"][key]["files"], report(run, key)["warnings"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_every_dicom_object_made_from_real_files_passes_the_validator(run: dict[str, Any]) -> None:
    made = sorted(run["out"].glob("studies/*/*.dcm"))
    assert made
    errors = {}
    for path in made:
        out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
        lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        if lines:
            errors[f"{path.parent.name}/{path.name}"] = lines
    assert not errors, errors
