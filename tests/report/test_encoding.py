"""medpipe.report.encoding writes the bytes pydicom writes, for the objects medpipe makes."""

from __future__ import annotations

import io

import pydicom
import pytest

from medpipe.pacs.identity import load_uid_key
from medpipe.report import assemble_record
from medpipe.report import dicom
from medpipe.report import encoding
from medpipe.report.encoding import encode_dataset
from medpipe.report.record import jsonable


def _pydicom(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def made(study):
    record = jsonable(assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance))
    objects = dicom.make_objects(study.study_dir, record, study.files, {})
    assert {"seg", "sr"} <= set(objects.datasets)
    assert objects.datasets["seg"].file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    return study, objects.datasets


def test_seg_and_sr_bytes_equal_pydicom(made):
    _, datasets = made
    for kind, ds in datasets.items():
        want = _pydicom(ds)
        assert encode_dataset(ds) == want, kind
        assert encode_dataset(ds) == want, kind  # the same again (nothing cached across calls)
        if ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian:  # SEG, SR
            # by this module's own encoder, not by its fallback to pydicom
            assert encoding._header(ds) + encoding._Encoder().dataset(ds, "iso8859") == want, kind


def test_new_objects_are_encoded_here_before_pydicom_wrote_them(made):
    """A new SEG's PixelData has the ambiguous VR 'OB or OW' until pydicom writes it once; the
    encoder resolves it by pydicom's rule instead of handing the whole object to pydicom."""
    _, datasets = made
    for kind in ("seg", "sr"):
        ds = datasets[kind]
        mine = encoding._header(ds) + encoding._Encoder().dataset(ds, "iso8859")  # no fallback
        assert mine == _pydicom(ds), kind


def test_deidentified_and_reread_objects_equal_pydicom(made):
    study, datasets = made
    key = load_uid_key(study.study_dir.parent.parent)
    for kind, ds in datasets.items():
        out = dicom.deidentify(ds, study.study_dir.name, key)  # read back from bytes, then edited
        assert encode_dataset(out) == _pydicom(out), kind
        reread = pydicom.dcmread(io.BytesIO(_pydicom(ds)))  # raw elements, as read from a file
        assert encode_dataset(reread) == _pydicom(reread), kind


def test_other_transfer_syntaxes_go_to_pydicom(made):
    _, datasets = made
    ds = datasets["sr"]
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    assert encode_dataset(ds) == _pydicom(ds)


def _with_private_and_nested_identity(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with what real sources bring along: private elements (at the top and in an item)
    and identity attributes inside a sequence item."""
    ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x01, "LO", "secret")
    seq = next(e for e in ds if e.VR == "SQ" and len(e.value))
    item = seq.value[0]
    item.private_block(0x0011, "ACME 1.0", create=True).add_new(0x02, "LO", "secret too")
    item.InstitutionName, item.PatientName, item.StudyDate = "St Example Hospital", "Doe^Jane", "20240102"
    return ds


def test_deidentified_bytes_equal_the_library_path(made):
    """deidentified_bytes (an edit on the way into the file) writes what deidentify (a copy
    read back by pydicom, then edited) gives pydicom to write; the identified object is kept."""
    study, datasets = made
    key = load_uid_key(study.study_dir.parent.parent)
    assert {"seg", "sr", "report"} <= set(datasets)
    for kind, ds in datasets.items():
        ds = _with_private_and_nested_identity(ds)
        before = _pydicom(ds)
        want = _pydicom(dicom.deidentify(ds, study.study_dir.name, key))
        got = dicom.deidentified_bytes(ds, study.study_dir.name, key)
        assert got == want, kind
        assert _pydicom(ds) == before, kind
        back = pydicom.dcmread(io.BytesIO(got))
        assert back.PatientID == study.study_dir.name and "secret" not in repr(back), kind
        assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID != ds.SOPInstanceUID, kind


def test_an_edit_through_the_pydicom_fallback_writes_the_same(made):
    study, datasets = made
    key = load_uid_key(study.study_dir.parent.parent)
    ds = _with_private_and_nested_identity(datasets["sr"])
    want = dicom.deidentified_bytes(ds, study.study_dir.name, key)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian  # not encoded here: pydicom's
    got = dicom.deidentified_bytes(ds, study.study_dir.name, key)
    back, ref = pydicom.dcmread(io.BytesIO(got)), pydicom.dcmread(io.BytesIO(want))
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert back.SOPInstanceUID == ref.SOPInstanceUID and back.PatientID == ref.PatientID
    assert "secret" not in repr(back) and back.ContentSequence == ref.ContentSequence


def test_parts_are_the_file_with_the_pixel_data_not_copied(made):
    study, datasets = made
    seg = datasets["seg"]
    parts = encoding.encode_parts(seg)
    assert b"".join(map(encoding.part_bytes, parts)) == _pydicom(seg)
    assert any(part is seg.PixelData for part in parts)  # the dataset's own value (a buffer), not a copy
    assert seg["PixelData"].is_buffered  # the SEG's pixel data waits in a temporary file
    key = load_uid_key(study.study_dir.parent.parent)
    parts = dicom.deidentified_parts(seg, study.study_dir.name, key)
    assert any(part is seg.PixelData for part in parts)
    assert b"".join(map(encoding.part_bytes, parts)) == _pydicom(dicom.deidentify(seg, study.study_dir.name, key))
