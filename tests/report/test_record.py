import json

import jsonschema
import pytest

from medpipe.config import Config
from medpipe.report import assemble_record, report_schema, validate_report, write_study_report
from medpipe.report.schema import SCHEMA_VERSION


def test_schema_is_valid_draft_2020_12():
    schema = report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert SCHEMA_VERSION in schema["properties"]["schema_version"]["enum"]


def test_full_record_validates_and_keeps_no_paths(study):
    doc = assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance, ["flow warning"])
    validate_report(doc)
    assert doc["status"] == "ok" and doc["error"] is None
    assert doc["shape"] == [20, 96, 96] and doc["spacing"] == [2.5, 2.0, 2.0]
    assert doc["series"]["used"]["instances"] == len(study.files)
    assert doc["series"]["skipped"][0] == {"series_key": "loc01", "description": "LOCALIZER", "modality": "CT",
                                           "instances": 1, "reason": "fewer than 4 slices"}
    assert doc["warnings"] == ["flow warning", "one localizer image ignored"]
    assert doc["issues"] == [{"path": "archive/junk.txt", "reason": "not a DICOM file"}]
    assert doc["model"]["outputs"]["study_label"] == "lesion" and doc["model"]["sha256"] == "ab" * 32
    assert doc["segmentation"]["labels"]["5"] == "lesion"
    text = json.dumps(doc)
    assert "Doe^Jane" not in text and "IM0000" not in text and "/models/" not in text


def test_every_stage_may_be_missing():
    for stages in ({}, {"plan": {"study_key": "k", "files": ["a"], "series_key": "s"}},
                   {"plan": {}, "ingest": {"modality": "MR", "shape": [1, 2, 3], "spacing": [1, 1, 1]}}):
        doc = assemble_record("k", stages, {"ingest": 0.1}, {"run_id": None}, error="ingest: broken")
        validate_report(doc)
        assert doc["status"] == "failed" and doc["segmentation"] is None and doc["model"] is None


def test_stage_error_fails_the_study_and_skipped_inference_is_kept():
    doc = assemble_record("k", {"infer": {"skipped": "model disabled"}, "segment": {"error": "out of memory"}}, {}, {})
    validate_report(doc)
    assert doc["status"] == "failed" and "segment: out of memory" == doc["error"]
    assert doc["model"]["skipped"] == "model disabled"


def test_nan_and_numpy_values_become_json():
    import numpy as np

    seg = {"method": "otsu", "labels": {np.int64(1): "fg"},
           "measurements": [{"label": np.int32(1), "name": "fg", "voxels": np.int64(3), "volume_ml": np.float32(0.5),
                             "mean": float("nan"), "std": np.float64(1.0), "bbox": np.arange(6).reshape(2, 3)}],
           "lesion_candidates": []}
    doc = assemble_record("k", {"segment": seg}, {}, {})
    validate_report(doc)
    json.dumps(doc, allow_nan=False)
    assert doc["segmentation"]["measurements"][0]["mean"] is None


def test_validate_lists_problems():
    doc = assemble_record("k", {}, {}, {})
    doc["status"] = "maybe"
    del doc["timings"]
    with pytest.raises(ValueError, match="status") as info:
        validate_report(doc)
    assert "timings" in str(info.value)


def test_write_study_report_json_and_html(study):
    doc = assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance)
    written = write_study_report(study.study_dir, doc, Config())
    assert written == {"html": "report.html", "json": "report.json"}
    saved = json.loads((study.study_dir / "report.json").read_text())
    validate_report(saved)
    assert saved["outputs"] == written
    cfg = Config.model_validate({"report": {"html": False}})
    assert write_study_report(study.study_dir, doc, cfg) == {"json": "report.json"}


def test_write_refuses_invalid_record(study):
    with pytest.raises(ValueError, match="schema"):
        write_study_report(study.study_dir, {"study_key": "k"}, Config())
    assert not (study.study_dir / "report.json").exists()
