"""The filter and segment stages on real OME-Zarr study folders; accuracy on the CT phantom."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from medpipe import omezarr
from medpipe.config import Config, FilterStep
from medpipe.errors import ConfigError, InputError
from medpipe.ops.stage import filter_study, segment_study


def test_filter_study_writes_filtered_zarr(ct_study, phantom):
    out = filter_study(ct_study, "CT", Config())
    assert out == {"steps": [{"op": "median", "params": {"size": 3}}], "device": "cpu",
                   "shape": list(phantom.hu.shape)}
    filtered = zarr.open_array(str(ct_study / "filtered.zarr"), mode="r")
    assert filtered.chunks == zarr.open_array(str(ct_study / "image.zarr" / "0")).chunks
    np.testing.assert_array_equal(filtered[:], ndi.median_filter(phantom.hu.astype(np.float32), 3))
    empty = filter_study(ct_study, "OT", Config())  # empty pipeline: a float32 copy
    assert empty["steps"] == []
    np.testing.assert_array_equal(zarr.open_array(str(ct_study / "filtered.zarr"))[:], phantom.hu)


def test_unknown_op_and_bad_params_are_config_errors(ct_study):
    """Refused when the configuration is made; the stages still refuse unchecked copies."""
    with pytest.raises(ValueError, match=r"filters\.pipelines\.CT\[0\]: unknown operator 'sharpen'"):
        Config.model_validate({"filters": {"pipelines": {"CT": [{"op": "sharpen"}]}}})
    with pytest.raises(ValueError, match=r"\(median\): unexpected parameter 'sise'"):
        Config.model_validate({"filters": {"pipelines": {"CT": [{"op": "median", "params": {"sise": 3}}]}}})
    cfg = Config()
    unchecked = cfg.model_copy(update={"filters": cfg.filters.model_copy(
        update={"pipelines": {"CT": [FilterStep.model_construct(op="sharpen", params={})]}})})
    with pytest.raises(ConfigError, match=r"filters\.pipelines\.CT\[0\]: unknown operator 'sharpen'"):
        filter_study(ct_study, "CT", unchecked)
    unchecked = cfg.model_copy(update={"segment": cfg.segment.model_copy(
        update={"methods": {"default": FilterStep.model_construct(op="magic", params={})}})})
    with pytest.raises(ConfigError, match=r"segment\.methods\.default: unknown method 'magic'"):
        segment_study(ct_study, "CT", unchecked)


def test_segment_needs_filtered(ct_study):
    with pytest.raises(InputError, match="filtered.zarr"):
        segment_study(ct_study, "CT", Config())


def test_ct_segmentation_and_lesion_volumes(ct_study, phantom):
    filter_study(ct_study, "CT", Config())
    out = segment_study(ct_study, "CT", Config())
    assert out["method"] == "ct_tissues" and out["labels"]["5"] == "lesion"
    labels = omezarr.read_labels(ct_study / "image.zarr").compute()
    assert omezarr.label_names(ct_study / "image.zarr")[1] == "lung"
    # Tissue classes agree with the truth (Dice per class).
    for value in (1, 2, 3, 4):
        a, b = labels == value, phantom.labels == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97, value
    # Every lesion of radius >= 5 mm is found, its volume within 5 % of the generator's truth.
    found = sorted(c["volume_ml"] for c in out["lesion_candidates"])
    truth = sorted(les.volume_ml for les in phantom.lesions if les.radius_mm >= 5.0)
    assert len(found) == len(truth)
    np.testing.assert_allclose(found, truth, rtol=0.05)
    by_name = {m["name"]: m for m in out["measurements"]}
    assert abs(by_name["bone"]["mean"] - 700) < 5 and by_name["lung"]["volume_ml"] > 0
    m = by_name["bone"]
    assert set(m) == {"label", "name", "voxels", "volume_ml", "bbox", "centroid_mm", "mean", "std"}


def test_single_slice_otsu(tmp_path):
    study = tmp_path / "cr"
    study.mkdir()
    img = np.zeros((1, 64, 64), np.uint16)
    img[0, 16:48, 20:40] = 1000
    omezarr.write_image(study / "image.zarr", img, (1.0, 0.2, 0.2), levels=1)
    filter_study(study, "CR", Config())
    out = segment_study(study, "CR", Config())
    assert out["method"] == "otsu" and out["measurements"][0]["voxels"] == 32 * 20
    assert out["measurements"][0]["bbox"] == [[0, 16, 20], [1, 48, 40]]


def mr_head(slices: int) -> tuple[np.ndarray, np.ndarray]:
    """A T1-like head (CSF dark, grey matter, white matter bright) and its truth labels."""
    y, x = np.mgrid[:64, :64] - 31.5
    r = np.hypot(y, x * 1.2)
    truth = np.select([r < 12, r < 20, r < 26], [3, 2, 1], 0).astype(np.uint8)  # WM, GM, CSF
    truth = np.repeat(truth[None], slices, axis=0)
    levels = np.array([0.0, 300.0, 600.0, 900.0], np.float32)
    noise = np.random.default_rng(slices).normal(0, 30, truth.shape)
    return (levels[truth] + noise).clip(0).astype(np.uint16), truth


def _study(tmp_path, name: str, image: np.ndarray, spacing=(2.5, 2.0, 2.0)):
    study = tmp_path / name
    study.mkdir()
    omezarr.write_image(study / "image.zarr", image, spacing)  # default pyramid, as ingest writes
    return study


def _run_default(study, modality: str, image: np.ndarray) -> tuple[dict, np.ndarray]:
    """Both stages with ``Config()``; check filtered.zarr against SciPy and labels against measurements."""
    cfg = Config()
    filter_study(study, modality, cfg)
    filtered = zarr.open_array(str(study / "filtered.zarr"), mode="r")[:]
    a = image.astype(np.float32)
    want = {"CT": lambda: ndi.median_filter(a, 3), "MR": lambda: ndi.gaussian_filter(a, 0.7)}.get(modality, lambda: a)()
    np.testing.assert_allclose(filtered, want, rtol=1e-5, atol=1e-3)
    out = segment_study(study, modality, cfg)
    labels = omezarr.read_labels(study / "image.zarr").compute()
    assert labels.shape == image.shape
    assert set(np.unique(labels)) - {0} <= {int(k) for k in out["labels"]}
    counts = np.bincount(labels.ravel(), minlength=256)
    assert {m["label"]: m["voxels"] for m in out["measurements"]} == \
        {v: int(c) for v, c in enumerate(counts) if v and c}
    return out, labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("slices", [1, 2, 3])
def test_ct_of_few_slices(tmp_path, phantom, slices):
    """The default CT pipeline (median 3 + ct_tissues) on 1-3 slices of the phantom's chest."""
    z = phantom.hu.shape[0] // 2
    image, truth = phantom.hu[z:z + slices], phantom.labels[z:z + slices]
    out, labels = _run_default(_study(tmp_path, "ct", image), "CT", image)
    for value in (1, 2, 3, 4):  # lung, fat, soft tissue, bone
        assert dice(labels == value, truth == value) > 0.9, (value, out["warnings"])


