"""Siemens MOSAIC images unpacked into slices, on the real mosaics nibabel ships (copied into tmp dirs).

nibabel's ``siemens_dwi_0.dcm.gz`` and ``siemens_dwi_1000.dcm.gz`` are two volumes (b = 0 and
b = 1000, InstanceNumber 1 and 2) of one Siemens DTI series: 896 x 896 mosaics of 48 slices of
128 x 128 (7 x 7 tiles) with their CSA headers; nibabel blanked their pixels, so the tests write a
ramp into the copies (every tile then differs, and a misplaced tile or axis shows). Its ``0.dcm``
and ``1.dcm`` keep a mosaic's header but 256 x 256 pixels of a ramp: 48 slices cannot tile that
(256 is not 7 tiles of whole pixels; nibabel's ``get_data`` fails on them too), so they are a
real example of a mosaic that cannot be unpacked.
"""

from __future__ import annotations

import gzip
import importlib.resources
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ingest_helpers import load, run_ingest
from pydicom.data import get_testdata_file

from medpipe.ingest.mosaic import plan_mosaic
from medpipe.ingest.scan import read_instance

NIBABEL_DATA = Path(str(importlib.resources.files("nibabel") / "nicom" / "tests" / "data"))
CSA_IMAGE = (0x0029, 0x1010)  # the CSA image header (private block 0x10 of "SIEMENS CSA HEADER")


def nibabel_mosaic(path: str | Path):
    """nibabel's MosaicWrapper of a file (its module warns on import that it is experimental)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom.dicomwrappers import MosaicWrapper, wrapper_from_data

        wrapper = wrapper_from_data(pydicom.dcmread(path))
    assert isinstance(wrapper, MosaicWrapper)
    return wrapper


def dwi_copy(name: str, dest: Path, offset: int = 0) -> Path:
    """nibabel's gzipped DWI mosaic, unpacked as a user would, with a ramp for pixels."""
    ds = pydicom.dcmread(gzip.open(NIBABEL_DATA / name))
    ramp = (np.arange(ds.Rows * ds.Columns) * 7 + offset) % 4001
    ds.PixelData = ramp.astype(np.uint16).tobytes()
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest)
    return dest


def lps_of_nibabel(affine: np.ndarray) -> np.ndarray:
    """nibabel's DICOM wrapper affine is already in DICOM's LPS patient space (not the RAS of its
    NIfTI images), with voxel axes (row, column, slice); medpipe's are (column, row, slice)."""
    return affine[:, [1, 0, 2, 3]]


def test_mosaic_unpacked_into_slices_with_nibabels_geometry_and_pixels(tmp_path):
    path = dwi_copy("siemens_dwi_0.dcm.gz", tmp_path / "archive" / "b0.dcm")
    plans, results, scan = run_ingest(tmp_path / "archive", tmp_path / "out")
    assert not scan.issues and len(plans) == 1
    plan = plans[0]
    assert plan.n_slices == 48 and plan.files == [str(path)]
    assert plan.mosaic["tiles_per_row"] == 7 and (plan.mosaic["tile_rows"], plan.mosaic["tile_columns"]) == (128, 128)
    assert plan.field_of_view_mm == [230.0, 230.0]  # 128 x 1.796875 mm: a tile, not the 896-pixel montage
    result = results[plan.study_key]
    assert result["shape"] == [48, 128, 128]
    assert any("Siemens MOSAIC" in w and "unpacked into 48 slices" in w for w in result["warnings"])

    volume, meta = load(tmp_path / "out", plan.study_key)
    wrapper = nibabel_mosaic(path)
    np.testing.assert_allclose(meta.affine, lps_of_nibabel(wrapper.affine), atol=1e-3)
    np.testing.assert_allclose(result["affine_lps"], meta.affine)
    data = wrapper.get_data()  # (row, column, slice)
    assert data.shape == (128, 128, 48)
    np.testing.assert_array_equal(volume, data.transpose(2, 0, 1))

    # the first slice is not where ImagePositionPatient puts the montage: corrected by half the
    # montage's extra size (3 tiles of 128 pixels) along the rows and columns
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ipp, iop = np.asarray(ds.ImagePositionPatient, float), np.asarray(ds.ImageOrientationPatient, float)
    shift = (896 - 128) / 2 * float(ds.PixelSpacing[0])
    np.testing.assert_allclose(meta.affine[:3, 3], ipp + shift * (iop[:3] + iop[3:]), atol=1e-3)
    # slices follow the CSA SliceNormalVector, SpacingBetweenSlices (3 mm) apart
    np.testing.assert_allclose(meta.affine[:3, 2], 3.0 * np.array([0.0, 0.00523632, 0.99998629]), atol=1e-3)


