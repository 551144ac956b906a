"""ct_tissues gives the labels and measurements it gave before it was made faster.

``data/ct_tissues_golden.json`` was written by the implementation of commit 74d3308 (skimage's
``convex_hull_object``, whole-block label tables, no persisted intermediates) on two phantoms,
as NumPy arrays and as Dask arrays in uneven chunks; the current code must reproduce it
exactly (label bytes by SHA-256, every candidate and measurement value).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from medpipe.ops import SEGMENTERS, region_stats
from medpipe.phantom import ct_phantom

GOLDEN = json.loads((Path(__file__).parent / "data" / "ct_tissues_golden.json").read_text())


def _result(seed: int, kind: str) -> dict:
    ph = ct_phantom(n_lesions=4, lesion_radius_mm=(5.0, 10.0), seed=seed)
    filt = ndi.median_filter(ph.hu.astype(np.float32), 3)
    raw = ph.hu.astype(np.float32)
    if kind == "dask":
        filt, raw_in = da.from_array(filt, chunks=(13, 64, 128)), da.from_array(raw, chunks=(13, 64, 128))
    else:
        raw_in = raw
    seg = SEGMENTERS["ct_tissues"](filt, raw_in, spacing=ph.spacing)
    lab = np.asarray(seg.labels.compute() if isinstance(seg.labels, da.Array) else seg.labels)
    stats = region_stats(lab, raw, spacing=ph.spacing, n=6, names=seg.names)
    out = {"labels_sha256": hashlib.sha256(lab.astype(np.uint8).tobytes()).hexdigest(), "shape": list(lab.shape),
           "candidates": seg.lesion_candidates, "measurements": stats}
    return json.loads(json.dumps(out, default=float))  # the golden file's number types


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_same_labels_and_measurements_as_before(key):
    seed, kind = key.split("-")
    got = _result(int(seed.removeprefix("seed")), kind)
    assert got["labels_sha256"] == GOLDEN[key]["labels_sha256"]
    assert got == GOLDEN[key]