@pytest.mark.parametrize("slices", [1, 2, 3])
def test_mr_of_few_slices(tmp_path, slices):
    """The default MR pipeline (Gaussian 0.7, halo 3 > slices) + brain_tissues on 1-3 slices."""
    image, truth = mr_head(slices)
    out, labels = _run_default(_study(tmp_path, "mr", image), "MR", image)
    for value in (1, 2, 3):
        assert dice(labels == value, truth == value) > 0.9, (value, out["warnings"])


@pytest.mark.parametrize("slices", [1, 2, 3])
def test_other_modality_of_few_slices(tmp_path, slices):
    """The default pipeline of other modalities (no filter + otsu)."""
    image, truth = mr_head(slices)
    out, labels = _run_default(_study(tmp_path, "ot", image), "OT", image)
    assert dice(labels == 1, truth > 1) > 0.9


@pytest.mark.parametrize("modality", ["CT", "MR", "OT"])
@pytest.mark.parametrize("cut", ["line_x", "line_z", "column_y", "slab_1px", "voxel"])
def test_one_pixel_wide_images(tmp_path, phantom, modality, cut):
    """Lines, a one-pixel-wide slab and a single voxel go through both stages of every
    default pipeline (nothing to measure well there, but nothing fails)."""
    source = phantom.hu if modality == "CT" else mr_head(phantom.hu.shape[0])[0]
    z, y = source.shape[0] // 2, source.shape[1] // 2
    image = {"line_x": source[z:z + 1, y:y + 1, :], "line_z": source[:, y:y + 1, y:y + 1],
             "column_y": source[z:z + 1, :, y:y + 1], "slab_1px": source[:, y:y + 1, :],
             "voxel": source[z:z + 1, y:y + 1, y:y + 1]}[cut]
    image = np.ascontiguousarray(image)
    out, labels = _run_default(_study(tmp_path, cut, image), modality, image)
    if cut != "voxel":  # a line through the chest or head finds its largest tissue at least
        assert {"CT": "soft_tissue", "MR": "white_matter", "OT": "foreground"}[modality] in \
            {m["name"] for m in out["measurements"]}


@pytest.mark.parametrize("frames", [1, 2, 7])
def test_rgb_frames_as_ingest_writes_them(tmp_path, frames):
    """RGB ultrasound (one frame or a multi-frame cine) reaches the stages as float32 luminance
    (z = frames, ingest's BT.601 luma), under the default pipeline of other modalities."""
    rgb = np.zeros((frames, 48, 64, 3), np.uint8)
    rgb[:, 12:36, 20:44] = (200, 180, 90)  # a bright sector on black
    rgb[..., 2] += np.random.default_rng(frames).integers(0, 20, rgb.shape[:3], dtype=np.uint8)
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    out, labels = _run_default(_study(tmp_path, "us", luma, spacing=(1.0, 0.3, 0.3)), "US", luma)
    assert out["method"] == "otsu" and labels[:, 12:36, 20:44].all() and labels.sum() == frames * 24 * 24
