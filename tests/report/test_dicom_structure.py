"""medpipe.report.dicom_structure finds every damage pydicom finds in medpipe's own objects.

The check of a study's DICOM outputs before publishing walks their bytes
(:func:`medpipe.publish._check_dicom`); pydicom reading and converting every element
(:func:`medpipe.publish._check_dicom_pydicom`) is the reference it is compared with.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from medpipe import publish
from medpipe.report import assemble_record, dicom
from medpipe.report.dicom_structure import structure
from medpipe.report.encoding import encode_dataset
from medpipe.report.record import jsonable


@pytest.fixture
def files(study, tmp_path: Path) -> dict[str, bytes]:
    record = jsonable(assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance))
    made = dicom.make_objects(study.study_dir, record, study.files, {})
    return {kind: encode_dataset(made.datasets[kind]) for kind in ("seg", "sr", "report")}


def _cuts(n: int, count: int = 60) -> list[int]:
    return sorted({*range(0, n, max(1, n // count)), *range(max(0, n - 16), n)})


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom on values cut short
@pytest.mark.parametrize("kind", ["seg", "sr"])
def test_every_cut_pydicom_finds_is_found(files: dict[str, bytes], tmp_path: Path, kind: str) -> None:
    data = files[kind]
    whole = tmp_path / f"{kind}.dcm"
    whole.write_bytes(data)
    assert publish._check_dicom(whole, kind) is None and publish._check_dicom_pydicom(whole, kind) is None
    found = structure(data)
    assert found is not None and found.problem is None and "SOPInstanceUID" in found.top
    missed, flagged = [], 0
    for n in _cuts(len(data)):
        path = tmp_path / f"cut-{n}.dcm"
        path.write_bytes(data[:n])
        try:
            reference = publish._check_dicom_pydicom(path, kind)
        except Exception as exc:  # noqa: BLE001 - the reference's complaint, as _check_file takes it
            reference = str(exc)
        mine = publish._check_dicom(path, kind)
        if mine is None and reference is not None:
            missed.append((n, reference))
        flagged += mine is not None
        path.unlink()
    assert missed == []  # the walker is at least as strict as pydicom
    assert flagged >= len(_cuts(len(data))) - 2  # a cut between two top-level elements may look whole


def test_a_damaged_length_inside_an_item_is_found(files: dict[str, bytes]) -> None:
    data = bytearray(files["seg"])
    at = data.index(b"\x08\x00\x55\x11UI")  # ReferencedSOPInstanceUID, deep in the per-frame groups
    length = struct.unpack_from("<H", data, at + 6)[0]
    struct.pack_into("<H", data, at + 6, length + 2)
    problem = structure(bytes(data)).problem
    assert problem is not None and "(0008,1155)" in problem


def test_the_pixel_check_reads_the_header(files: dict[str, bytes]) -> None:
    found = structure(files["seg"])
    assert found.top["BitsAllocated"] == 1 and found.top["Rows"] == 96 and found.top["NumberOfFrames"] > 0
    assert found.pixel_bytes == (found.top["NumberOfFrames"] * 96 * 96 + 7) // 8


def test_other_transfer_syntaxes_are_left_to_pydicom(files: dict[str, bytes], tmp_path: Path) -> None:
    assert structure(files["report"]) is None  # implicit VR little endian
    path = tmp_path / "report.dcm"
    path.write_bytes(files["report"])
    assert publish._check_dicom(path, "report") is None
    path.write_bytes(files["report"][: len(files["report"]) // 2])
    assert publish._check_dicom(path, "report")
    assert structure(b"\0" * 200).problem.startswith("no DICM")
