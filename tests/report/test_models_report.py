"""Several models in one study's reports: report.json, report.html and the SR carry one result each."""

from __future__ import annotations

import copy
import json

import highdicom as hd
from pydicom.sr.codedict import codes

from medpipe.config import Config
from medpipe.report import assemble_record, key_findings, validate_report, write_study_report
from medpipe.report.html import render_study_html
from medpipe.report.dicom import NOT_APPLICABLE

HEAD_REASON = "outside model head-ct's domain: body part CHEST, the model needs HEAD"


def _stages(study) -> dict:
    """The fixture's model result as model 'lesion' and a second model that did not apply."""
    stages = copy.deepcopy(study.stages)
    lesion = stages.pop("infer")
    lesion.update(applicable=True, reason="within model lesion's domain: CT, body part CHEST")
    head = {"model": {"name": "head-ct", "version": "2.0", "sha256": "cd" * 32, "path": "/models/h.keras"},
            "output_kind": "slice_classification", "labels": ["normal", "bleed"],
            "applicable": False, "reason": HEAD_REASON, "skipped": HEAD_REASON}
    # completion order: the second configured model finished first
    return {**stages, "infer:head-ct": head, "infer:lesion": lesion}


def _provenance(study) -> dict:
    cfg = Config.model_validate({"models": [{"name": "lesion"}, {"name": "head-ct"}]})
    return {**study.provenance, "config": cfg.model_dump(mode="json")}


def test_report_json_has_one_result_per_model(study):
    doc = assemble_record(study.study_dir.name, _stages(study), study.timings, _provenance(study))
    validate_report(doc)
    lesion, head = doc["models"]
    assert (lesion["name"], lesion["applicable"]) == ("lesion-slice-cnn", True)
    assert lesion["outputs"]["study_label"] == "lesion"
    assert head == {**head, "name": "head-ct", "version": "2.0", "applicable": False, "reason": HEAD_REASON,
                    "outputs": None, "saliency": []}
    assert doc["model"]["name"] == "lesion-slice-cnn" and doc["model"]["outputs"]["study_label"] == "lesion"
    score = study.stages["infer"]["study_score"]
    assert key_findings(doc).startswith(
        f"lesion-slice-cnn: lesion (score {score:.2f}); head-ct: not applicable; 2 lesion")


def test_a_not_applicable_model_with_a_score_breaks_the_schema(study):
    doc = assemble_record(study.study_dir.name, _stages(study), study.timings, _provenance(study))
    doc["models"][1]["outputs"] = {"study_score": 0.63, "study_label": "bleed"}
    try:
        validate_report(doc)
    except ValueError as exc:
        assert "models/1/outputs" in str(exc)
    else:
        raise AssertionError("a score on a not-applicable model passed the schema")


def test_sr_has_one_qualitative_evaluation_per_model(study):
    doc = assemble_record(study.study_dir.name, _stages(study), study.timings, _provenance(study))
    written = write_study_report(study.study_dir, doc, Config(), study.files)
    assert written["sr"] == "sr.dcm"
    validate_report(json.loads((study.study_dir / "report.json").read_text()))
    sr = hd.sr.srread(study.study_dir / "sr.dcm")
    groups = [g for g in sr.content.get_image_measurement_groups() if g.get_qualitative_evaluations()]
    assert len(groups) == 2
    by_model = {}
    for g in groups:
        (evaluation,) = g.get_qualitative_evaluations()
        by_model[g.tracking_identifier.split(":")[0]] = evaluation
    assert by_model.keys() == {"lesion-slice-cnn", "head-ct"}
    assert by_model["lesion-slice-cnn"].value.value == codes.SCT.Present.value
    assert by_model["lesion-slice-cnn"].name == codes.SCT.Lesion
    assert by_model["head-ct"].value.value == NOT_APPLICABLE.value
    assert any(g.tracking_identifier.startswith("head-ct: not applicable") for g in groups)


def test_html_lists_every_model_and_why_not(study):
    doc = assemble_record(study.study_dir.name, _stages(study), study.timings, _provenance(study))
    html = render_study_html(doc, study_dir=study.study_dir)
    section = html[html.index('<section id="models">'):html.index("</section>", html.index('<section id="models">'))]
    assert "lesion-slice-cnn" in section and "head-ct" in section and "not applicable" in section
    assert "body part CHEST, the model needs HEAD" in section
    assert f"{study.stages['infer']['study_score']:.3f}" in section


def test_single_model_report_unchanged_but_for_models(study):
    """Reports of one model keep `model` as before; `models` holds the same result once."""
    doc = assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance)
    (only,) = doc["models"]
    assert only["applicable"] is True and only["reason"] is None
    assert {k: v for k, v in only.items() if k not in ("applicable", "reason")} == doc["model"]
    assert key_findings(doc).startswith(f"lesion (score {study.stages['infer']['study_score']:.2f}); 2 lesion")
