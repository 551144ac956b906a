"""No patient data out: canaries in every Annex E basic-profile attribute never reach OUT."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ingest_helpers import ramp_volume

from medpipe.atomic import write_json, write_text
from medpipe.config import IngestConfig
from medpipe.ingest import format_plan, ingest_study, plan_studies, scan_archive
from medpipe.sample import write_series

# DICOM PS3.15 Annex E basic profile attributes (string-valued ones we can plant), each a canary.
TEXT_ATTRS = [
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
    "PatientAddress", "PatientTelephoneNumbers", "MilitaryRank", "BranchOfService", "EthnicGroup", "Occupation",
    "AdditionalPatientHistory", "PatientComments", "MedicalRecordLocator", "IssuerOfPatientID",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "PerformingPhysicianName", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "OperatorsName", "DeviceSerialNumber",
    "StationName", "StudyDescription", "SeriesDescription", "ImageComments", "ProtocolName",
    "DerivationDescription", "PerformedProcedureStepDescription", "PerformedProcedureStepID",
    "RequestedProcedureDescription", "RequestedProcedureID", "ScheduledProcedureStepDescription",
    "AdmittingDiagnosesDescription", "PatientState", "ResponsiblePerson", "ResponsibleOrganization",
    "DetectorID", "GantryID", "PlateID", "CassetteID", "SoftwareVersions", "InstitutionCodeSequence",
]
DATE_ATTRS = {"PatientBirthDate": "19230417", "StudyDate": "19310922", "SeriesDate": "19320823",
              "AcquisitionDate": "19330724", "ContentDate": "19340625"}
TIME_ATTRS = {"StudyTime": "071317", "SeriesTime": "081419", "AcquisitionTime": "091521", "ContentTime": "101623"}
UID_ATTRS = {"StudyInstanceUID": "1.2.999.4242.1", "SeriesInstanceUID": "1.2.999.4242.2",
             "FrameOfReferenceUID": "1.2.999.4242.3"}
PRIVATE_CANARY = "CNRYPRIVATE77"


def _canaries() -> dict[str, str]:
    values = {}
    for i, kw in enumerate(TEXT_ATTRS):
        if kw.endswith("Sequence"):
            continue
        values[kw] = f"CNRY{i:03d}Q" if not kw.endswith("Name") else f"CNRY{i:03d}^Q"
    return values


def _write_canary_series(root: Path) -> dict[str, str]:
    text = _canaries()
    tags = {k: v for k, v in text.items() if k not in ("SeriesDescription", "PatientName", "PatientID")}
    tags.update({k: v for k, v in DATE_ATTRS.items() if k not in ("PatientBirthDate", "StudyDate")})
    tags.update({k: v for k, v in TIME_ATTRS.items()})
    tags["FrameOfReferenceUID"] = UID_ATTRS["FrameOfReferenceUID"]
    files = write_series(
        ramp_volume(), (2.0, 1.0, 1.0), root / "series", modality="CT",
        study_uid=UID_ATTRS["StudyInstanceUID"], series_uid=UID_ATTRS["SeriesInstanceUID"],
        patient_name=text["PatientName"], patient_id=text["PatientID"],
        patient_birth_date=DATE_ATTRS["PatientBirthDate"], study_date=DATE_ATTRS["StudyDate"],
        series_description=text["SeriesDescription"] + " AX", **tags,
    )
    import pydicom

    sops = {}
    for f in files:  # private tags with a canary, and remember the SOP Instance UIDs
        ds = pydicom.dcmread(f)
        block = ds.private_block(0x0011, "CANARY CREATOR", create=True)
        block.add_new(0x01, "LO", PRIVATE_CANARY)
        ds.save_as(f)
        sops[f"SOP{f.name}"] = str(ds.SOPInstanceUID)
    return {**text, **DATE_ATTRS, **TIME_ATTRS, **UID_ATTRS, **sops, "private": PRIVATE_CANARY}


def _run(root: Path, out: Path, cfg: IngestConfig) -> None:
    """Everything ingest produces, as the flow would store it under OUT (plan, text, results, logs)."""
    handler = logging.FileHandler(out / "ingest.log")
    logger = logging.getLogger("medpipe")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        scan = scan_archive(root, cfg)
        plans = plan_studies(scan, cfg)
        write_text(out / "plan.txt", format_plan(plans, scan.issues))
        write_json(out / "plans.json", [p.to_dict() for p in plans])
        for p in plans:
            result = ingest_study(p, out / "studies" / p.study_key, cfg)
            write_json(out / "studies" / p.study_key / "ingest.json", result)
    finally:
        logger.removeHandler(handler)
        handler.close()


def _leaks(out: Path, canaries: dict[str, str]) -> dict[str, str]:
    found = {}
    needles = {}
    for name, value in canaries.items():
        forms = {value, value.replace("^", " ")}
        if name in DATE_ATTRS:
            forms.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
        needles[name] = [f.encode() for f in forms]
    for path in out.rglob("*"):
        blob = str(path.relative_to(out)).encode() + b"\n" + (path.read_bytes() if path.is_file() else b"")
        for name, forms in needles.items():
            if any(f in blob for f in forms):
                found[name] = str(path.relative_to(out))
    return found


def test_no_annex_e_attribute_reaches_out(tmp_path):
    out = tmp_path / "OUT"
    out.mkdir()
    canaries = _write_canary_series(tmp_path / "archive")
    planted = set(_leaks(tmp_path / "archive", canaries))  # every canary really is in the input
    assert planted == set(canaries)
    _run(tmp_path / "archive", out, IngestConfig())
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "zarr.json" for p in files) and (out / "plans.json").stat().st_size > 0
    assert _leaks(out, canaries) == {}
    plans = json.loads((out / "plans.json").read_text())
    assert plans[0]["series_description"] == "AX"  # the canary word is cleaned away


def test_dates_kept_only_when_configured(tmp_path):
    """Positive control: the same search does find a value medpipe is told to keep."""
    out = tmp_path / "OUT"
    out.mkdir()
    canaries = _write_canary_series(tmp_path / "archive")
    _run(tmp_path / "archive", out, IngestConfig(keep_dates=True))
    assert set(_leaks(out, canaries)) == {"StudyDate"}
