"""Which model runs where, end to end in the library: real DICOM files are scanned, planned and
ingested, each configured model is run (or not) through ``infer_study``, and ``medpipe.report``
turns the results into report.json (one entry per model) and run.json's per-model outcomes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from inference_helpers import TINY
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medpipe.config import Config
from medpipe.ingest import ingest_study, plan_studies, scan_archive
from medpipe.inference.domain import Facts
from medpipe.inference.stage import infer_study, plan_models
from medpipe.phantom import ct_phantom
from medpipe.report import assemble_record, key_findings, validate_report
from medpipe.report.record import model_outcomes
from medpipe.sample import write_series

SHAPE, SPACING = (20, 128, 128), (2.5, 2.0, 2.0)
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _ct(root: Path, body_part: str | None, uid: str) -> None:
    hu = ct_phantom(SHAPE, SPACING, n_lesions=2, seed=3).hu
    tags = {"BodyPartExamined": body_part} if body_part else {}
    write_series(hu, SPACING, root / uid, modality="CT", study_uid=uid, intercept=-1024.0, **tags)


def _rgb(root: Path, modality: str, sop_class: str, uid: str) -> None:
    """One RGB frame without patient geometry, as an ultrasound or a photograph is stored."""
    rgb = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid, generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = modality, "Test^Rgb", "RGB-1"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 64, 80, 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    (root / uid).mkdir(parents=True)
    ds.save_as(root / uid / "IMG1", enforce_file_format=True)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """(plan, study folder) by name: chest CT, head CT, CT without BodyPartExamined, US, photograph."""
    root = tmp_path_factory.mktemp("archive")
    out = tmp_path_factory.mktemp("studies")
    uids = {"chest": "1.2.826.0.1.1", "head": "1.2.826.0.1.2", "unknown": "1.2.826.0.1.3",
            "us": "1.2.826.0.1.4", "photo": "1.2.826.0.1.5"}
    _ct(root, "CHEST", uids["chest"])
    _ct(root, "HEAD", uids["head"])
    _ct(root, None, uids["unknown"])
    _rgb(root, "US", US_IMAGE, uids["us"])
    _rgb(root, "OT", SECONDARY_CAPTURE, uids["photo"])
    plans = plan_studies(scan_archive(root))
    by_uid = {}
    for plan in plans:
        assert plan.files, plan.skip_reason
        ingest_study(plan, out / plan.study_key)
        by_uid[plan.study_key] = (plan.to_dict(), out / plan.study_key)
    from medpipe.keys import study_key

    return {name: by_uid[study_key(uid)] for name, uid in uids.items()}


def _two_models(tiny_model: Path) -> Config:
    return Config.model_validate({"models": [
        {"name": "chest", "saliency_slices": 1},
        {"name": "any-ct", "path": str(tiny_model), "input_size": TINY, "batch_size": 5, "saliency_slices": 1,
         "domain": {"modalities": ["CT"], "min_slices": 4}},
    ]})


def _run(plan: dict, study_dir: Path, cfg: Config) -> dict[str, dict]:
    """What the flow does for one study: infer:<name> for the models that apply, the others
    as not applicable without running."""
    facts = Facts.from_plan(plan).to_dict()
    results = {}
    for m in plan_models(cfg, facts):
        key = f"infer:{m['name']}"
        results[key] = infer_study(study_dir, plan["modality"], cfg, m["name"], facts) if m["applicable"] \
            else m["result"]
    return results


def _report(name: str, plan: dict, results: dict, cfg: Config) -> dict:
    doc = assemble_record(name, {"plan": plan, **results}, {}, {"run_id": "r", "config": cfg.model_dump(mode="json")})
    validate_report(doc)
    return doc


@pytest.mark.parametrize("name, reasons", [
    ("head", ["body part HEAD, the model needs CHEST"]),
    ("unknown", ["no BodyPartExamined (body part unknown, the model needs CHEST)"]),
    ("us", ["modality US is not covered (covers CT)", "photometric interpretation RGB, the model needs MONOCHROME2",
            "no ImageOrientationPatient"]),
    ("photo", ["modality OT is not covered (covers CT)", "photometric interpretation RGB"]),
])
def test_default_model_not_applicable_with_no_score(ingested, name, reasons):
    plan, study_dir = ingested[name]
    cfg = Config()
    facts = Facts.from_plan(plan)
    res = infer_study(study_dir, plan["modality"], cfg, facts=facts)  # the stage itself re-checks
    assert res["applicable"] is False and res["reason"].startswith("outside model medpipe-lesion-slice-cnn's domain")
    assert all(r in res["reason"] for r in reasons), res["reason"]
    assert not {"study_score", "study_label", "slice_scores", "saliency"} & res.keys()
    assert not (study_dir / "saliency").exists()
    (planned,) = plan_models(cfg, facts)  # the flow's decision, before any task
    assert planned["applicable"] is False and planned["result"]["reason"] == res["reason"]

    doc = _report(name, plan, {"infer": res}, cfg)
    (entry,) = doc["models"]
    assert entry["applicable"] is False and entry["outputs"] is None and entry["reason"] == res["reason"]
    assert entry["name"] == "medpipe-lesion-slice-cnn" and len(entry["sha256"]) == 64
    assert doc["model"]["outputs"]["study_score"] is None and doc["model"]["skipped"] == res["reason"]
    assert key_findings(doc) is None or "score" not in key_findings(doc)


def test_chest_ct_runs_the_default_model(ingested):
    plan, study_dir = ingested["chest"]
    res = infer_study(study_dir, "CT", Config(), facts=Facts.from_plan(plan))
    assert res["applicable"] is True and "body part CHEST, axial, 20 slices" in res["reason"]
    assert len(res["slice_scores"]) == SHAPE[0] and res["study_label"] in ("lesion", "no_lesion")


def test_study_matching_two_models_gets_two_results(ingested, tiny_model):
    plan, study_dir = ingested["chest"]
    cfg = _two_models(tiny_model)
    results = _run(plan, study_dir, cfg)
    assert list(results) == ["infer:chest", "infer:any-ct"]
    assert all(r["applicable"] and r["study_score"] is not None for r in results.values())
    # The second model writes beside the first, never over it.
    assert results["infer:chest"]["saliency"][0]["png"].startswith("saliency/slice_")
    assert results["infer:any-ct"]["saliency"][0]["png"].startswith("saliency/any-ct/slice_")
    assert all((study_dir / r["saliency"][0]["png"]).is_file() for r in results.values())

    doc = _report("chest", plan, dict(reversed(results.items())), cfg)  # completion order does not matter
    assert [m["name"] for m in doc["models"]] == ["chest", "any-ct"]  # configured names over the cards'
    assert doc["models"][0]["version"] == "1.0.0" and doc["models"][1]["version"] == "0.1"
    assert all(m["applicable"] and m["outputs"]["study_score"] is not None for m in doc["models"])
    assert doc["model"] == {k: v for k, v in doc["models"][0].items() if k not in ("applicable", "reason")}
    assert key_findings(doc).startswith("chest: ") and "; any-ct: " in key_findings(doc)
    outcomes = model_outcomes(results)
    assert set(outcomes) == {"chest", "any-ct"} and all(o["applicable"] for o in outcomes.values())
    assert outcomes["any-ct"]["score"] == pytest.approx(results["infer:any-ct"]["study_score"])


def test_head_ct_runs_only_the_model_whose_domain_it_is_in(ingested, tiny_model):
    plan, study_dir = ingested["head"]
    cfg = _two_models(tiny_model)
    results = _run(plan, study_dir, cfg)
    assert results["infer:chest"]["applicable"] is False and "study_score" not in results["infer:chest"]
    assert results["infer:any-ct"]["applicable"] is True
    doc = _report("head", plan, results, cfg)
    chest, other = doc["models"]
    assert chest["applicable"] is False and chest["outputs"] is None and chest["saliency"] == []
    assert other["applicable"] is True and other["outputs"]["study_label"] is not None
    assert "chest: not applicable" in key_findings(doc)
    assert model_outcomes(results)["chest"] == {"applicable": False, "reason": results["infer:chest"]["reason"]}


def test_photograph_runs_no_model(ingested, tiny_model):
    plan, study_dir = ingested["photo"]
    results = _run(plan, study_dir, _two_models(tiny_model))
    assert [r["applicable"] for r in results.values()] == [False, False]
    assert "modality OT is not covered (covers CT)" in results["infer:any-ct"]["reason"]
