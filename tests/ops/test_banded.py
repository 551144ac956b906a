"""The banded-product correlation equals SciPy's correlate1d for every mode, line length and layout."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from medpipe import ops
from medpipe.ops import _banded
from medpipe.ops.filters import _gaussian_weights

MODES = ["reflect", "mirror", "nearest", "wrap", "constant", "grid-mirror", "grid-constant", "grid-wrap"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axis", [0, 1])
def test_equals_scipy_for_every_line_length(mode, axis):
    """Lines from 1 sample (shorter than the kernel: repeated reflection) to longer than a group."""
    rng = np.random.default_rng(axis)
    for n in [1, 2, 3, 5, 8, 17, 40]:
        for sigma in (0.5, 2.0, 3.0):
            shape = [3, 4, 5]
            shape[axis] = n
            a = rng.standard_normal(shape).astype(np.float32)
            w = _gaussian_weights(sigma, 4.0)
            got = _banded.correlate1d(a, w, axis, mode=mode, cval=0.7)
            ref = ndi.correlate1d(a, w, axis, mode=mode, cval=0.7)
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7, err_msg=f"n={n} sigma={sigma}")


def test_asymmetric_weights_crop_and_in_place():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((37, 6, 7))  # float64
    w = np.array([0.1, -0.3, 0.5, 0.2, 0.7])
    ref = ndi.correlate1d(a, w, axis=0, mode="nearest")[3:-2]
    np.testing.assert_allclose(_banded.correlate1d(a, w, 0, mode="nearest", crop=(3, 2)), ref, rtol=1e-12)
    b = a.copy()
    out = _banded.correlate1d(b, w, 0, mode="nearest", crop=(3, 2), inplace=True)
    assert np.shares_memory(out, b)
    np.testing.assert_allclose(out, ref, rtol=1e-12)


def test_in_place_falls_back_to_a_copy_where_the_layout_needs_one():
    a = np.random.default_rng(2).random((8, 9, 10), dtype=np.float32)
    view = a[:, ::2, :]  # axes 1-2 cannot merge without a copy
    w = _gaussian_weights(1.0, 4.0)
    out = _banded.correlate1d(view, w, 0, inplace=True)
    assert not np.shares_memory(out, a)
    np.testing.assert_allclose(out, ndi.correlate1d(view, w, 0), rtol=1e-6)


def test_supports_only_strided_axes_of_numpy_floats():
    f = np.zeros((4, 5, 6), np.float32)
    assert _banded.supports(f, 0, "reflect") and _banded.supports(f, 1, "nearest")
    assert not _banded.supports(f, 2, "reflect")  # SciPy is fast along the contiguous axis
    assert not _banded.supports(f.astype(np.int16), 0, "reflect")
    with pytest.raises(ValueError, match="odd length"):
        _banded.correlate1d(f, [0.5, 0.5], 0)


@pytest.mark.parametrize("shape", [(40, 33, 21), (3, 7), (2, 3, 4, 5)])
def test_gaussian_is_bit_identical_to_scipy(shape):
    """Same passes in the same order, each rounded to float32: equal in (almost) every voxel."""
    a = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    got, ref = ops.gaussian_filter(a, 2.0), ndi.gaussian_filter(a, 2.0)
    assert np.mean(got == ref) > 0.999
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
