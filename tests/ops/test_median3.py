"""The 3x3x3 median kernel equals ``scipy.ndimage.median_filter`` bit for bit.

The comparator networks are proven by the 0-1 principle (every 0-1 input, exhaustively); the
whole kernel (padding, strips, plane reuse) is compared with SciPy for every boundary mode,
the dtypes it takes, odd and tiny shapes, ties and extreme values, and through Dask chunks
smaller than the halo.
"""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from medpipe import ops
from medpipe.ops import _median3
from medpipe.ops._median3 import median3, programs, supports

MODES = ["reflect", "constant", "nearest", "mirror", "wrap", "grid-mirror", "grid-constant", "grid-wrap"]
SHAPES = [(1, 1, 1), (1, 5, 7), (2, 1, 4), (3, 3, 1), (2, 2, 2), (4, 2, 9), (19, 23, 17)]
DTYPES = ["int16", "uint16", "float32", "int8", "uint8", "int32", "uint32", "float64"]


def _sorted_01(lengths: tuple[int, ...]):
    """Every tuple of sorted 0-1 lists of these lengths, concatenated (as bool scalars)."""
    for ones in itertools.product(*(range(n + 1) for n in lengths)):
        yield [np.bool_(v) for n, k in zip(lengths, ones) for v in [0] * (n - k) + [1] * k]


def test_slab_network_selects_the_14th_of_three_sorted_nines():
    for values in _sorted_01((9, 9, 9)):  # 1000 cases: all there are (0-1 principle)
        assert programs()["slab"](values)[0] == sorted(values)[13]


def test_plane_network_sorts_three_sorted_triples():
    for values in _sorted_01((3, 3, 3)):
        assert [bool(v) for v in programs()["plane"](values)] == sorted(values)
        assert programs()["median9"](values)[0] == sorted(values)[4]


def test_network_sizes():
    # 18 compare-exchanges per plane, 66 min/max per output voxel (see the module docstring)
    assert {k: len(p) for k, p in programs().items()} == {"plane": 36, "median9": 20, "slab": 66}


def _data(shape, dtype, rng, ties=True):
    if ties:  # few distinct values: many ties, the hard case for a selection network
        return rng.integers(0, 6, shape).astype(dtype)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_equals_scipy_every_mode_dtype_and_shape(dtype, mode):
    rng = np.random.default_rng(hash((dtype, mode)) % 2**32)
    for shape, ties, size in itertools.product(SHAPES, (True, False), (3, (1, 3, 3))):
        a = _data(shape, dtype, rng, ties)
        ref = ndi.median_filter(a, size=size, mode=mode, cval=3)
        assert supports(a, size, None, mode, 3)
        got = median3(a, size, mode=mode, cval=3)
        assert got.dtype == a.dtype
        np.testing.assert_array_equal(got, ref, err_msg=f"{shape} {size} ties={ties}")


@pytest.mark.parametrize("strip", [1, 2, 5, 64])
def test_strips_of_any_height(strip):
    a = _data((6, 11, 13), "float32", np.random.default_rng(5), ties=False)
    np.testing.assert_array_equal(median3(a, strip=strip), ndi.median_filter(a, size=3))
    np.testing.assert_array_equal(median3(a, (1, 3, 3), strip=strip), ndi.median_filter(a, size=(1, 3, 3)))


def test_two_dimensional_images():
    a = _data((9, 14), "int16", np.random.default_rng(6), ties=False)
    for mode in MODES:
        np.testing.assert_array_equal(median3(a, mode=mode, cval=-2), ndi.median_filter(a, 3, mode=mode, cval=-2))


def test_extreme_values_and_infinities():
    rng = np.random.default_rng(7)
    a = rng.choice(np.array([-np.inf, np.inf, 0.0, 1.0, np.finfo(np.float32).max, -1.5], np.float32), (7, 8, 9))
    np.testing.assert_array_equal(median3(a), ndi.median_filter(a, 3))
    b = rng.choice(np.array([-32768, 32767, 0, 1], np.int16), (7, 8, 9))
    np.testing.assert_array_equal(median3(b, mode="constant", cval=-32768),
                                  ndi.median_filter(b, 3, mode="constant", cval=-32768))


