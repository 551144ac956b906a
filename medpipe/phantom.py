"""A synthetic chest CT phantom whose truth is known voxel for voxel.

Structures (Hounsfield units): air outside the body (-1000), a body of soft tissue (40) inside
a fat layer (-100), two lungs (-850), a spine of bone (700) and spherical lesions (soft-tissue
density) inside the lungs. The generator returns the exact voxelised truth labels and each
lesion's volume, so segmentation can be scored against it.

>>> ph = ct_phantom(shape=(24, 64, 64), n_lesions=2, seed=1)
>>> ph.hu.dtype, ph.labels.shape
(dtype('int16'), (24, 64, 64))
>>> sorted(ph.label_names.values())
['bone', 'fat', 'lesion', 'lung', 'soft_tissue']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TISSUE_HU = {"air": -1000, "lung": -850, "fat": -100, "soft_tissue": 40, "bone": 700}
LABELS = {1: "lung", 2: "fat", 3: "soft_tissue", 4: "bone", 5: "lesion"}


@dataclass
class Lesion:
    """A spherical lesion; ``center_mm`` is (z, y, x) in the volume's own millimetres."""

    center_mm: tuple[float, float, float]
    radius_mm: float
    hu: float = 40.0
    volume_ml: float = 0.0  # exact voxelised volume, filled in by ct_phantom


@dataclass
class Phantom:
    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    lesions: list[Lesion] = field(default_factory=list)
    label_names: dict[int, str] = field(default_factory=lambda: dict(LABELS))

    def truth_volume_ml(self, label: int) -> float:
        return float((self.labels == label).sum() * np.prod(self.spacing) / 1000.0)


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Millimetre coordinates of voxel centres relative to the volume centre."""
    return tuple(
        ((np.arange(n) - (n - 1) / 2) * s).reshape([-1 if i == a else 1 for i in range(3)])
        for a, (n, s) in enumerate(zip(shape, spacing))
    )


def ct_phantom(
    shape: tuple[int, int, int] = (48, 128, 128),
    spacing: tuple[float, float, float] = (2.5, 2.0, 2.0),
    *,
    n_lesions: int = 3,
    lesions: list[Lesion] | None = None,
    lesion_radius_mm: tuple[float, float] = (4.0, 10.0),
    lesion_hu: tuple[float, float] = (20.0, 80.0),
    noise_hu: float = 10.0,
    seed: int = 0,
) -> Phantom:
    """Make a phantom volume (int16 HU) with truth labels; lesions are random unless given."""
    rng = np.random.default_rng(seed)
    z, y, x = _grid(shape, spacing)
    half_y, half_x = shape[1] * spacing[1] / 2, shape[2] * spacing[2] / 2
    ry, rx = 0.80 * half_y, 0.92 * half_x

    body = (y / ry) ** 2 + (x / rx) ** 2 <= 1.0
    inner = (y / (ry - 6)) ** 2 + (x / (rx - 6)) ** 2 <= 1.0  # 6 mm of subcutaneous fat
    lung_c = 0.45 * rx
    lung_ry, lung_rx = 0.62 * ry, 0.33 * rx
    lungs = [((y + 0.05 * ry) / lung_ry) ** 2 + ((x - s * lung_c) / lung_rx) ** 2 <= 1.0 for s in (-1, 1)]
    lung = (lungs[0] | lungs[1]) & (np.abs(z) <= shape[0] * spacing[0] * 0.45)
    spine = ((y - 0.72 * ry) / 11.0) ** 2 + (x / 11.0) ** 2 <= 1.0

    labels = np.zeros(shape, np.uint8)
    labels[np.broadcast_to(body, shape)] = 2
    labels[np.broadcast_to(inner, shape)] = 3
    labels[np.broadcast_to(lung, shape)] = 1
    labels[np.broadcast_to(spine, shape)] = 4

    if lesions is None:
        lesions = _random_lesions(rng, labels, spacing, n_lesions, lesion_radius_mm, lesion_hu)
    hu = np.full(shape, TISSUE_HU["air"], np.float32)
    for value, name in LABELS.items():
        if name != "lesion":
            hu[labels == value] = TISSUE_HU[name]
    for lesion in lesions:
        cz, cy, cx = lesion.center_mm
        sphere = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= lesion.radius_mm**2
        labels[sphere] = 5
        hu[sphere] = lesion.hu
    for lesion in lesions:  # volumes after all spheres are drawn (overlaps count once)
        cz, cy, cx = lesion.center_mm
        own = ((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= lesion.radius_mm**2) & (labels == 5)
        lesion.volume_ml = float(own.sum() * np.prod(spacing) / 1000.0)
    if noise_hu > 0:
        hu += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    return Phantom(np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels, spacing, lesions)


def _random_lesions(
    rng: np.random.Generator,
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    n: int,
    radius_mm: tuple[float, float],
    hu: tuple[float, float],
) -> list[Lesion]:
    """Place ``n`` non-touching lesions whose spheres lie inside the lungs."""
    from scipy import ndimage as ndi

    shape = labels.shape
    lung_depth = ndi.distance_transform_edt(labels == 1, sampling=spacing)
    out: list[Lesion] = []
    for _ in range(200 * max(n, 1)):
        if len(out) == n:
            break
        r = float(rng.uniform(*radius_mm))
        candidates = np.argwhere(lung_depth > r + 1.0)
        if len(candidates) == 0:
            continue
        idx = candidates[rng.integers(len(candidates))]
        center = tuple(float((i - (s - 1) / 2) * sp) for i, s, sp in zip(idx, shape, spacing))
        if all(np.linalg.norm(np.subtract(center, o.center_mm)) > r + o.radius_mm + 3 for o in out):
            out.append(Lesion(center, r, float(rng.uniform(*hu))))  # type: ignore[arg-type]
    return out
