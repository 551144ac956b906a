"""The fast preprocessing paths give the numbers the default model was trained with.

``reference`` is the definition: window the whole slice, ``ndi.zoom`` it bilinearly
(grid_mode), then centre-crop or zero-pad. The library reads only the pixels the crop keeps
and replaces interpolation by strided means when the factors are integral.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from medpipe.inference.preprocess import preprocess_slices, restore_slices, slice_geometry, window_normalise


def reference(slices, spacing, size, window, spacing_mm):
    geom = slice_geometry(slices.shape[1:], spacing, size, spacing_mm)
    st = window_normalise(slices, window)
    if geom.resampled != geom.shape:
        f = (geom.resampled[0] / st.shape[1], geom.resampled[1] / st.shape[2])
        st = np.stack([ndi.zoom(s, f, order=1, mode="nearest", grid_mode=True)
                       [: geom.resampled[0], : geom.resampled[1]] for s in st])
    out = np.zeros((len(st), size, size), np.float32)
    src, dst = [], []
    for r, off in zip(geom.resampled, geom.offsets()):
        src.append(slice(off, off + size) if off >= 0 else slice(0, r))
        dst.append(slice(0, size) if off >= 0 else slice(-off, -off + r))
    out[:, dst[0], dst[1]] = st[:, src[0], src[1]]
    return out[..., None]


SHAPES = [(64, 64), (96, 96), (40, 100), (97, 131), (144, 96)]
SPACINGS = [(1.0, 1.0), (0.5, 0.5), (2 / 3, 2 / 3), (0.7, 0.7), (2.0, 2.0), (4.0, 4.0), (1.0, 2 / 3),
            (1.3, 0.9)]


@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_matches_reference_preprocessing(dtype):
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for spacing in SPACINGS:
            for spacing_mm in (2.0, None):
                x = rng.integers(-1200, 1500, (3, *shape)).astype(dtype)
                if dtype == "float32":  # NaN/inf pixels spread exactly as zoom spreads them
                    x[0, 5, 7], x[1], x[2, shape[0] // 2, shape[1] // 3] = np.nan, np.nan, np.inf
                got = preprocess_slices(x, spacing, size=32, window=(-1000, 400), spacing_mm=spacing_mm)
                want = reference(x, spacing, 32, (-1000, 400), spacing_mm)
                assert got.shape == want.shape and got.dtype == np.float32
                np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{shape} {spacing}")
                np.testing.assert_allclose(got, want, rtol=0, atol=3e-7, err_msg=f"{shape} {spacing}")


def test_two_to_one_is_a_2x2_mean():
    x = np.arange(16, dtype=np.int16).reshape(1, 4, 4) * 100 - 1000
    got = preprocess_slices(x, (1.0, 1.0), size=2, window=(-1000, 400), spacing_mm=2.0)[0, ..., 0]
    win = (np.clip(x[0], -1000, 400) + 1000) / 1400  # clipped before averaging
    np.testing.assert_allclose(got, win.reshape(2, 2, 2, 2).mean(axis=(1, 3)), atol=1e-7)


def test_channels_and_bad_window():
    x = np.zeros((2, 20, 20), np.int16)
    assert preprocess_slices(x, (1.0, 1.0), size=8, window=(-1, 1), spacing_mm=2.0, channels=3).shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="low < high"):
        preprocess_slices(x, (1.0, 1.0), size=8, window=(1, 1))
    with pytest.raises(ValueError, match=r"\(n, y, x\)"):
        preprocess_slices(x[0], (1.0, 1.0), size=8, window=(-1, 1))


def test_restore_slices_inverts_the_grid_mapping():
    geom = slice_geometry((64, 48), (1.0, 1.0), 32, 2.0)  # 32x24 resampled, padded to 32x32
    mask = np.zeros((1, 32, 32), np.uint8)
    mask[0, 8:16, 8:16] = 1
    back = restore_slices(mask, geom, order=0)
    assert back.shape == (1, 64, 48) and back.sum() == 4 * 64