def test_ct_like_volume_through_median_filter():
    a = np.random.default_rng(8).integers(-1024, 3000, (12, 64, 64)).astype(np.int16)
    out = ops.median_filter(a, size=3)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, ndi.median_filter(a, size=3))


def test_what_is_left_to_scipy():
    f = np.zeros((4, 4, 4), np.float32)
    assert not supports(f.astype(np.int64), 3, None, "reflect", 0.0)  # not exact in double
    assert not supports(f, 5, None, "reflect", 0.0)
    assert not supports(f, (3, 1, 3), None, "reflect", 0.0)
    assert not supports(f, None, np.ones((3, 3, 3), bool), "reflect", 0.0)
    assert not supports(f[0, 0], 3, None, "reflect", 0.0)  # 1-D
    assert not supports(f.astype(np.int16), 3, None, "constant", 0.5)  # cval the dtype cannot hold
    assert not supports(f.astype(np.int16), 3, None, "constant", 1e6)
    assert not supports(f, 3, None, "constant", float("nan"))
    assert not supports(f, 3, None, "constant", -0.0)  # f holds +0.0: both signs of zero
    assert supports(-f, 3, None, "constant", -0.0) and supports(f, 3, None, "constant", 0.0)
    assert not supports(f.tolist(), 3, None, "reflect", 0.0)  # not a NumPy array (CuPy: cupyx)
    for poison in ([np.nan], [-0.0, 0.0]):  # SciPy's ordering of NaN and of -0.0, 0.0 is its own
        g = np.random.default_rng(9).normal(size=(5, 6, 7)).astype(np.float32)
        g[2, 3, 2:2 + len(poison)] = poison
        assert not supports(g, 3, None, "reflect", 0.0)
        np.testing.assert_array_equal(ops.median_filter(g, 3), ndi.median_filter(g, 3))


def test_zeros_of_one_sign_run_the_kernel():
    g = np.random.default_rng(13).integers(-2, 3, (6, 7, 8)).astype(np.float32)
    for data in (g * 1.0, g * -1.0 + 0.0, np.where(g == 0, np.float32(-0.0), g)):
        assert supports(data, 3, None, "reflect", 0.0)
        got, ref = median3(data), ndi.median_filter(data, 3)
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(ref))


def test_refuses_other_sizes():
    with pytest.raises(ValueError, match="size 3"):
        median3(np.zeros((3, 3, 3)), size=5)


@pytest.mark.parametrize("dtype", ["int16", "float32"])
@pytest.mark.parametrize("mode", ["reflect", "constant", "nearest", "mirror", "wrap"])
@pytest.mark.parametrize("chunks", [(1, 23, 17), (3, 4, 2), (5, 6, 7)])
def test_dask_chunks_equal_the_whole_volume(dtype, mode, chunks):
    a = _data((19, 23, 17), dtype, np.random.default_rng(10), ties=False)
    out = ops.median_filter(da.from_array(a, chunks=chunks), size=3, mode=mode, cval=1)
    np.testing.assert_array_equal(out.compute(), ndi.median_filter(a, 3, mode=mode, cval=1))


def test_single_slice_volume_through_dask():
    a = _data((1, 40, 33), "float32", np.random.default_rng(11), ties=False)
    out = ops.median_filter(da.from_array(a, chunks=(1, 7, 9)), size=3, mode="constant")
    np.testing.assert_array_equal(out.compute(), ndi.median_filter(a, (1, 3, 3), mode="constant"))


def test_cupy_blocks_use_cupyx(cupy_gpu):
    a = _data((9, 20, 21), "float32", np.random.default_rng(12), ties=False)
    assert not _median3.supports(cupy_gpu.asarray(a), 3, None, "reflect", 0.0)
    out = ops.median_filter(da.from_array(cupy_gpu.asarray(a), chunks=4), size=3)
    np.testing.assert_array_equal(cupy_gpu.asnumpy(out.compute()), ndi.median_filter(a, 3))
