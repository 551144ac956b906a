"""Labelled data generated from the CT phantom: training slices and held-out study archives.

Every volume draws its own shape, spacing, noise, lesion count, size and contrast, so the
model sees a spread of acquisitions. A slice is *lesion* when its lesion cross-section is at
least ``MIN_LESION_MM2``; slices that cut only the cap of a sphere (smaller, non-zero
cross-section) are ambiguous and left out of training and slice metrics.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .. import omezarr
from ..phantom import Phantom, ct_phantom
from .preprocess import preprocess_slices

MIN_LESION_MM2 = 12.0
LESION_LABEL = 5


def random_phantom(rng: np.random.Generator, *, lesions: bool | None = None) -> Phantom:
    """One phantom with randomised acquisition and lesions (``lesions=False``: none)."""
    if lesions is None:
        lesions = rng.random() < 0.7
    spacing = (float(rng.uniform(2.5, 5.0)), *(float(rng.uniform(1.7, 2.3)),) * 2)
    shape = (int(rng.integers(20, 36)), 128, 128)
    lo = float(rng.uniform(-720, 20))  # faint (130 HU above lung) to solid lesions
    return ct_phantom(
        shape, spacing,  # type: ignore[arg-type]
        n_lesions=int(rng.integers(1, 5)) if lesions else 0,
        lesion_radius_mm=(3.0, float(rng.uniform(5.0, 12.0))),
        lesion_hu=(lo, lo + float(rng.uniform(10, 120))),
        noise_hu=float(rng.uniform(5, 60)),
        seed=int(rng.integers(2**31)),
    )


def slice_labels(ph: Phantom) -> np.ndarray:
    """Per-slice label: 1 lesion, 0 none, -1 ambiguous (cap smaller than ``MIN_LESION_MM2``)."""
    area = (ph.labels == LESION_LABEL).sum(axis=(1, 2)) * ph.spacing[1] * ph.spacing[2]
    return np.where(area >= MIN_LESION_MM2, 1, np.where(area > 0, -1, 0))


def phantom_slices(
    n_volumes: int, seed: int, *, size: int, window: tuple[float, float], spacing_mm: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Preprocessed slices ``x`` (n, size, size, 1), labels ``y`` and volume index ``groups``.

    Ambiguous slices are dropped.
    """
    rng = np.random.default_rng(seed)
    xs, ys, gs = [], [], []
    for v in range(n_volumes):
        ph = random_phantom(rng)
        y = slice_labels(ph)
        keep = y >= 0
        xs.append(preprocess_slices(ph.hu[keep], ph.spacing[1:], size=size, window=window, spacing_mm=spacing_mm))
        ys.append(y[keep])
        gs.append(np.full(int(keep.sum()), v))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)


def make_labelled_volumes(
    out_dir: str | Path, n: int = 20, *, seed: int = 10_000, positive_fraction: float = 0.5, levels: int = 1
) -> Path:
    """Write a labelled held-out archive of phantom studies and return its labels file.

    Layout: ``out_dir/<study>/image.zarr`` (OME-Zarr, modality CT in its attributes) and
    ``out_dir/labels.csv`` with columns ``study,label`` (1: at least one lesion). This is the
    layout :func:`medpipe.inference.evaluate.evaluate_archive` reads besides DICOM archives.

    Examples
    --------
    >>> import tempfile
    >>> labels = make_labelled_volumes(tempfile.mkdtemp(), 2, seed=3)
    >>> labels.read_text().splitlines()[0]
    'study,label'
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_pos = int(round(n * positive_fraction))
    flags = rng.permutation([1] * n_pos + [0] * (n - n_pos))
    rows = []
    for i, positive in enumerate(flags):
        ph = random_phantom(rng, lesions=bool(positive))
        key = f"phantom-{seed}-{i:03d}"
        omezarr.write_image(out_dir / key / "image.zarr", ph.hu, ph.spacing, levels=levels,
                            attrs={"modality": "CT", "phantom_lesions": len(ph.lesions)})
        rows.append((key, int(positive)))
    labels = out_dir / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study", "label"])
        w.writerows(rows)
    return labels
