"""The segmentation methods and thresholds on thin volumes: chunked equals whole, nothing fails."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from medpipe import ops
from medpipe.ops import methods

THIN = [(1, 40, 36), (2, 40, 36), (3, 40, 36), (1, 1, 36), (30, 1, 1), (1, 40, 1), (1, 1, 1)]
THIN_IDS = ["x".join(map(str, s)) for s in THIN]


def ct_like(shape) -> np.ndarray:
    """Air around a soft-tissue body with two lungs, a bone and a nodule, cut to ``shape``."""
    full = np.full((3, 40, 36), -1000.0, np.float32)
    y, x = np.mgrid[:40, :36]
    full[:, ((y - 20) / 17) ** 2 + ((x - 18) / 15) ** 2 < 1] = 40.0
    for cx in (11, 25):
        full[:, ((y - 20) / 9) ** 2 + ((x - cx) / 5) ** 2 < 1] = -850.0
    full[:, 30:33, 16:20] = 700.0
    full[:, 19:22, 10:13] = 30.0  # nodule inside the left lung
    full += np.random.default_rng(0).normal(0, 10, full.shape).astype(np.float32)
    z, y0, x0 = (np.arange(n) % m for n, m in zip(shape, full.shape))
    if shape[1] == 1:
        y0 = np.array([20])
    if shape[2] == 1:
        x0 = np.array([11])
    return np.ascontiguousarray(full[np.ix_(z, y0, x0)])


def strip(candidates: list[dict]) -> list[dict]:
    """Candidates without their label ids (chunked labelling numbers components in block order),
    means rounded (chunked sums add in another order)."""
    return [{k: round(v, 9) if k == "mean" else v for k, v in c.items() if k != "id"} for c in candidates]


@pytest.mark.parametrize("shape", THIN, ids=THIN_IDS)
def test_methods_chunked_equal_whole(shape):
    hu = ct_like(shape)
    t1 = (hu + 1000) * (hu > -900)
    spacing = (2.5, 2.0, 2.0)
    for name, image, kwargs in [("ct_tissues", hu, {"spacing": spacing, "lesion_min_ml": 0.0}),
                                ("brain_tissues", t1, {}), ("otsu", t1, {})]:
        whole = methods.METHODS[name](image, **kwargs)
        chunked = methods.METHODS[name](da.from_array(image, chunks=(1, 14, 12)), **kwargs)
        np.testing.assert_array_equal(np.asarray(chunked.labels), whole.labels, err_msg=name)
        assert strip(chunked.lesion_candidates) == strip(whole.lesion_candidates)
    if shape[1:] == (40, 36):  # planes: the nodule is found in every slice
        seg = methods.ct_tissues(da.from_array(hu, chunks=(1, 14, 12)), spacing=spacing, lesion_min_ml=0.0)
        assert len(seg.lesion_candidates) == 1 and seg.lesion_candidates[0]["voxels"] == 9 * shape[0]


@pytest.mark.parametrize("shape", THIN, ids=THIN_IDS)
def test_thresholds_and_body_on_thin_volumes(shape):
    hu = ct_like(shape)
    d = da.from_array(hu, chunks=(1, 14, 12))
    # histogram edges: float64 on Dask, the image's dtype on NumPy (last digits differ)
    assert ops.threshold_otsu(d) == pytest.approx(ops.threshold_otsu(hu), rel=1e-6)
    np.testing.assert_allclose(ops.kmeans_intensity(d, 2), ops.kmeans_intensity(hu, 2), rtol=1e-6)
    np.testing.assert_array_equal(ops.body_mask(d, -500).compute(), ops.body_mask(hu, -500))
    np.testing.assert_array_equal(ops.window(d, -160, 240).compute(), ops.window(hu, -160, 240))
    np.testing.assert_allclose(ops.normalize(d, "minmax").compute(), ops.normalize(hu, "minmax"), rtol=1e-6)


def test_flat_images_have_no_foreground():
    for image in (np.zeros((1, 1, 1), np.float32), np.full((2, 5, 5), 7.0, np.float32)):
        assert ops.threshold_otsu(image) > image.max()
        assert not methods.otsu(da.from_array(image, chunks=1)).labels.compute().any()
        assert np.isnan(ops.threshold_multiotsu(image, 3)).all()
        assert methods.brain_tissues(image, method="multiotsu").warnings
    assert np.isnan(ops.kmeans_intensity(np.ones((2, 2, 2)), 3, mask=np.zeros((2, 2, 2), bool))).all()
