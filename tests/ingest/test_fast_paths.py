"""The fast paths of ingest give the same volume as the plain ones: int16 storage, raw pixel
reads at the scan's offset, the pyramid streamed from slabs; undecodable slices become gaps."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from ingest_helpers import load, ramp_volume, run_ingest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from medpipe.config import IngestConfig
from medpipe.errors import StudyError
from medpipe.ingest import ingest_study, plan_studies, scan_archive
from medpipe.omezarr import downsample, read_image, read_meta
from medpipe.sample import write_series


def _only(results):
    assert len(results) == 1
    return next(iter(results.items()))


def test_integral_ct_stored_as_int16_with_streamed_pyramid(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.integers(-1024, 2000, (70, 256, 256)).astype(np.int16)
    write_series(vol, (1.0, 0.5, 0.5), tmp_path / "a", intercept=-1024.0, shuffle=True)
    cfg = IngestConfig(chunk_mb=1.0)  # 8-slice chunks: 9 slab tasks, the last one short (6 slices)
    _, results, _ = run_ingest(tmp_path / "a", tmp_path / "out", cfg)
    key, res = _only(results)
    assert res["chunks"] == [8, 256, 256]
    data, meta = load(tmp_path / "out", key)
    assert meta.dtype == "int16" and res["dtype"] == "int16"
    assert meta.attrs["units"] == "HU" and meta.attrs["dtype"] == "int16"
    np.testing.assert_array_equal(data, vol)
    # each pyramid level is the downsampling of the level above, as if built from the whole volume
    path = tmp_path / "out" / key / "image.zarr"
    above = data
    for level in range(1, meta.levels):
        got = read_image(path, level).compute()
        f = tuple(a // b for a, b in zip(above.shape, got.shape))
        np.testing.assert_array_equal(got, downsample(above, f))
        above = got
    assert meta.levels == 3


def test_values_beyond_int16_fall_back_to_float32(tmp_path):
    vol = ramp_volume().astype(np.float64) * 50 + 30000  # integral, up to about 60,000
    write_series(vol, (1.0, 1.0, 1.0), tmp_path / "a", modality="MR")
    _, results, _ = run_ingest(tmp_path / "a", tmp_path / "out")
    key, res = _only(results)
    data, meta = load(tmp_path / "out", key)
    assert meta.dtype == "float32" and res["dtype"] == "float32"
    np.testing.assert_array_equal(data, vol)


@pytest.mark.parametrize("bits_stored,signed,intercept", [(12, 1, -7), (12, 0, -7), (16, 1, -7), (16, 0, -32768)])
def test_raw_reads_match_pydicom_and_header_reread(tmp_path, bits_stored, signed, intercept):
    """Also uint16 words above 32767 that fit int16 once rescaled (read in place, wrapped exactly)."""
    rng = np.random.default_rng(bits_stored + signed)
    folder = tmp_path / "a"
    files = write_series(np.zeros((5, 12, 10)), (2.0, 1.0, 1.0), folder)
    for f in files:  # stored words with junk in the unused high bits, as some scanners write
        ds = pydicom.dcmread(f)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, signed
        words = rng.integers(0, 2**16, (12, 10), dtype=np.uint16)
        ds.PixelData = words.astype("<u2").tobytes()
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
        ds.save_as(f)
    scan = scan_archive(folder)
    assert all(i.raw_pixels is not None for i in scan.instances)
    plan = plan_studies(scan)[0]
    res = ingest_study(plan, tmp_path / "fast")
    slow_plan = {k: v for k, v in plan.to_dict().items() if k != "headers"}  # an older plan: headers re-read
    ingest_study(slow_plan, tmp_path / "slow")
    fast = read_image(tmp_path / "fast" / "image.zarr").compute()
    slow = read_image(tmp_path / "slow" / "image.zarr").compute()
    ref = np.stack([pydicom.dcmread(f).pixel_array.astype(np.int64) + intercept for f in files])
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(slow, ref)
    assert res["dtype"] == read_meta(tmp_path / "slow" / "image.zarr").dtype == "int16"


def test_files_changed_after_the_scan_are_read_by_pydicom(tmp_path):
    """The raw read checks the PixelData tag at the scan's offset: a file rewritten since (its
    pixels moved) is decoded by pydicom, and one truncated since becomes a dropped slice."""
    vol = ramp_volume()
    files = write_series(vol, (2.0, 1.0, 1.0), tmp_path / "a")
    plan = plan_studies(scan_archive(tmp_path / "a"))[0]
    moved = pydicom.dcmread(files[2])
    moved.ImageComments = "x" * 101  # before PixelData: shifts it by over 100 bytes
    moved.save_as(files[2])
    res = ingest_study(plan, tmp_path / "moved")
    np.testing.assert_array_equal(read_image(tmp_path / "moved" / "image.zarr").compute(), vol)
    assert not any("dropped" in w for w in res["warnings"])
    data = files[4].read_bytes()
    files[4].write_bytes(data[: len(data) - 50])
    res = ingest_study(plan, tmp_path / "cut")
    assert any("slice dropped" in w and str(files[4]) in w for w in res["warnings"])


def _break_pixels(path):
    """Declare JPEG 2000 over bytes that are none: the header scans fine, decoding fails."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\x00not a codestream" * 8])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def test_undecodable_slice_dropped_as_a_gap_or_refused(tmp_path):
    vol = ramp_volume()
    files = write_series(vol, (2.0, 1.0, 1.0), tmp_path / "a")
    _break_pixels(files[2])
    scan = scan_archive(tmp_path / "a")
    assert not scan.issues
    plan = plan_studies(scan)[0]
    res = ingest_study(plan, tmp_path / "warn")
    assert res["shape"] == [5, 10, 12]
    assert any("slice dropped" in w and str(files[2]) in w for w in res["warnings"]), res["warnings"]
    assert any("missing slice" in w for w in res["warnings"]), res["warnings"]
    np.testing.assert_array_equal(read_image(tmp_path / "warn" / "image.zarr").compute(), np.delete(vol, 2, 0))
    with pytest.raises(StudyError, match="cannot decode pixel data") as err:
        ingest_study(plan, tmp_path / "refuse", IngestConfig(on_inconsistency="refuse"))
    assert str(files[2]) in str(err.value)


def test_slices_dropped_in_several_slab_tasks_are_each_named(tmp_path):
    """A series of several slab tasks (40 slices of 512x512 at chunk_mb=1: 2-slice chunks, 32-slice
    slabs): each undecodable slice is reported with its own file, and every other slice lands in
    its place, at every pyramid level."""
    rng = np.random.default_rng(7)
    vol = rng.integers(-1000, 2000, (40, 512, 512)).astype(np.int16)
    files = write_series(vol, (1.0, 0.5, 0.5), tmp_path / "a")
    broken = [3, 35]  # one in each slab task
    for i in broken:
        _break_pixels(files[i])
    cfg = IngestConfig(chunk_mb=1.0)
    res = ingest_study(plan_studies(scan_archive(tmp_path / "a"), cfg)[0], tmp_path / "out", cfg)
    dropped = [w for w in res["warnings"] if "slice dropped" in w]
    assert len(dropped) == 2 and all(any(str(files[i]) in w for w in dropped) for i in broken), dropped
    kept = np.delete(vol, broken, 0)
    image = tmp_path / "out" / "image.zarr"
    assert read_meta(image).levels == 3 and res["chunks"][0] == 2
    np.testing.assert_array_equal(read_image(image).compute(), kept)
    np.testing.assert_array_equal(read_image(image, 1).compute(), downsample(kept, (2, 2, 2)))
