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
    with pytest.raises(ConfigError, match="'sharpen'"):
        filter_study(ct_study, "CT", unchecked)
    unchecked = cfg.model_copy(update={"segment": cfg.segment.model_copy(
        update={"methods": {"default": FilterStep.model_construct(op="magic", params={})}})})
    with pytest.raises(ConfigError, match="'magic'"):
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
