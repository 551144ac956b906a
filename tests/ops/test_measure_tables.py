"""Slice-by-slice label tables give the same statistics as whole-block bincounts."""

from __future__ import annotations

import numpy as np
import pytest

from medpipe.ops.measure import _block_stats, label_counts


def _whole_block(lab: np.ndarray, img: np.ndarray, n: int, offset: list[int]) -> dict[str, np.ndarray]:
    """The statistics the way ``_block_stats`` computed them before (one bincount per axis)."""
    lab = lab.astype(np.int64)
    flat = lab.ravel()
    count = np.bincount(flat, minlength=n + 1)
    w = img.astype(np.float64).ravel()
    out = {"count": count, "sum": np.bincount(flat, weights=w, minlength=n + 1),
           "sumsq": np.bincount(flat, weights=w * w, minlength=n + 1)}
    csum, lo, hi = np.zeros((3, n + 1)), np.full((3, n + 1), np.iinfo(np.int64).max), np.full((3, n + 1), -1)
    for ax in range(3):
        m = lab.shape[ax]
        idx = np.arange(m).reshape([-1 if i == ax else 1 for i in range(3)])
        table = np.bincount((lab + (n + 1) * idx).ravel(), minlength=m * (n + 1)).reshape(m, n + 1)
        present = table > 0
        any_ = present.any(axis=0)
        csum[ax] = (table * np.arange(m)[:, None]).sum(axis=0) + offset[ax] * count
        lo[ax] = np.where(any_, present.argmax(axis=0) + offset[ax], lo[ax])
        hi[ax] = np.where(any_, m - 1 - present[::-1].argmax(axis=0) + offset[ax], hi[ax])
    out.update(csum=csum, lo=lo, hi=hi)
    return out


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 9, 4), (7, 1, 5), (13, 17, 11)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_slice_tables_equal_whole_block(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    n = 9
    lab = rng.integers(0, n + 1, shape).astype(dtype)
    lab[lab == 4] = 0  # a label that is absent
    img = rng.normal(size=shape).astype(np.float32)
    got, ref = _block_stats(lab, img, n, [3, 0, 5]), _whole_block(lab, img, n, [3, 0, 5])
    assert got.keys() == ref.keys()
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    counts = _block_stats(lab, None, n, [0, 0, 0], geometry=False)
    assert counts.keys() == {"count"}
    np.testing.assert_array_equal(counts["count"], ref["count"])
    np.testing.assert_array_equal(label_counts(lab, n), ref["count"])


def test_label_above_n_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        _block_stats(np.full((2, 2, 2), 5, np.int32), None, 3, [0, 0, 0])


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 9, 4), (7, 1, 5), (13, 17, 11), (20, 30, 40)])
def test_foreground_stats_equal_whole_block(shape):
    """Sparse blocks are measured from their labelled voxels: the same numbers for labels 1..n."""
    rng = np.random.default_rng(sum(shape))
    n = 9
    lab = rng.integers(1, n + 1, shape) * (rng.random(shape) < 0.05)
    lab[lab == 4] = 0  # a label that is absent
    img = rng.normal(size=shape).astype(np.float32)
    got, ref = _block_stats(lab, img, n, [3, 0, 5], foreground=True), _whole_block(lab, img, n, [3, 0, 5])
    assert got["count"][0] == ref["count"][0]
    for key in ref:
        np.testing.assert_array_equal(got[key][..., 1:], ref[key][..., 1:], err_msg=key)


@pytest.mark.parametrize("shape", [(5, 7, 9), (1, 1, 1), (3, 64, 32)])
def test_small_label_stats_equal_block_stats(shape):
    """The histogram kernel for few labels and integer images equals the general one (labels 1..n)."""
    from medpipe.ops.measure import _block_stats, small_label_stats

    rng = np.random.default_rng(4)
    lab = rng.integers(0, 5, shape).astype(np.uint8)
    lab[lab == 3] = 0  # an absent label
    img = rng.integers(-1024, 3000, shape).astype(np.int16)
    want = _block_stats(lab, img.astype(np.float32), 6, (4, 2, 0), foreground=True)
    got = small_label_stats(lab, img, 6, (4, 2, 0))
    assert set(got) == set(want)
    for key in want:  # label 0 (background, never reported) may lack sums and geometry in either
        np.testing.assert_array_equal(got[key][..., 1:], want[key][..., 1:], err_msg=key)
    assert small_label_stats(lab, img.astype(np.float32), 6, (0, 0, 0)) is None
