"""Dice evaluation of segmentation models: real Keras models, real Zarr, phantom truth masks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from medpipe import omezarr  # noqa: E402
from medpipe.config import Config  # noqa: E402
from medpipe.errors import InputError  # noqa: E402
from medpipe.inference.dice import mask_counts, overlap_scores  # noqa: E402
from medpipe.inference.evaluate import evaluate_archive, read_mask_labels  # noqa: E402
from medpipe.phantom import ct_phantom  # noqa: E402

SHAPE = (16, 64, 64)
WINDOW = (-1000.0, 400.0)  # HU -> [0, 1]: lung 0.11, fat 0.64, soft tissue and lesions 0.73-0.77
LESION = 5


def _save(model, folder: Path, name: str) -> Path:
    path = folder / f"{name}.keras"
    model.save(path)
    (folder / "model_card.json").write_text(json.dumps({
        "name": name, "version": "0.1", "file": path.name, "input": {"window": list(WINDOW)}, "modalities": ["CT"]}))
    return path


@pytest.fixture(scope="module")
def lesion_segmenter(tmp_path_factory) -> Path:
    """Soft-tissue density surrounded by lung is lesion: two fixed-weight convolutions.

    A 1x1 conv thresholds the windowed HU into "dense" (above -20 HU) and "lung" (below -580 HU);
    a 9x9 conv then keeps dense pixels whose 18 mm neighbourhood is mostly (> 60 %) lung.
    """
    import keras
    from keras import layers

    inp = keras.Input((SHAPE[1], SHAPE[2], 1))
    tissue = layers.Conv2D(2, 1, activation="sigmoid")(inp)
    out = layers.Conv2D(1, 9, padding="same", activation="sigmoid")(tissue)
    model = keras.Model(inp, out)
    model.layers[1].set_weights([np.array([100.0, -100.0], "float32").reshape(1, 1, 1, 2),
                                 np.array([-70.0, 30.0], "float32")])
    kernel = np.zeros((9, 9, 2, 1), "float32")
    kernel[4, 4, 0, 0] = 50.0  # dense here
    kernel[:, :, 1, 0] = 50.0 / 81  # mean lung around
    model.layers[2].set_weights([kernel, np.full((1,), -80.0, "float32")])  # 50 * (dense + lung - 1.6)
    return _save(model, tmp_path_factory.mktemp("seg"), "lesion")


@pytest.fixture(scope="module")
def two_class_segmenter(tmp_path_factory) -> Path:
    """1x1 conv + softmax over (background, lung-dark, dense): air and lung are class 1, soft tissue class 2."""
    import keras
    from keras import layers

    inp = keras.Input((SHAPE[1], SHAPE[2], 1))
    model = keras.Model(inp, layers.Conv2D(3, 1, activation="softmax")(inp))
    model.layers[-1].set_weights([np.array([0.0, -100.0, 100.0], "float32").reshape(1, 1, 1, 3),
                                  np.array([0.0, 30.0, -70.0], "float32")])
    return _save(model, tmp_path_factory.mktemp("seg3"), "two-class")


def _cfg(model: Path, labels: list[str]) -> Config:
    return Config.model_validate({"model": {"path": str(model), "input_size": SHAPE[1], "output": "segmentation",
                                            "labels": labels, "batch_size": 8, "saliency_slices": 0}})


def _study(archive: Path, name: str, seed: int):
    # Noise of 60 HU takes some lesion voxels under the model's -20 HU threshold: Dice under 1.
    ph = ct_phantom(SHAPE, n_lesions=2, lesion_radius_mm=(3.0, 5.0), noise_hu=60.0, seed=seed)
    omezarr.write_image(archive / name / "image.zarr", ph.hu, ph.spacing, levels=1, attrs={"modality": "CT"})
    return ph


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _predicted(archive: Path, name: str) -> np.ndarray:
    return omezarr.read_labels(archive / name / "image.zarr", "model").compute()


def test_dice_of_phantom_lesions_matches_numpy(tmp_path, lesion_segmenter):
    archive, masks = tmp_path / "archive", tmp_path / "masks"
    masks.mkdir()
    truth = {name: _study(archive, name, seed).labels == LESION
             for seed, name in enumerate(["study-npy", "study-ome", "study-zarr"])}
    assert all(t.any() for t in truth.values())
    # The three mask formats: .npy, an OME-Zarr label image, a plain Zarr array.
    np.save(masks / "a.npy", truth["study-npy"].astype(np.uint8))
    ref = _study(tmp_path, "ref", seed=1)  # the same volume again, as the image the label image belongs to
    omezarr.write_labels(tmp_path / "ref" / "image.zarr", truth["study-ome"].astype(np.uint8), {1: "lesion"},
                         name="truth")
    zarr.create_array(str(masks / "c.zarr"), data=truth["study-zarr"].astype(np.uint8), chunks=(8, 64, 64))
    _study(archive, "study-badshape", seed=3)
    np.save(masks / "bad.npy", np.zeros((8, 64, 64), np.uint8))
    (tmp_path / "masks.csv").write_text(
        "study,mask\nstudy-npy,masks/a.npy\nstudy-ome,ref/image.zarr/labels/truth\n"
        "study-zarr,masks/c.zarr\nstudy-badshape,masks/bad.npy\n")
    assert ref.labels.shape == SHAPE

    rec = evaluate_archive(archive, tmp_path / "masks.csv", tmp_path / "eval",
                           _cfg(lesion_segmenter, ["background", "lesion"]))

    assert rec["kind"] == "segmentation" and rec["metrics"]["n"] == 3
    expected = {}
    for row in rec["studies"]:
        pred = _predicted(archive, row["study"]) != 0
        t = truth[row["study"]]
        expected[row["study"]] = _dice(pred, t)
        assert row["dice"] == pytest.approx(expected[row["study"]], rel=1e-12)
        assert row["precision"] == pytest.approx((pred & t).sum() / pred.sum())
        assert row["recall"] == pytest.approx((pred & t).sum() / t.sum())
        assert 0.5 < row["dice"] < 1.0  # the model finds the lesions, not the body, and misses noisy voxels
        assert (row["voxels_reference"], row["voxels_predicted"]) == (t.sum(), pred.sum())
    assert rec["metrics"]["dice_mean"] == pytest.approx(np.mean(list(expected.values())))
    assert rec["metrics"]["dice_median"] == pytest.approx(np.median(list(expected.values())))
    [err] = rec["errors"]
    assert err["study"] == "study-badshape"
    assert "(8, 64, 64)" in err["error"] and "(16, 64, 64)" in err["error"]
    out = tmp_path / "eval"
    assert json.loads((out / "evaluation.json").read_text())["metrics"] == rec["metrics"]
    assert "mean Dice" in (out / "evaluation.md").read_text()
    assert "study-badshape" in (out / "evaluation.html").read_text()
    assert not (out / "roc.png").exists()


def test_dice_per_label(tmp_path, two_class_segmenter):
    archive = tmp_path / "archive"
    ph = _study(archive, "study-0", seed=4)
    reference = np.select([ph.labels == 1, np.isin(ph.labels, (3, 4, 5))], [1, 2], 0).astype(np.uint8)
    np.save(tmp_path / "ref.npy", reference)
    (tmp_path / "masks.json").write_text(json.dumps({"study-0": "ref.npy"}))

    rec = evaluate_archive(archive, tmp_path / "masks.json", tmp_path / "eval",
                           _cfg(two_class_segmenter, ["background", "lung", "dense"]))

    pred = _predicted(archive, "study-0")
    assert set(np.unique(pred)) == {0, 1, 2}
    [row] = rec["studies"]
    for value, name in ((1, "lung"), (2, "dense")):
        assert row["labels"][name]["dice"] == pytest.approx(_dice(pred == value, reference == value), rel=1e-12)
        assert rec["metrics"]["labels"][name]["mean"] == pytest.approx(row["labels"][name]["dice"])
    assert row["labels"]["dense"]["dice"] > 0.8  # lung is class 1 only by its darkness: air counts too
    assert row["dice"] == pytest.approx(_dice(pred != 0, reference != 0), rel=1e-12)


def test_overlap_edge_cases():
    empty = np.zeros((2, 3, 3), np.uint8)
    s = overlap_scores(mask_counts(empty, empty))
    assert (s["dice"], s["precision"], s["recall"]) == (1.0, None, None)
    one = empty.copy()
    one[0, 0, 0] = 7  # any non-zero value is foreground in a binary evaluation
    assert overlap_scores(mask_counts(one, empty))["dice"] == 0.0
    three = overlap_scores(mask_counts(one, one, n_labels=2), {1: "a", 2: "b"})
    assert three["dice"] == 1.0 and three["labels"]["a"]["voxels_reference"] == 0  # 7 is "other"
    with pytest.raises(ValueError, match="shapes differ"):
        mask_counts(empty, empty[:1])


def test_mask_labels_file(tmp_path):
    (tmp_path / "m.csv").write_text("study,mask\na,x/a.npy\n")
    assert read_mask_labels(tmp_path / "m.csv") == {"a": tmp_path / "x" / "a.npy"}
    (tmp_path / "m.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(InputError, match="mask path per study"):
        read_mask_labels(tmp_path / "m.json")
