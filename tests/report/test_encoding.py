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
