"""ct_tissues streamed in z-slabs from Zarr equals ct_tissues on the whole volume (NumPy)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from medpipe import omezarr
from medpipe.ops import SEGMENTERS, region_stats
from medpipe.ops.ct_slabs import ct_tissues_slabs, rim_in_plane, slab_bounds
from medpipe.phantom import ct_phantom


def _study(tmp_path, hu: np.ndarray, spacing) -> tuple:
    study = tmp_path / "study"
    study.mkdir()
    omezarr.write_image(study / "image.zarr", hu, spacing, chunks=(2, *hu.shape[1:]))
    filt = ndi.median_filter(hu.astype(np.float32), 3)
    arr = zarr.create_array(str(study / "filtered.zarr"), shape=hu.shape, chunks=(2, *hu.shape[1:]),
                            dtype=np.float32, fill_value=0)
    arr[:] = filt
    return study, filt


def _reference(filt: np.ndarray, raw: np.ndarray, spacing) -> tuple:
    seg = SEGMENTERS["ct_tissues"](filt, raw.astype(np.float32), spacing=spacing)
    stats = region_stats(seg.labels, raw.astype(np.float32), spacing=spacing, n=6, names=seg.names)
    return seg, stats


@pytest.mark.parametrize(("depth", "slab_voxels"), [(24, 1), (24, 6 * 128 * 128), (24, 10**9), (70, 8 * 128 * 128),
                                                   (70, 6 * 128 * 128)])
def test_slabs_equal_whole_volume(tmp_path, depth, slab_voxels):
    """Slabs of one chunk to all slices; 70 slices have a pyramid in z too (slabs of 8 slices
    own whole chunks of every level, slabs of 6 do not: the pyramid is built afterwards)."""
    ph = ct_phantom(shape=(depth, 128, 128), n_lesions=4, lesion_radius_mm=(5.0, 10.0), seed=3)
    study, filt = _study(tmp_path, ph.hu, ph.spacing)
    want, want_stats = _reference(filt, ph.hu, ph.spacing)
    seg, stats = ct_tissues_slabs(study, study / "filtered.zarr", spacing=ph.spacing, slab_voxels=slab_voxels)
    got = omezarr.read_labels(study / "image.zarr").compute()
    np.testing.assert_array_equal(got, want.labels)
    assert seg.lesion_candidates == want.lesion_candidates and len(want.lesion_candidates) > 0
    assert stats == want_stats
    assert seg.names == want.names
    assert not (study / ".segment-scratch").exists()
    # The pyramid as write_labels makes it (written by the slab tasks where slabs align).
    other = tmp_path / "other"
    other.mkdir()
    omezarr.write_image(other / "image.zarr", ph.hu, ph.spacing, chunks=(2, *ph.hu.shape[1:]))
    omezarr.write_labels(other / "image.zarr", want.labels.astype(np.uint8), want.names)
    for level in range(omezarr.read_meta(study / "image.zarr").levels):
        got_level = omezarr.read_labels(study / "image.zarr", level=level)
        want_level = omezarr.read_labels(other / "image.zarr", level=level)
        assert got_level.chunksize == want_level.chunksize
        np.testing.assert_array_equal(got_level.compute(), want_level.compute())
    assert (zarr.open_group(str(study / "image.zarr" / "labels" / "segmentation")).attrs.asdict()
            == zarr.open_group(str(other / "image.zarr" / "labels" / "segmentation")).attrs.asdict())


def test_no_body(tmp_path):
    hu = np.full((4, 16, 16), -1000, np.int16)
    study, filt = _study(tmp_path, hu, (1.0, 1.0, 1.0))
    want, want_stats = _reference(filt, hu, (1.0, 1.0, 1.0))
    seg, stats = ct_tissues_slabs(study, study / "filtered.zarr", spacing=(1.0, 1.0, 1.0), slab_voxels=1)
    np.testing.assert_array_equal(omezarr.read_labels(study / "image.zarr").compute(), want.labels)
    assert stats == want_stats == [] and seg.lesion_candidates == []


def test_slab_bounds_cover_whole_chunks():
    bounds = slab_bounds(301, 512 * 512, 8)
    assert bounds[0] == (0, 32) and bounds[-1][1] == 301
    assert all(z0 % 8 == 0 for z0, _ in bounds)


@pytest.mark.parametrize("shape", [(3, 17, 23), (2, 1, 5), (1, 2, 2), (2, 3, 3)])
def test_rim_equals_scipy_erosion(shape):
    from medpipe.ops.morphology import IN_PLANE

    rng = np.random.default_rng(1)
    for density in (0.3, 0.7, 1.0):
        mask = rng.random(shape) < density
        want = mask & ~ndi.binary_erosion(mask, structure=IN_PLANE)
        np.testing.assert_array_equal(rim_in_plane(mask), want)


@pytest.mark.parametrize("shape", [(4, 30, 40), (2, 1, 9), (2, 9, 1), (1, 1, 1), (3, 2, 2)])
def test_fill_holes_slices_equals_scipy(shape):
    """The per-slice hole filling the slab passes use equals SciPy's 2-D fill on every slice
    (slices of one row or column: no hole, as _touches_border's border rule says)."""
    from medpipe.ops.morphology import _fill_holes_slices, _touches_border

    def reference(mask):  # the general rule, slice by slice: background labels off the border
        out = mask.copy()
        for z in range(mask.shape[0]):
            lab, n = ndi.label(~mask[z])
            keep = np.ones(n + 1, bool)
            keep[0] = False
            keep[_touches_border(lab[None], in_plane=True)] = False
            out[z] |= keep[lab]
        return out

    rng = np.random.default_rng(2)
    for density in (0.4, 0.6, 0.8):
        mask = rng.random(shape) < density
        got = _fill_holes_slices(mask)
        np.testing.assert_array_equal(got, reference(mask))
        if min(shape[1:]) > 1:
            np.testing.assert_array_equal(got, np.stack([ndi.binary_fill_holes(s) for s in mask]))


def test_classes_by_slice_equal_ct_classes():
    from medpipe.ops.ct_slabs import classes_by_slice
    from medpipe.ops.segment import CT_PRESETS, ct_classes

    rng = np.random.default_rng(3)
    hu = rng.uniform(-1200, 1200, (3, 20, 30)).astype(np.float32)
    hu[0, 0, :4] = [np.nan, -950.0, -500.0, 150.0]  # NaN and the ranges' edges
    ids = {"air": 6, "lung": 1, "fat": 2, "soft_tissue": 3, "bone": 4}
    np.testing.assert_array_equal(classes_by_slice(hu, ids, CT_PRESETS), ct_classes(hu, ids, CT_PRESETS))
    overlapping = {**CT_PRESETS, "fat": (-300.0, 0.5), "bone": (100.0, 2000.0)}  # sums where they overlap
    np.testing.assert_array_equal(classes_by_slice(hu, ids, overlapping), ct_classes(hu, ids, overlapping))
    with pytest.raises(ValueError, match="no HU preset"):
        classes_by_slice(hu, {"liver": 7}, CT_PRESETS)
