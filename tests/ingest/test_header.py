"""The fast header reader: it declines, or gives exactly what the pydicom path gives."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pydicom
import pytest
from ingest_helpers import ramp_volume
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medpipe.ingest import header as hdr
from medpipe.ingest import scan
from medpipe.ingest.scan import FileIssue, Instance, read_instance
from medpipe.sample import write_series


def _fast(path: Path | str) -> hdr.Header | None:
    with open(path, "rb") as fp:
        return hdr.read_header(fp, os.path.getsize(path))


def _both(path: Path | str, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """read_instance as it is (fast path first) and with pydicom only; records as dicts, or the error."""
    def run() -> object:
        try:
            rec = read_instance(path)
        except Exception as exc:  # the pydicom path lets some conversion errors through
            return repr(exc)
        return rec.to_dict() if isinstance(rec, Instance | FileIssue) else rec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = run()
        with monkeypatch.context() as m:
            m.setattr(scan, "read_header", lambda fp, size: None)
            slow = run()
    return fast, slow


def _assert_same(path: Path | str, monkeypatch: pytest.MonkeyPatch, *, accepted: bool | None = True) -> dict:
    fast, slow = _both(path, monkeypatch)
    assert fast == slow, path
    if accepted is not None:
        assert (_fast(path) is not None) == accepted, path
    return fast  # type: ignore[return-value]


def _save(ds: Dataset, path: Path, implicit: bool) -> Path:
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    with warnings.catch_warnings():  # some tests write invalid values on purpose
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True, implicit_vr=implicit)
    return path


def _series(tmp_path: Path, implicit: bool) -> list[Path]:
    """A sample series with shuffled names without extension; rewritten in implicit VR if asked."""
    files = write_series(ramp_volume((4, 10, 12)), (2.5, 0.7, 0.8), tmp_path / "s",
                         file_names=[f"f{k}" for k in range(4)], shuffle=True, series_description="Thorax",
                         slope=1.0, intercept=-1024.0)
    if implicit:
        for f in files:
            _save(pydicom.dcmread(f), f, implicit=True)
    return files


def test_wanted_elements_match_the_dicom_dictionary():
    for tag, (keyword, vr) in {**hdr.WANTED, **{t: (k, "SQ") for t, k in hdr.PRESENCE.items()},
                               **{t: (k, "UI") for t, k in hdr.META.items()}}.items():
        assert (keyword_for_tag(tag), dictionary_VR(tag)) == (keyword, vr)


def test_every_pydicom_test_file_declined_or_identical(monkeypatch):
    files = [f for f in get_testdata_files() if os.path.isfile(f)]
    assert len(files) > 50
    differ, accepted = [], 0
    for f in files:
        fast, slow = _both(f, monkeypatch)
        if fast != slow:
            differ.append((os.path.basename(f), fast, slow))
        accepted += _fast(f) is not None if os.path.getsize(f) else 0
    assert not differ
    assert accepted > len(files) // 2  # the fast path is the common one
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm"):
        _assert_same(get_testdata_file(name), monkeypatch)


@pytest.mark.parametrize("implicit", [False, True])
def test_sample_series_read_fast_and_identical(tmp_path, monkeypatch, implicit):
    files = _series(tmp_path, implicit)
    for f in files:
        rec = _assert_same(f, monkeypatch)
        assert rec["transfer_syntax"] == (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
        assert rec["raw_pixels"] is not None and rec["rescale"] == (1.0, -1024.0)
        assert rec["series_description"] == "Thorax" and rec["image_type"] == ("ORIGINAL", "PRIMARY", "AXIAL")


def test_bare_dataset_without_file_meta_goes_to_pydicom(tmp_path, monkeypatch):
    files = write_series(ramp_volume((2, 10, 12)), (1.0, 1.0, 1.0), tmp_path, file_meta=False)
    rec = _assert_same(files[0], monkeypatch, accepted=False)
    assert rec["rows"] == 10


def test_bad_files_give_the_same_issue(tmp_path, monkeypatch):
    good = _series(tmp_path, implicit=False)[0]
    data = good.read_bytes()
    cases = {
        "empty": (b"", "empty file (0 bytes)"),
        "text": (b"not a dicom file at all\n" * 20, "not a DICOM file"),
        "preamble": (b"\0" * 128, "not a DICOM file"),
        "preamble-dicm": (b"\0" * 128 + b"DICM", "not a DICOM file"),
        "pixels-cut": (data[:-100], "truncated: pixel data declares 240 bytes, file holds 140"),
        "header-cut": (data[:400], None),
        "pixel-header-cut": (data[: len(data) - 240 - 6], None),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        rec = _assert_same(path, monkeypatch, accepted=None)
        if reason:
            assert rec["reason"].startswith(reason), (name, rec)


def _code(meaning: str, *modifiers: Dataset) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "1", "99X", meaning
    if modifiers:
        item.AnatomicRegionModifierSequence = Sequence(list(modifiers))
    return item


def _undefined_lengths(elem: pydicom.DataElement) -> None:
    """Mark the sequence ``elem`` and every nested sequence and item as of undefined length."""
    elem.is_undefined_length = True
    for item in elem.value:
        item.is_undefined_length_sequence_item = True
        for sub in item:
            if sub.VR == "SQ":
                _undefined_lengths(sub)


def test_nested_undefined_length_sequences_are_skipped(tmp_path, monkeypatch):
    for implicit in (False, True):
        ds = pydicom.dcmread(_series(tmp_path / str(implicit), implicit=False)[0])
        # (0008,2218) comes before the needed (0018,...) elements; items nest two deep
        ds.AnatomicRegionSequence = Sequence([
            _code("outer", _code("inner", _code("innermost"), Dataset())), Dataset(), _code("plain")])
        _undefined_lengths(ds["AnatomicRegionSequence"])
        ds.add_new(0x00091010, "LO", "creator")  # a private sequence: implicit VR finds it by its items
        ds.add_new(0x00091011, "SQ", Sequence([_code("private", _code("x"))]))
        _undefined_lengths(ds[0x00091011])
        # an undefined-length sequence of a defined-length item holding an undefined-length sequence
        ds.add_new(0x00091012, "SQ", Sequence([_code("defined", _code("y"))]))
        ds[0x00091012].is_undefined_length = True
        ds[0x00091012].value[0]["AnatomicRegionModifierSequence"].is_undefined_length = True
        path = _save(ds, tmp_path / f"nested-{implicit}", implicit)
        raw = path.read_bytes()
        assert raw.count(b"\xfe\xff\xdd\xe0") == 7 and b"\xfe\xff\x0d\xe0" in raw  # delimiters written
        rec = _assert_same(path, monkeypatch)
        assert rec["rows"] == 10 and rec["slice_thickness"] == 2.5 and rec["raw_pixels"] is not None


def test_long_header_is_read_in_more_than_one_read(tmp_path, monkeypatch):
    ds = pydicom.dcmread(_series(tmp_path, implicit=False)[0])
    ds.add_new(0x00091010, "LO", "creator")
    ds.add_new(0x00091011, "OB", b"\1" * 200_000)  # before the needed (0018,...) elements
    rec = _assert_same(_save(ds, tmp_path / "long", implicit=False), monkeypatch)
    assert rec["raw_pixels"][0] > 200_000


@pytest.mark.parametrize("charset, text, accepted", [
    ("ISO_IR 100", "Thorax Ärzte", True),
    ("ISO_IR 192", "Thorax 胸部", True),
    ("ISO_IR 6", "Thorax", True),
    ("", "Thorax", True),
    ("ISO 2022 IR 100", "Thorax Ärzte", False),
    (["", "ISO 2022 IR 100"], "Thorax", False),
])
def test_character_sets(tmp_path, monkeypatch, charset, text, accepted):
    ds = pydicom.dcmread(_series(tmp_path, implicit=False)[0])
    ds.SpecificCharacterSet = charset
    ds.SeriesDescription = text
    rec = _assert_same(_save(ds, tmp_path / "cs", implicit=False), monkeypatch, accepted=accepted)
    assert rec["series_description"] == text


def test_odd_values_decline_or_match(tmp_path, monkeypatch):
    base = _series(tmp_path, implicit=False)[0]
    edits = {
        "ss-rows": lambda ds: ds.add_new(0x00280010, "SS", 10),  # unexpected VR: pydicom converts by it
        "blank-is": lambda ds: ds.add_new(0x00200013, "IS", "  "),
        "float-is": lambda ds: ds.add_new(0x00200013, "IS", "7.0"),
        "empty-ds": lambda ds: ds.add_new(0x00180050, "DS", None),
        "short-position": lambda ds: ds.add_new(0x00200032, "DS", [1.0, 2.0]),
        "one-image-type": lambda ds: ds.add_new(0x00080008, "CS", "LOCALIZER"),
        "two-modalities": lambda ds: ds.add_new(0x00080060, "CS", ["CT", "MR"]),
        "padded-uid": lambda ds: ds.add_new(0x0020000E, "UI", "1.2.3.4 "),
        "no-pixels": lambda ds: delattr(ds, "PixelData"),
        "float-pixels": lambda ds: (delattr(ds, "PixelData"), ds.add_new(0x7FE00008, "OF", b"\0" * 480)),
    }
    for name, edit in edits.items():
        ds = pydicom.dcmread(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edit(ds)
        _assert_same(_save(ds, tmp_path / name, implicit=False), monkeypatch,
                     accepted=name not in ("ss-rows", "two-modalities"))


def test_pixel_element_problems_read_the_same(tmp_path, monkeypatch):
    # the one implementation serves both paths; check its messages on both
    data = _series(tmp_path, implicit=True)[0].read_bytes()
    for cut in (1, 100, 239, 240):
        path = tmp_path / f"cut{cut}"
        path.write_bytes(data[:-cut])
        rec = _assert_same(path, monkeypatch)
        assert rec["reason"] == f"truncated: pixel data declares 240 bytes, file holds {240 - cut}"


def test_single_valued_image_type_is_one_value(tmp_path, monkeypatch):
    """ImageType "LOCALIZER" alone (VM 1) marks a localizer on both paths, not its letters."""
    ds = pydicom.dcmread(_series(tmp_path, implicit=False)[0])
    ds.ImageType = "LOCALIZER"
    rec = _assert_same(_save(ds, tmp_path / "loc", implicit=False), monkeypatch)
    assert tuple(rec["image_type"]) == ("LOCALIZER",)


@pytest.mark.parametrize("implicit", [False, True])
def test_body_part_and_photometric_read_fast_and_identical(tmp_path, monkeypatch, implicit):
    """The two facts a model's domain needs: the fast reader gives what pydicom gives."""
    files = write_series(ramp_volume((2, 10, 12)), (2.5, 0.7, 0.8), tmp_path / "s", BodyPartExamined="Chest ")
    for f in files:
        if implicit:
            _save(pydicom.dcmread(f), f, implicit=True)
        rec = _assert_same(f, monkeypatch)
        assert rec["body_part"] == "CHEST" and rec["photometric"] == "MONOCHROME2"
    bare = write_series(ramp_volume((1, 10, 12)), (2.5, 0.7, 0.8), tmp_path / "t")  # no BodyPartExamined
    assert _assert_same(bare[0], monkeypatch)["body_part"] == ""
