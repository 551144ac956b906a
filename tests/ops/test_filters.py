"""Chunked filters equal SciPy on the whole volume, for every chunking (incl. chunks < halo)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from medpipe import ops
from medpipe.ops._overlap import fit_chunks

# Chunkings of a (19, 23, 17) volume: halo-sized, smaller than a sigma-2 halo (8), one voxel
# thick, and whole.
CHUNKINGS = [(5, 6, 7), (3, 4, 2), (1, 23, 17), (19, 23, 17)]
CASES = [
    ("gaussian", lambda a: ops.gaussian_filter(a, sigma=2.0), lambda a: ndi.gaussian_filter(a, 2.0)),
    ("gaussian_aniso_nearest", lambda a: ops.gaussian_filter(a, sigma=(0.5, 1.5, 1.0), mode="nearest"),
     lambda a: ndi.gaussian_filter(a, (0.5, 1.5, 1.0), mode="nearest")),
    ("gaussian_wrap", lambda a: ops.gaussian_filter(a, sigma=1.0, mode="wrap"),
     lambda a: ndi.gaussian_filter(a, 1.0, mode="wrap")),
    ("median", lambda a: ops.median_filter(a, size=3), lambda a: ndi.median_filter(a, size=3)),
    ("median_constant", lambda a: ops.median_filter(a, size=(3, 5, 3), mode="constant"),
     lambda a: ndi.median_filter(a, size=(3, 5, 3), mode="constant")),
    ("mean", lambda a: ops.uniform_filter(a, size=5), lambda a: ndi.uniform_filter(a, size=5)),
    ("gradient", lambda a: ops.gradient_magnitude(a, sigma=1.0), lambda a: ndi.gaussian_gradient_magnitude(a, 1.0)),
    ("unsharp", lambda a: ops.unsharp_mask(a, sigma=1.0, amount=0.5),
     lambda a: a + 0.5 * (a - ndi.gaussian_filter(a, 1.0))),
    ("diffusion", lambda a: ops.anisotropic_diffusion(a, niter=4, kappa=1.0, gamma=0.15),
     lambda a: ops.anisotropic_diffusion(a, niter=4, kappa=1.0, gamma=0.15)),
]


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("name,op,ref", CASES, ids=[c[0] for c in CASES])
def test_chunked_equals_whole_volume(volume, chunks, name, op, ref):
    out = op(da.from_array(volume, chunks=chunks))
    assert out.chunks == da.from_array(volume, chunks=chunks).chunks  # input chunking kept
    np.testing.assert_allclose(out.compute(), ref(volume), rtol=1e-5, atol=1e-6)


def test_numpy_in_numpy_out(volume):
    out = ops.gaussian_filter(volume, 1.0)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32


def test_fit_chunks_merges_short_chunks():
    assert fit_chunks(((3, 3, 3, 3, 1),), (8,)) == ((13,),)
    assert fit_chunks(((5, 5, 5, 2),), (4,)) == ((5, 5, 7),)
    assert ops.halo_depth(3, sigma=(0.5, 1, 2)) == (2, 4, 8)


def test_pointwise_and_normalisation(volume):
    d = da.from_array(volume, chunks=5)
    np.testing.assert_allclose(ops.window(d, -1, 1).compute(), ops.window(volume, -1, 1))
    z = ops.normalize(d).compute()
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
    mm = ops.normalize(d, "minmax").compute()
    assert mm.min() == 0 and abs(mm.max() - 1) < 1e-6


def test_resample_matches_scipy(volume):
    ref = ops.resample(volume, (2.0, 1.0, 1.0), (1.0, 1.5, 1.5))
    assert ref.shape == (38, 15, 11)
    out = ops.resample(da.from_array(volume, chunks=7), (2.0, 1.0, 1.0), (1.0, 1.5, 1.5)).compute()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="size or footprint"):
        ops.median_filter(np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="high > low"):
        ops.window(np.zeros(3), 1, 1)
    with pytest.raises(ValueError, match="gamma"):
        ops.anisotropic_diffusion(np.zeros((3, 3, 3)), gamma=0.5)
    with pytest.raises(TypeError):
        ops.gaussian_filter([1, 2, 3], 1.0)
    with pytest.raises(ValueError, match="device"):
        ops.resolve_device("tpu")


@pytest.mark.parametrize("name,op,ref", CASES[:6], ids=[c[0] for c in CASES[:6]])
def test_gpu_matches_cpu(cupy_gpu, volume, name, op, ref):
    cupy = cupy_gpu
    out = op(da.from_array(cupy.asarray(volume), chunks=(5, 6, 7))).compute()
    assert isinstance(out, cupy.ndarray)
    np.testing.assert_allclose(out.get(), ref(volume), rtol=1e-5, atol=1e-5)


# Thin volumes: one, two and three slices, one-pixel-wide lines and planes, a single voxel.
THIN = [(1, 23, 17), (2, 23, 17), (3, 23, 17), (1, 1, 17), (19, 1, 1), (1, 23, 1), (5, 1, 17), (1, 1, 1)]


@pytest.mark.parametrize("chunks", ["whole", (1, 5, 4)])
@pytest.mark.parametrize("shape", THIN, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name,op,ref", CASES, ids=[c[0] for c in CASES])
def test_thin_volumes_equal_scipy(shape, chunks, name, op, ref):
    """Halos never exceed the array; chunked results equal SciPy on the whole array."""
    a = np.random.default_rng(len(shape) + sum(shape)).normal(size=shape).astype(np.float32)
    if name == "median_constant" and 1 in shape:  # a length-one axis is no image axis: test_single_slice_is_2d
        pytest.skip("mode constant differs from SciPy's 3-D result on purpose")
    d = da.from_array(a, chunks=a.shape if chunks == "whole" else chunks)
    out = op(d)
    assert out.chunks == d.chunks
    np.testing.assert_allclose(out.compute(), ref(a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(op(a), ref(a), rtol=1e-5, atol=1e-6)  # NumPy in, too


@pytest.mark.parametrize("mode", ["constant", "reflect", "nearest"])
def test_single_slice_is_2d(mode):
    """One slice (or a one-pixel-wide line) is filtered as the 2-D (1-D) image it is: nothing
    of ``cval`` leaks in across the missing axis."""
    rng = np.random.default_rng(5)
    for shape in [(1, 23, 17), (1, 1, 17), (19, 1, 1)]:
        a = rng.normal(size=shape).astype(np.float32) + 3
        flat = a.reshape([n for n in shape if n > 1])
        d = da.from_array(a, chunks=(1, 4, 4))
        cases = [
            (ops.gaussian_filter(d, 0.7, mode=mode), ndi.gaussian_filter(flat, 0.7, mode=mode)),
            (ops.median_filter(d, size=3, mode=mode), ndi.median_filter(flat, size=3, mode=mode)),
            (ops.median_filter(d, footprint=np.ones((3, 3, 3)), mode=mode), ndi.median_filter(flat, size=3, mode=mode)),
            (ops.uniform_filter(d, size=3, mode=mode), ndi.uniform_filter(flat, size=3, mode=mode)),
        ]
        for got, want in cases:
            np.testing.assert_allclose(got.compute(), want.reshape(shape), rtol=1e-5, atol=1e-6)
    unsharp = ops.unsharp_mask(a, sigma=1.0)
    np.testing.assert_allclose(unsharp, a + (a - ndi.gaussian_filter(a.reshape(-1), 1.0).reshape(a.shape)), rtol=1e-5)


@pytest.mark.parametrize("shape", THIN, ids=lambda s: "x".join(map(str, s)))
def test_thin_resample_and_pointwise(shape):
    a = np.random.default_rng(7).random(shape, dtype=np.float32)
    d = da.from_array(a, chunks=(1, 5, 4))
    ref = ops.resample(a, (2.0, 1.0, 1.0), (1.0, 1.5, 1.5))
    assert ref.shape == tuple(max(1, round(n * f)) for n, f in zip(shape, (2, 2 / 3, 2 / 3)))
    np.testing.assert_allclose(ops.resample(d, (2.0, 1.0, 1.0), (1.0, 1.5, 1.5)).compute(), ref, rtol=1e-6)
    np.testing.assert_allclose(ops.window(d, 0.2, 0.8).compute(), ops.window(a, 0.2, 0.8))
    for method in ("zscore", "minmax"):
        np.testing.assert_allclose(ops.normalize(d, method).compute(), ops.normalize(a, method), rtol=1e-5, atol=1e-6)
    assert np.isfinite(ops.normalize(d, "percentile").compute()).all()  # Dask's percentiles are approximate


def test_halo_is_clamped_to_one_block_axes():
    """A Gaussian of depth 8 on 1-3 slices in several chunks: one block along z, no halo."""
    a = np.random.default_rng(6).random((3, 40, 30), dtype=np.float32)
    out = ops.gaussian_filter(da.from_array(a, chunks=(1, 40, 30)), 2.0)
    assert out.chunks == ((1, 1, 1), (40,), (30,))
    np.testing.assert_allclose(out.compute(), ndi.gaussian_filter(a, 2.0), rtol=1e-5, atol=1e-6)
