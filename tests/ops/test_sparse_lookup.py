"""Lookups of mostly-background label blocks (only their non-zero voxels) equal full lookups."""

from __future__ import annotations

import dask.array as da
import numpy as np

from medpipe.ops._label import _lookup, sparse_lookup
from medpipe.ops.morphology import keep_labels


def test_sparse_lookup_equals_take():
    rng = np.random.default_rng(3)
    block = (rng.integers(1, 50, (6, 20, 30)) * (rng.random((6, 20, 30)) < 0.05)).astype(np.int32)
    table = rng.integers(0, 1000, 50).astype(np.int32)
    table[0] = 0
    got = sparse_lookup(block, table)
    assert got is not None and got.dtype == table.dtype
    np.testing.assert_array_equal(got, table[block])
    np.testing.assert_array_equal(_lookup(block, table), table[block])
    assert sparse_lookup(np.ones((2, 3, 4), np.int32), table) is None  # dense: the caller's take


def test_keep_labels_sparse_and_dense_blocks():
    rng = np.random.default_rng(4)
    lab = (rng.integers(1, 30, (8, 16, 16)) * (rng.random((8, 16, 16)) < 0.05)).astype(np.int32)
    lab[:2] = rng.integers(0, 40, (2, 16, 16))  # one dense block, labels above max(keep) too
    keep = [3, 7, 11]
    want = np.isin(lab, keep)
    np.testing.assert_array_equal(keep_labels(lab, keep), want)
    np.testing.assert_array_equal(keep_labels(da.from_array(lab, chunks=(2, 16, 16)), keep).compute(), want)
