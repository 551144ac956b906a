"""Fixtures of the operator tests: small odd-shaped volumes and a study folder with a CT phantom."""

from __future__ import annotations

import numpy as np
import pytest

from medpipe import omezarr
from medpipe.phantom import ct_phantom

@pytest.fixture(scope="session")
def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(19, 23, 17)).astype(np.float32)


@pytest.fixture(scope="session")
def phantom():
    return ct_phantom(n_lesions=4, lesion_radius_mm=(5.0, 10.0), seed=3)


@pytest.fixture()
def ct_study(tmp_path, phantom):
    study = tmp_path / "study"
    study.mkdir()
    omezarr.write_image(study / "image.zarr", phantom.hu, phantom.spacing)
    return study


@pytest.fixture()
def cupy_gpu():
    """CuPy, or a clean skip where CuPy or a CUDA device is missing."""
    cupy = pytest.importorskip("cupy")
    from medpipe.ops import gpu_available

    if not gpu_available():
        pytest.skip("no CUDA device")
    return cupy
