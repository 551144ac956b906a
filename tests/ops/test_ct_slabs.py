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


@pytest.mark.parametrize("slab_voxels", [1, 6 * 128 * 128, 10**9])
def test_slabs_equal_whole_volume(tmp_path, slab_voxels):
    ph = ct_phantom(shape=(24, 128, 128), n_lesions=4, lesion_radius_mm=(5.0, 10.0), seed=3)
    study, filt = _study(tmp_path, ph.hu, ph.spacing)
    want, want_stats = _reference(filt, ph.hu, ph.spacing)
    seg, stats = ct_tissues_slabs(study, study / "filtered.zarr", spacing=ph.spacing, slab_voxels=slab_voxels)
    got = omezarr.read_labels(study / "image.zarr").compute()
    np.testing.assert_array_equal(got, want.labels)
    assert seg.lesion_candidates == want.lesion_candidates and len(want.lesion_candidates) > 0
    assert stats == want_stats
    assert seg.names == want.names
    assert not (study / ".segment-scratch").exists()
    level1 = zarr.open_array(str(study / "image.zarr" / "labels" / "segmentation" / "1"))[:]
    f = [a // b for a, b in zip(want.labels.shape, level1.shape)]  # labels: every f-th voxel
    np.testing.assert_array_equal(level1, want.labels[:: f[0], :: f[1], :: f[2]])


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
