"""Overlap of a predicted mask with a reference mask: Dice, voxel precision and recall.

Counts are accumulated slab by slab (a few slices at a time), so a full CT volume is never
held as several boolean copies at once; both masks may be NumPy arrays, memory-mapped
``.npy`` files or Zarr arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["mask_counts", "overlap_scores", "read_mask"]

SLAB = 32  # slices per read: bounded memory on long volumes, few Zarr reads on short ones


def read_mask(path: str | Path) -> Any:
    """Open a reference mask lazily: a ``.npy`` file, an OME-Zarr label image or a Zarr array.

    Returns an array-like with ``shape`` and ``__getitem__`` (memory-mapped or Zarr), read
    slab by slab by :func:`mask_counts`. An OME-Zarr group is read at level ``0``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is neither a ``.npy`` file nor a Zarr array or group with a level ``0``.
    """
    import zarr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: mask not found")
    if path.suffix.lower() == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Group):
        if "0" not in node:
            raise ValueError(f"{path}: a Zarr group without a level '0' array")
        node = node["0"]
    return node


def mask_counts(reference: Any, prediction: Any, n_labels: int = 1, slab: int = SLAB) -> np.ndarray:
    """Joint voxel counts of reference and predicted label values.

    Parameters
    ----------
    reference, prediction : array-like
        Masks of equal shape (z, y, x); anything sliceable along the first axis.
    n_labels : int
        With 1, any non-zero voxel is foreground. With more, values ``1..n_labels`` are
        labels and larger values count as "other" (index ``n_labels + 1``).
    slab : int
        Slices read at a time.

    Returns
    -------
    ndarray of int64, shape (n_labels + 2, n_labels + 2) or (2, 2)
        ``counts[r, p]``: voxels with reference value ``r`` and predicted value ``p``.

    Examples
    --------
    >>> mask_counts(np.array([[[0, 1, 1, 0]]]), np.array([[[0, 1, 0, 1]]]))
    array([[1, 1],
           [1, 1]])
    """
    if tuple(reference.shape) != tuple(prediction.shape):
        raise ValueError(f"mask shapes differ: reference {tuple(reference.shape)}, "
                         f"prediction {tuple(prediction.shape)}")
    if n_labels < 1:
        raise ValueError(f"n_labels must be at least 1, got {n_labels}")
    k = 2 if n_labels == 1 else n_labels + 2
    counts = np.zeros(k * k, np.int64)
    for z in range(0, reference.shape[0], slab):
        r = np.asarray(reference[z:z + slab])
        p = np.asarray(prediction[z:z + slab])
        if n_labels == 1:
            r, p = r != 0, p != 0
        else:
            r = np.minimum(r, n_labels + 1)  # unsigned masks; negatives are not labels
            p = np.minimum(p, n_labels + 1)
        counts += np.bincount((r.astype(np.int64) * k + p).ravel(), minlength=k * k)
    return counts.reshape(k, k)


def _scores(tp: int, fp: int, fn: int) -> dict[str, Any]:
    ref, pred = tp + fn, tp + fp
    return {
        # Nothing to find and nothing found: perfect agreement.
        "dice": 1.0 if ref + pred == 0 else 2.0 * tp / (ref + pred),
        "precision": tp / pred if pred else None,
        "recall": tp / ref if ref else None,
        "voxels_reference": int(ref), "voxels_predicted": int(pred),
    }


def overlap_scores(counts: np.ndarray, names: dict[int, str] | None = None) -> dict[str, Any]:
    """Dice, precision and recall from :func:`mask_counts`, for all foreground and per label.

    Parameters
    ----------
    counts : ndarray
        Joint counts from :func:`mask_counts`.
    names : dict of int to str, optional
        Label names for a multi-label ``counts`` (default: the value as text).

    Returns
    -------
    dict
        ``dice``, ``precision``, ``recall``, ``voxels_reference``, ``voxels_predicted`` for
        foreground = any non-zero value, and for a multi-label ``counts`` also ``labels``:
        ``{name: {the same keys}}``. Dice is 1.0 when both masks are empty; precision
        (recall) is None when nothing was predicted (nothing is in the reference).

    Examples
    --------
    >>> s = overlap_scores(mask_counts(np.array([[[0, 1, 1, 0]]]), np.array([[[0, 1, 0, 1]]])))
    >>> s["dice"], s["precision"], s["recall"]
    (0.5, 0.5, 0.5)
    """
    counts = np.asarray(counts, np.int64)
    fg = counts[1:, 1:].sum()  # foreground in both, whatever the labels
    out = _scores(int(fg), int(counts[0, 1:].sum()), int(counts[1:, 0].sum()))
    if counts.shape[0] > 2:
        out["labels"] = {}
        for v in range(1, counts.shape[0] - 1):  # the last index is "other"
            tp = int(counts[v, v])
            out["labels"][(names or {}).get(v, str(v))] = _scores(
                tp, int(counts[:, v].sum()) - tp, int(counts[v, :].sum()) - tp)
    return out
