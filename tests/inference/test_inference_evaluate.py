"""Evaluation over a tiny labelled archive, labels files, and training the default model briefly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medpipe.config import Config
from medpipe.errors import InputError
from medpipe.inference.evaluate import binary_metrics, evaluate_archive, make_labelled_volumes, read_labels_file
from medpipe.inference.model import file_sha256, validate_model


def test_binary_metrics_known_values():
    m = binary_metrics(np.array([0, 0, 0, 1, 1]), np.array([0.2, 0.7, 0.1, 0.8, 0.4]))
    assert m["confusion"] == {"tp": 1, "fp": 1, "tn": 2, "fn": 1}
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (0.6, 0.5, 0.5, 0.5)
    assert m["roc_auc"] == pytest.approx(5 / 6)
    assert binary_metrics(np.array([1, 1]), np.array([0.9, 0.8]))["roc_auc"] is None


def test_labels_files(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps({"1.2.3": 1, "abc": 0}))
    assert read_labels_file(tmp_path / "l.json") == {"1.2.3": 1, "abc": 0}
    (tmp_path / "l.csv").write_text("study,label\n1.2.3,1\nabc,0\n")
    assert read_labels_file(tmp_path / "l.csv") == {"1.2.3": 1, "abc": 0}
    (tmp_path / "bad.csv").write_text("study,label\nx,2\n")
    with pytest.raises(InputError, match="labels must be 0 or 1"):
        read_labels_file(tmp_path / "bad.csv")
    (tmp_path / "nohead.csv").write_text("x,1\n")
    with pytest.raises(InputError, match="study,label"):
        read_labels_file(tmp_path / "nohead.csv")


def test_evaluate_archive_with_default_model(tmp_path):
    labels = make_labelled_volumes(tmp_path / "archive", 6, seed=77)
    rec = evaluate_archive(tmp_path / "archive", labels, tmp_path / "eval", Config())
    m = rec["metrics"]
    assert m["n"] == 6 and m["positives"] == 3 and not rec["errors"]
    assert set(m) >= {"accuracy", "precision", "recall", "f1", "roc_auc"}
    assert m["roc_auc"] >= 0.8  # the trained default model separates phantom studies
    for name in ("evaluation.json", "evaluation.md", "evaluation.html", "roc.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["metrics"] == m


def test_train_default_small(tmp_path):
    from medpipe.config import ModelConfig
    from medpipe.inference.train import train_default

    card = train_default(tmp_path, n_volumes=4, epochs=1, heldout_studies=2)
    assert card["sha256"] == file_sha256(tmp_path / "model.keras")
    assert set(card["metrics"]) == {"slice_heldout", "study_heldout"}
    assert {"accuracy", "precision", "recall", "f1", "roc_auc"} <= set(card["metrics"]["slice_heldout"])
    assert (tmp_path / "MODEL_CARD.md").read_text().startswith("# Model card")
    info = validate_model(ModelConfig(path=tmp_path / "model.keras"))
    assert info.sha256 == card["sha256"] and info.spacing_mm == 2.0


def test_evaluate_dicom_archive_labelled_by_study_uid(tmp_path):
    """A DICOM archive is ingested first; labels name studies by StudyInstanceUID."""
    from medpipe.inference.data import random_phantom
    from medpipe.sample.series import stable_uid, write_series

    rng = np.random.default_rng(11)
    labels = {}
    for i, lesions in enumerate((True, False)):
        ph = random_phantom(rng, lesions=lesions)
        uid = stable_uid("inference-test", i)
        write_series(ph.hu.astype(np.float32), ph.spacing, tmp_path / "dicom" / f"s{i}", study_uid=uid,
                     series_uid=stable_uid("inference-test-series", i), intercept=-1024.0)
        labels[uid] = int(lesions)
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    rec = evaluate_archive(tmp_path / "dicom", tmp_path / "labels.json", tmp_path / "out", Config())
    assert rec["metrics"]["n"] == 2 and not rec["errors"] and not rec["unlabelled"]
    assert sorted(p.name for p in (tmp_path / "out" / "studies").iterdir()) == sorted(r["study"] for r in rec["studies"])
