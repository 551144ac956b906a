"""Helpers for ingest tests (imported by name: the test folders have no __init__.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from medpipe.config import IngestConfig
from medpipe.ingest import ingest_study, plan_studies, scan_archive
from medpipe.omezarr import read_image, read_meta


def oblique_orientation(deg_a: float = 20.0, deg_b: float = 10.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Row and column cosines of an axial plane rotated about two axes."""
    a, b = np.radians(deg_a), np.radians(deg_b)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rot = rx @ rz
    return tuple(rot[:, 0]), tuple(rot[:, 1])


def ramp_volume(shape=(6, 10, 12), seed: int = 0) -> np.ndarray:
    """A volume whose every voxel differs, so any misplaced slice or axis shows."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    return (z * 100 + y * 7 + x + rng.integers(0, 3, shape) - 500).astype(np.int16)


def run_ingest(root: Path, out: Path, cfg: IngestConfig | None = None):
    """scan + plan + ingest every plannable study; returns (plans, results by study key, scan)."""
    cfg = cfg or IngestConfig()
    scan = scan_archive(root, cfg)
    plans = plan_studies(scan, cfg)
    results = {p.study_key: ingest_study(p, out / p.study_key, cfg) for p in plans if p.files}
    return plans, results, scan


def load(out: Path, key: str) -> tuple[np.ndarray, object]:
    path = out / key / "image.zarr"
    return read_image(path).compute(), read_meta(path)
