"""infer_study on real Zarr studies with real (tiny) Keras models, threaded scheduler."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from medpipe import omezarr
from medpipe.errors import StudyError
from medpipe.inference import model as m
from medpipe.inference.preprocess import preprocess_slices
from medpipe.inference.stage import infer_study, study_score

from inference_helpers import TINY, tiny_cfg, write_study


def test_batches_equal_one_predict(study, tiny_model):
    cfg = tiny_cfg(tiny_model, batch_size=5)  # 16 slices: batches of 5, 5, 5, 1
    res = infer_study(study, "CT", cfg)
    img = omezarr.read_image(study / "image.zarr").compute()
    x = preprocess_slices(img, (4.0, 4.0), size=TINY, window=(-1000, 400))
    import keras

    expected = keras.saving.load_model(tiny_model).predict(x, verbose=0).ravel()
    np.testing.assert_allclose(res["slice_scores"], expected, rtol=1e-5, atol=1e-6)
    assert res["n_slices"] == 16 and res["flags"] == []
    assert res["model"]["sha256"] == m.file_sha256(tiny_model) and res["model"]["name"] == "tiny"


def test_study_score_rule_and_label(study, tiny_model):
    res_max = infer_study(study, "CT", tiny_cfg(tiny_model, saliency_slices=0))
    res_top3 = infer_study(study, "CT", tiny_cfg(tiny_model, saliency_slices=0, study_score="mean_top3",
                                                 threshold=0.0))
    s = np.array(res_max["slice_scores"])
    assert res_max["study_score"] == pytest.approx(s.max()) and res_max["rule"] == "max of slice scores"
    assert res_top3["study_score"] == pytest.approx(np.sort(s)[-3:].mean())
    assert res_top3["study_label"] == "lesion"  # threshold 0: every score is positive
    assert study_score(np.array([np.nan, np.inf]), "max") is None


def test_nan_outputs_are_flagged(tmp_path, tiny_model):
    study = write_study(tmp_path, nan_slices=(3, 4, 9))
    res = infer_study(study, "CT", tiny_cfg(tiny_model))
    assert res["flags"] == ["NaN or infinite outputs on slices 3-4, 9",
                            "NaN or infinite pixel values on slices 3-4, 9"]
    assert [i for i, s in enumerate(res["slice_scores"]) if s is None] == [3, 4, 9]
    assert res["study_score"] is not None
    assert all(r["slice"] not in (3, 4, 9) for r in res["saliency"])


def test_saliency_pngs_for_top_slices(study, tiny_model):
    res = infer_study(study, "CT", tiny_cfg(tiny_model, saliency_slices=3))
    scores = np.array(res["slice_scores"])
    assert [r["slice"] for r in res["saliency"]] == list(np.argsort(scores)[::-1][:3])
    for r in res["saliency"]:
        png = study / r["png"]
        assert png.is_file() and r["png"] == f"saliency/slice_{r['slice']:04d}.png"
        with Image.open(png) as im:
            assert im.size == (2 * TINY, 2 * TINY) and im.mode == "RGB"


def test_default_model_grad_cam(tmp_path):
    """The committed model on a phantom with lesions: finds them, and Grad-CAM writes overlays."""
    from medpipe.config import Config

    study = write_study(tmp_path, n_slices=16, n_lesions=3, seed=5)  # the card's domain: >= 16 slices
    res = infer_study(study, "CT", Config())
    assert res["applicable"] and "header facts not given" in res["reason"]
    assert len(res["slice_scores"]) == 16 and len(res["saliency"]) == 2
    assert all((study / r["png"]).stat().st_size > 100 for r in res["saliency"])


def test_modality_not_covered_is_skipped(study, tiny_model):
    res = infer_study(study, "MR", tiny_cfg(tiny_model))
    assert "modality MR is not covered" in res["skipped"] and "slice_scores" not in res


def test_bad_inputs_are_study_errors(tmp_path, tiny_model):
    with pytest.raises(StudyError, match="no pixel data"):
        infer_study(tmp_path / "empty", "CT", tiny_cfg(tiny_model))
    thin = tmp_path / "thin"
    omezarr.write_image(thin / "image.zarr", np.zeros((4, 1, 40), "int16"), (1, 1, 1), levels=1)
    with pytest.raises(StudyError, match=r"study thin: slices of shape \(1, 40\) are too small"):
        infer_study(thin, "CT", tiny_cfg(tiny_model))


def test_model_failing_mid_run_fails_the_study(study, tmp_path, tiny_model):
    broken = tmp_path / "broken.keras"
    broken.write_bytes(tiny_model.read_bytes()[:500])  # truncated: resolves, fails on load
    with pytest.raises(StudyError, match=r"study study-0: model failed: corrupt model file .*broken\.keras"):
        infer_study(study, "CT", tiny_cfg(broken))


def test_segmentation_model_writes_label_image(study, tiny_segmenter):
    res = infer_study(study, "CT", tiny_cfg(tiny_segmenter, output="segmentation",
                                            labels=["background", "dense"], saliency_slices=1))
    labels = omezarr.read_labels(study / "image.zarr", "model").compute()
    img = omezarr.read_image(study / "image.zarr").compute()
    assert labels.shape == img.shape and set(np.unique(labels)) <= {0, 1}
    assert labels[img > 300].mean() > 0.9 and labels[img < -500].mean() < 0.05  # bone in, air and lung out
    assert omezarr.label_names(study / "image.zarr", "model") == {1: "dense"}
    assert "model" in zarr.open_group(str(study / "image.zarr" / "labels")).attrs["ome"]["labels"]
    assert len(res["saliency"]) == 1


def test_runs_of_batches_give_the_same_scores(study, tiny_model, monkeypatch):
    """Pipelined runs of batches (read the next while predicting) equal one batch per task."""
    from medpipe.inference import stage

    cfg = tiny_cfg(tiny_model, batch_size=2, saliency_slices=0)  # 8 batches
    monkeypatch.setattr(stage, "BATCHES_PER_TASK", 1)
    one = infer_study(study, "CT", cfg, fan_out=True)
    monkeypatch.setattr(stage, "BATCHES_PER_TASK", 8)
    runs = infer_study(study, "CT", cfg, fan_out=True)
    here = infer_study(study, "CT", cfg)  # all batches pipelined in this thread
    assert runs["slice_scores"] == one["slice_scores"] == here["slice_scores"] and len(one["slice_scores"]) == 16


def test_task_runs_split():
    from medpipe.inference.stage import task_runs

    assert [list(r) for r in task_runs(6, 2)] == [[0, 1, 2], [3, 4, 5]]
    assert [len(r) for r in task_runs(19, 2)] == [4, 3, 3, 3, 3, 3]  # a multiple of the slots
    assert [len(r) for r in task_runs(20, 1, per_task=4)] == [4] * 5
    assert task_runs(0, 2) == [] and [len(r) for r in task_runs(1, 4)] == [1]
