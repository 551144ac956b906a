"""A peer agrees: dicom2nifti converts the same series to the same voxels and affine (1e-4 mm)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from ingest_helpers import load, oblique_orientation, ramp_volume, run_ingest

from medpipe.sample import write_series

dicom2nifti = pytest.importorskip("dicom2nifti")
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _peer(files):
    from dicom2nifti import convert_dicom

    datasets = [pydicom.dcmread(f) for f in files]
    img = convert_dicom.dicom_array_to_nifti(datasets, None, reorient_nifti=False)["NII"]
    return np.asanyarray(img.dataobj), LPS_RAS @ img.affine  # peer affine in LPS, voxel (i, j, k)


@pytest.mark.parametrize(
    "orientation,shuffle",
    [
        (((1, 0, 0), (0, 1, 0)), False),  # axial
        (oblique_orientation(25.0, 12.0), False),  # oblique
        (((1, 0, 0), (0, 0, -1)), True),  # coronal, file order shuffled
        (oblique_orientation(-15.0, 30.0), True),  # oblique and shuffled
    ],
)
def test_same_voxels_and_affine_as_dicom2nifti(tmp_path, orientation, shuffle):
    vol = ramp_volume((7, 10, 12))
    files = write_series(vol, (2.5, 0.75, 0.6), tmp_path / "a", orientation=orientation,
                         origin_lps=(10.5, -20.25, 33.0), shuffle=shuffle, seed=4, intercept=-1024.0)
    _, results, _ = run_ingest(tmp_path / "a", tmp_path / "out")
    (key, res), = results.items()
    ours, _ = load(tmp_path / "out", key)
    ours_aff = np.asarray(res["affine_lps"])
    peer, peer_aff = _peer(files)
    # Voxel index map from ours (x, y, z) to the peer's (i, j, k): a signed permutation.
    index_map = np.linalg.solve(peer_aff, ours_aff)
    perm = np.rint(index_map)
    np.testing.assert_allclose(index_map, perm, atol=1e-5)
    np.testing.assert_allclose(peer_aff @ perm, ours_aff, atol=1e-4)  # same affine within 1e-4 mm
    # Resample the peer's array into our (z, y, x) order through that map and compare voxels.
    zz, yy, xx = np.indices(ours.shape)
    ijk = perm @ np.stack([xx.ravel(), yy.ravel(), zz.ravel(), np.ones(xx.size)])
    peer_vals = peer[tuple(ijk[:3].astype(int))].reshape(ours.shape)
    np.testing.assert_array_equal(ours, peer_vals.astype(np.float32))
    np.testing.assert_array_equal(ours, vol)