def test_series_of_mosaics_keeps_the_first_volume_and_names_the_others(tmp_path):
    """Each mosaic file of a series is a whole volume (here b = 0 and b = 1000 of a DTI series):
    the first by InstanceNumber, not by file name, is unpacked; the other is named as not used."""
    b1000 = dwi_copy("siemens_dwi_1000.dcm.gz", tmp_path / "archive" / "a_first_by_name", offset=1000)
    b0 = dwi_copy("siemens_dwi_0.dcm.gz", tmp_path / "archive" / "z_last_by_name")
    plans, results, _ = run_ingest(tmp_path / "archive", tmp_path / "out")
    plan = plans[0]
    assert plan.files == [str(b0)] and plan.n_slices == 48
    notes = [w for w in plan.warnings if "not used" in w]
    assert len(notes) == 1 and "Siemens MOSAIC series of 2 files" in notes[0]
    assert f"1 later volume(s) not used: {b1000}" in notes[0] and str(b0) in notes[0]
    volume, meta = load(tmp_path / "out", plan.study_key)
    np.testing.assert_array_equal(volume, nibabel_mosaic(b0).get_data().transpose(2, 0, 1))
    np.testing.assert_allclose(meta.affine, lps_of_nibabel(nibabel_mosaic(b0).affine), atol=1e-3)
    assert results[plan.study_key]["series"]["n_instances"] == 1


def test_mosaic_whose_tiles_do_not_fit_the_image_stays_a_montage(tmp_path):
    """nibabel's 0.dcm and 1.dcm: a mosaic's header (48 slices: 7 x 7 tiles) over 256 x 256 pixels."""
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("0.dcm", "1.dcm"):
        (archive / name).write_bytes((NIBABEL_DATA / name).read_bytes())
    plans, results, scan = run_ingest(archive, tmp_path / "out")
    assert not scan.issues
    plan = plans[0]
    assert plan.mosaic is None and len(plan.files) == 2
    result = results[plan.study_key]
    assert result["shape"] == [2, 256, 256]  # the two montages, 3 mm apart, as before
    [note] = [w for w in result["warnings"] if "Siemens MOSAIC" in w]
    assert note.startswith(f"{archive / '0.dcm'}: Siemens MOSAIC image not unpacked: 256 x 256 image is not 7 x 7 "
                           "tiles of whole pixels") and "2-D montage" in note


def _csa_without_mosaic_count(ds: pydicom.Dataset) -> None:
    value = ds[CSA_IMAGE].value
    ds[CSA_IMAGE].value = value.replace(b"NumberOfImagesInMosaic", b"NumberOfImagesInMosaiX")


def _csa_garbage(ds: pydicom.Dataset) -> None:
    value = ds[CSA_IMAGE].value
    ds[CSA_IMAGE].value = value[:8] + b"\xff\xff\xff\x7f" + value[12:]  # 2**31 - 1 tags


def _csa_truncated(ds: pydicom.Dataset) -> None:
    ds[CSA_IMAGE].value = ds[CSA_IMAGE].value[:600]


def _csa_removed(ds: pydicom.Dataset) -> None:
    del ds[CSA_IMAGE]


def _csa_normal_across(ds: pydicom.Dataset) -> None:
    """SliceNormalVector is the CSA's text: make it lie in the slice plane."""
    value = ds[CSA_IMAGE].value
    start = value.index(b"SliceNormalVector")
    head, tail = value[:start], value[start:]
    for old, new in ((b"0.00523632", b"1.00000000"), (b"0.99998629", b"0.00000000")):
        assert old in tail
        tail = tail.replace(old, new, 1)
    ds[CSA_IMAGE].value = head + tail


