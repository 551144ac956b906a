"""A filter pipeline run slab by slab over Zarr equals the pipeline on the whole volume."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from medpipe.config import FilterStep
from medpipe.ops import FILTERS
from medpipe.ops.filter_slabs import filter_slabs, pipeline_halo


@pytest.mark.parametrize("steps", [
    [("median", {"size": 3})],
    [("median", {"size": 3, "mode": "constant", "cval": -7.0})],
    [("median", {"size": 3, "mode": "constant", "cval": 0.5})],
    [("median", {"size": (1, 3, 3), "mode": "nearest"})],
    [("median", {"size": 3}), ("gaussian", {"sigma": 1.0})],
    [("mean", {"size": 5}), ("window", {"low": -1.0, "high": 1.0}), ("anisotropic_diffusion", {"niter": 2})],
    [("unsharp_mask", {"sigma": 0.7}), ("gradient_magnitude", {})],
])
def test_slabs_equal_whole_volume(tmp_path, steps):
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 1000, (23, 20, 17)).astype(np.int16)
    src = zarr.create_array(str(tmp_path / "src"), shape=image.shape, chunks=(3, 20, 17), dtype=np.int16)
    src[:] = image
    out = zarr.create_array(str(tmp_path / "out"), shape=image.shape, chunks=(3, 20, 17), dtype=np.float32)
    steps = [FilterStep(op=op, params=p) for op, p in steps]
    funcs = [FILTERS[s.op] for s in steps]
    halo = pipeline_halo(steps, funcs)
    assert halo is not None
    filter_slabs(str(tmp_path / "src"), str(tmp_path / "out"), [(0, 6), (6, 9), (9, 21), (21, 23)], halo, funcs,
                 [dict(s.params) for s in steps], "cpu")
    want = image.astype(np.float32)
    for s, f in zip(steps, funcs):
        want = f(want, **s.params)
    np.testing.assert_array_equal(out[:], want.astype(np.float32))


def test_global_or_wrapping_steps_are_not_slab_local():
    steps = [FilterStep(op="median", params={"size": 3, "mode": "wrap"})]
    assert pipeline_halo(steps, [FILTERS["median"]]) is None
    assert pipeline_halo([FilterStep(op="normalize")], [FILTERS["normalize"]]) is None
