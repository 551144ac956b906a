"""largest_component on Dask arrays (block tables, no relabelling) equals the NumPy result."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from medpipe.ops.morphology import largest_component


def _reference(mask: np.ndarray, structure=None) -> np.ndarray:
    lab, n = ndi.label(mask, structure)
    if n == 0:
        return np.zeros(mask.shape, bool)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == np.argmax(counts)  # equal counts: the first in raster order


@pytest.mark.parametrize("chunks", [(5, 7, 9), (3, 40, 40), (40, 40, 40)])
@pytest.mark.parametrize("structure", [None, np.ones((3, 3, 3), bool)])
def test_largest_component_chunked_equals_whole(chunks, structure):
    rng = np.random.default_rng(7)
    mask = ndi.gaussian_filter(rng.standard_normal((17, 23, 29)), 1.5) > 0.1
    got = largest_component(da.from_array(mask, chunks=chunks), structure).compute()
    np.testing.assert_array_equal(got, _reference(mask, structure))
    np.testing.assert_array_equal(largest_component(mask, structure), _reference(mask, structure))


def test_equal_sizes_and_empty():
    mask = np.zeros((4, 6, 6), bool)
    mask[0, :2, :2] = mask[3, 4:, 4:] = True  # two components of 4 voxels: the first wins
    got = largest_component(da.from_array(mask, chunks=(2, 3, 3))).compute()
    np.testing.assert_array_equal(got, _reference(mask))
    assert not largest_component(da.zeros((4, 6, 6), bool, chunks=2)).compute().any()