@pytest.mark.parametrize("corrupt, reason", [
    (_csa_removed, "no Siemens CSA image header (0029,xx10)"),
    (_csa_garbage, "Siemens CSA image header (0029,xx10) cannot be parsed: CSAReadError"),
    (_csa_truncated, "Siemens CSA image header (0029,xx10) cannot be parsed"),
    (_csa_without_mosaic_count, "CSA image header gives no NumberOfImagesInMosaic"),
    (_csa_normal_across, "CSA SliceNormalVector [0.0, 1.0, 0.0] is not the normal of ImageOrientationPatient"),
], ids=["removed", "garbage", "truncated", "no-count", "normal-in-plane"])
def test_bad_csa_header_is_named_and_the_mosaic_stays_a_montage(tmp_path, corrupt, reason):
    path = dwi_copy("siemens_dwi_0.dcm.gz", tmp_path / "archive" / "m.dcm")
    ds = pydicom.dcmread(path)
    corrupt(ds)
    ds.save_as(path)
    plans, results, scan = run_ingest(tmp_path / "archive", tmp_path / "out")
    assert not scan.issues and plans[0].mosaic is None
    result = results[plans[0].study_key]
    assert result["shape"] == [1, 896, 896]
    [note] = [w for w in result["warnings"] if "Siemens MOSAIC" in w]
    assert note.startswith(f"{path}: Siemens MOSAIC image not unpacked: {reason}"), note
    assert note.endswith("processed as 2-D montages of their tiles")


def test_ordinary_files_pay_nothing(tmp_path):
    """A series without MOSAIC in ImageType is neither read again nor passed to nibabel, which is
    not even imported (planning a CT series in a fresh interpreter)."""
    inst = read_instance(get_testdata_file("CT_small.dcm"))
    gone = inst.__class__(**{**inst.to_dict(), "path": str(tmp_path / "no-such-file")})
    assert plan_mosaic([gone]) == ([gone], None, [])
    code = ("import sys; from pydicom.data import get_testdata_file; "
            "from medpipe.ingest import plan_studies, scan_archive; import shutil, tempfile, pathlib; "
            "d = pathlib.Path(tempfile.mkdtemp()); shutil.copy(get_testdata_file('CT_small.dcm'), d); "
            "plans = plan_studies(scan_archive(d)); assert plans[0].files and plans[0].mosaic is None; "
            "print(sorted(m for m in sys.modules if m.startswith('nibabel')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "nibabel.nicom" not in out, out


def test_csa_normal_against_the_orientation_reverses_the_slices_not_the_geometry(tmp_path):
    """Where the CSA's SliceNormalVector points against ImageOrientationPatient's normal, the tiles
    run that way (nibabel's affine then steps along it); medpipe sorts slices along IOP's normal
    like any series: its volume is nibabel's with the slice axis reversed, the same voxels in space."""
    path = dwi_copy("siemens_dwi_0.dcm.gz", tmp_path / "archive" / "m.dcm")
    ds = pydicom.dcmread(path)
    value = ds[CSA_IMAGE].value
    start = value.index(b"SliceNormalVector")
    tail = value[start:].replace(b"0.00523632", b"-0.0052363", 1).replace(b"0.99998629", b"-0.9999863", 1)
    ds[CSA_IMAGE].value = value[:start] + tail  # the same lengths: the CSA items stay valid
    ds.save_as(path)
    plans, results, _ = run_ingest(tmp_path / "archive", tmp_path / "out")
    assert plans[0].n_slices == 48
    volume, meta = load(tmp_path / "out", plans[0].study_key)
    wrapper = nibabel_mosaic(path)
    nib = lps_of_nibabel(wrapper.affine)
    assert nib[2, 2] < 0  # nibabel steps against IOP's normal, as the CSA says
    flipped = nib.copy()
    flipped[:3, 2] = -nib[:3, 2]
    flipped[:3, 3] = nib[:3, 3] + 47 * nib[:3, 2]
    np.testing.assert_allclose(meta.affine, flipped, atol=1e-3)
    np.testing.assert_array_equal(volume, wrapper.get_data().transpose(2, 0, 1)[::-1])
