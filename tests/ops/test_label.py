"""Chunked labelling gives SciPy's partition (up to renumbering); morphology and measurement are chunk-exact."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from medpipe import ops
from medpipe.ops import measure, morphology

CHUNKINGS = [(5, 6, 7), (3, 4, 2), (1, 23, 17), (19, 23, 17), (7, 1, 17)]
FULL = np.ones((3, 3, 3), bool)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b label the same voxel sets (a bijection between their labels)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]], axis=1), axis=0)
    return len(pairs) == len(np.unique(a[fg])) == len(np.unique(b[fg]))


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    return np.random.default_rng(1).random((19, 23, 17)) > 0.62


@pytest.mark.parametrize("structure", [None, FULL], ids=["6-conn", "26-conn"])
@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_label_partition_equals_scipy(blobs, chunks, structure):
    ref, n_ref = ndi.label(blobs, structure)
    lab, n = ops.label(da.from_array(blobs, chunks=chunks), structure)
    out = lab.compute()
    assert n == n_ref and out.max() == n and out.dtype == np.int32
    assert same_partition(out, ref)


def test_diagonal_corner_across_blocks():
    a = np.zeros((4, 4, 4), bool)
    a[1, 1, 1] = a[2, 2, 2] = True  # touch only at a corner shared by 8 blocks
    d = da.from_array(a, chunks=2)
    assert ops.label(d, FULL)[1] == 1
    assert ops.label(d)[1] == 2


def test_morphology_chunk_exact(blobs):
    d = da.from_array(blobs, chunks=(5, 6, 7))
    np.testing.assert_array_equal(morphology.binary_opening(d, iterations=2).compute(),
                                  ndi.binary_opening(blobs, iterations=2))
    np.testing.assert_array_equal(morphology.binary_closing(d).compute(), ndi.binary_closing(blobs))
    np.testing.assert_array_equal(morphology.fill_holes(d).compute(), ndi.binary_fill_holes(blobs))
    ref = np.stack([ndi.binary_fill_holes(s) for s in blobs])
    np.testing.assert_array_equal(morphology.fill_holes(d, in_plane=True).compute(), ref)
    lab, _ = ndi.label(blobs)
    biggest = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
    np.testing.assert_array_equal(morphology.largest_component(d).compute(), biggest)


def test_region_stats_chunked_equal_whole(blobs, volume):
    lab, n = ndi.label(blobs)
    spacing = (2.0, 0.5, 0.7)
    whole = measure.region_stats(lab, volume, spacing=spacing)
    for chunks in [(5, 6, 7), (1, 23, 17)]:
        parts = measure.region_stats(da.from_array(lab, chunks=chunks), da.from_array(volume, chunks=chunks),
                                     spacing=spacing)
        assert [p["bbox"] for p in parts] == [w["bbox"] for w in whole]
        assert [p["voxels"] for p in parts] == [w["voxels"] for w in whole]
        np.testing.assert_allclose([p["mean"] for p in parts], [w["mean"] for w in whole], rtol=1e-9)
    # against scipy's own per-label reductions
    idx = np.arange(1, n + 1)
    np.testing.assert_allclose([w["mean"] for w in whole], ndi.mean(volume, lab, idx), rtol=1e-6)
    np.testing.assert_allclose([w["std"] for w in whole], ndi.standard_deviation(volume, lab, idx),
                               rtol=1e-5, atol=1e-6)
    com = np.array(ndi.center_of_mass(blobs, lab, idx))  # (z, y, x) voxels
    np.testing.assert_allclose([w["centroid_mm"][2] for w in whole], com[:, 0] * 2.0, atol=1e-3)
    slices = ndi.find_objects(lab)
    assert [w["bbox"] for w in whole] == [[[s.start for s in sl], [s.stop for s in sl]] for sl in slices]


def test_many_labels_fallback(monkeypatch, blobs):
    lab, n = ndi.label(blobs)
    expected = measure.region_stats(lab, spacing=(1, 1, 1))
    monkeypatch.setattr(measure, "_TABLE_LIMIT", 10)
    assert measure.region_stats(lab, spacing=(1, 1, 1)) == expected


def test_gpu_label_matches_cpu(cupy_gpu, blobs):
    cupy = cupy_gpu
    ref, n_ref = ndi.label(blobs, FULL)
    lab, n = ops.label(da.from_array(cupy.asarray(blobs), chunks=(5, 6, 7)), FULL)
    assert n == n_ref and same_partition(lab.compute().get(), ref)


def test_region_grow_and_body_mask():
    from medpipe.ops import body_mask, region_grow

    img = np.zeros((6, 20, 20), np.float32)
    img[:, 2:18, 2:18] = 100.0  # body
    img[:, 6:10, 6:10] = 0.0  # enclosed hole (filled by the body mask)
    img[:, 12:15, 12:15] = 300.0  # a bright object
    d = da.from_array(img, chunks=(2, 7, 7))
    body = body_mask(d, 50.0).compute()
    assert body[:, 2:18, 2:18].all() and not body[:, :2].any()
    grown = region_grow(d, [(3, 13, 13)], 250.0, 400.0).compute()
    assert grown.sum() == 6 * 9 and grown[3, 13, 13]


# Thin volumes: one, two and three slices, one-pixel-wide lines and planes, a single voxel.
THIN = [(1, 23, 17), (2, 23, 17), (3, 23, 17), (1, 1, 17), (19, 1, 1), (1, 23, 1), (5, 1, 17), (1, 1, 1)]
THIN_IDS = ["x".join(map(str, s)) for s in THIN]


def thin_blobs(shape) -> np.ndarray:
    return np.random.default_rng(sum(shape)).random(shape) > 0.45


def on_image_axes(fn, a: np.ndarray, *args) -> np.ndarray:
    """SciPy's result on ``a`` without its axes of length one (the 2-D image a slice is), with
    face connectivity of that many dimensions."""
    flat = a.reshape([n for n in a.shape if n > 1])
    return np.asarray(fn(flat, ndi.generate_binary_structure(flat.ndim, 1), *args)).reshape(a.shape)


@pytest.mark.parametrize("chunks", ["whole", (1, 5, 4)])
@pytest.mark.parametrize("shape", THIN, ids=THIN_IDS)
def test_thin_label_and_measure_equal_scipy(shape, chunks):
    a = thin_blobs(shape)
    d = da.from_array(a, chunks=a.shape if chunks == "whole" else chunks)
    for structure in (None, FULL):
        ref, n_ref = ndi.label(a, structure)
        lab, n = ops.label(d, structure)
        assert n == n_ref and same_partition(lab.compute(), ref)
    ref, n = ndi.label(a)
    image = np.random.default_rng(1).normal(size=shape)
    whole = measure.region_stats(ref, image, spacing=(2.0, 0.5, 0.7))
    parts = measure.region_stats(da.from_array(ref, chunks=d.chunks), da.from_array(image, chunks=d.chunks),
                                 spacing=(2.0, 0.5, 0.7))
    assert [p["bbox"] for p in parts] == [w["bbox"] for w in whole]
    assert [w["bbox"] for w in whole] == [[[s.start for s in sl], [s.stop for s in sl]] for sl in ndi.find_objects(ref)]
    np.testing.assert_allclose([p["mean"] for p in parts], ndi.mean(image, ref, np.arange(1, n + 1)), rtol=1e-9)


@pytest.mark.parametrize("chunks", ["whole", (1, 5, 4)])
@pytest.mark.parametrize("shape", THIN, ids=THIN_IDS)
def test_thin_morphology_is_scipy_on_the_image_axes(shape, chunks):
    """A single slice is opened, closed, eroded and hole-filled as a 2-D image (SciPy's 3-D
    erosion with the border outside would erase it); volumes equal SciPy on the whole array."""
    a = thin_blobs(shape)
    d = da.from_array(a, chunks=a.shape if chunks == "whole" else chunks)
    np.testing.assert_array_equal(morphology.binary_erosion(d).compute(), on_image_axes(ndi.binary_erosion, a))
    np.testing.assert_array_equal(morphology.binary_opening(d).compute(), on_image_axes(ndi.binary_opening, a))
    np.testing.assert_array_equal(morphology.binary_closing(d).compute(), on_image_axes(ndi.binary_closing, a))
    if a.size > 1:  # SciPy calls a lone background voxel (0-d) a hole; medpipe does not
        np.testing.assert_array_equal(morphology.fill_holes(d).compute(), on_image_axes(ndi.binary_fill_holes, a))
    in_plane = np.stack([on_image_axes(ndi.binary_fill_holes, s[None])[0] if s.size > 1 else s for s in a])
    np.testing.assert_array_equal(morphology.fill_holes(d, in_plane=True).compute(), in_plane)
    if 1 not in shape:
        np.testing.assert_array_equal(morphology.binary_opening(d).compute(), ndi.binary_opening(a))
    lab, n = ndi.label(a)
    biggest = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1 if n else lab > 0
    np.testing.assert_array_equal(morphology.largest_component(d).compute(), biggest)


def test_lone_voxels():
    assert not morphology.fill_holes(np.zeros((1, 1, 1), bool)).any()
    assert morphology.binary_erosion(np.ones((1, 1, 1), bool)).all()
    assert morphology.convex_hull_slices(da.from_array(np.ones((3, 1, 1), bool), chunks=1)).compute().all()
