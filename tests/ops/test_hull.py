"""The per-slice convex hull equals ``skimage.morphology.convex_hull_object`` bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import convex_hull_object

from medpipe.ops.morphology import _hull_rows, _hull_slice, convex_hull_slices


def test_random_blobs_equal_skimage():
    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = tuple(int(n) for n in rng.integers(1, 48, 2))
        image = ndi.gaussian_filter(rng.normal(size=shape), rng.uniform(0.5, 3)) > rng.uniform(0, 0.3)
        np.testing.assert_array_equal(_hull_slice(image), convex_hull_object(image, connectivity=2))


@pytest.mark.parametrize("image", [
    np.ones((1, 1), bool), np.ones((1, 7), bool), np.ones((5, 1), bool), np.eye(9, dtype=bool),
    np.eye(9, dtype=bool)[::-1], np.pad(np.ones((3, 3), bool), 4), np.zeros((4, 4), bool),
])
def test_lines_points_and_corners(image):
    np.testing.assert_array_equal(_hull_slice(image), convex_hull_object(image, connectivity=2))


def test_lungs_of_the_phantom(phantom):
    lung = phantom.labels == 1
    for s in lung[::3]:
        np.testing.assert_array_equal(_hull_slice(s), convex_hull_object(s, connectivity=2))
    whole = convex_hull_slices(lung)
    assert whole.shape == lung.shape and whole[lung].all()


def test_either_orientation_of_the_polygon():
    square = np.array([[0, 0], [2, 0], [2, 3], [0, 3]], float)
    for verts in (square, square[::-1]):
        lo, hi = _hull_rows(verts, np.arange(-1, 4))
        assert lo.tolist()[1:4] == [0, 0, 0] and hi.tolist()[1:4] == [3, 3, 3]
        assert lo[0] > hi[0] and lo[4] > hi[4]
