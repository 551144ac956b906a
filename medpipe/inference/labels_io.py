"""Labels files of an evaluation: which studies are positive, or where their reference masks are.

Formats (see :mod:`medpipe.inference.evaluate` for the whole story):

* CSV with a header row and the columns ``study,label`` (0 or 1), or ``study,mask`` (a path
  relative to the labels file) for a segmentation model;
* JSON: an object ``{"<study>": 0 or 1, ...}`` or ``{"<study>": "masks/a.npy", ...}``.

A study is named by StudyInstanceUID, by medpipe study key or by folder name
(:func:`match_study`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..keys import study_key

__all__ = ["match_study", "read_labels_file", "read_mask_labels"]


def _read_study_table(path: Path, columns: tuple[str, ...], what: str) -> list[tuple[str, Any]]:
    """``(study, value)`` rows of a CSV with a ``study`` column and the first of ``columns``, or
    of a JSON object mapping study to value."""
    if not path.is_file():
        raise InputError(path, "labels file not found")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"JSON labels must be an object mapping study to {what}")
            return [(str(k).strip(), v) for k, v in raw.items()]
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            col = next((c for c in columns if c in (reader.fieldnames or [])), None)
            if "study" not in (reader.fieldnames or []) or col is None:
                raise ValueError(f"CSV labels need a header with the columns study,{columns[0]}")
            return [(row["study"].strip(), row[col]) for row in reader]
    except (ValueError, KeyError) as exc:
        raise InputError(path, f"unreadable labels: {exc}") from None


def read_labels_file(path: str | Path) -> dict[str, int]:
    """Read a labels file (CSV ``study,label`` or JSON mapping) into ``{study: 0|1}``."""
    path = Path(path)
    items = _read_study_table(path, ("label",), "0/1")
    try:
        labels = {k: int(v) for k, v in items}
    except (ValueError, TypeError) as exc:
        raise InputError(path, f"unreadable labels: {exc}") from None
    bad = sorted(k for k, v in labels.items() if v not in (0, 1))
    if bad:
        raise InputError(path, f"labels must be 0 or 1; not so for {bad[:5]}")
    return labels


def read_mask_labels(path: str | Path) -> dict[str, Path]:
    """Read a labels file that names reference masks (CSV ``study,mask`` or JSON) into ``{study: path}``.

    Relative mask paths are taken relative to the labels file's folder; whether the masks
    exist is checked per study during evaluation.
    """
    path = Path(path)
    items = _read_study_table(path, ("mask", "label"), "a mask path")
    bad = sorted(k for k, v in items if not isinstance(v, str) or not v.strip())
    if bad:
        raise InputError(path, f"a segmentation model needs a mask path per study; not so for {bad[:5]}")
    return {k: path.parent / v.strip() for k, v in items}


def match_study(labels: dict[str, Any], key: str, uid: str | None, salt: str) -> Any:
    """The entry of ``labels`` for a study: by its key, its StudyInstanceUID, or a UID whose
    salted hash is the key (plans carry only the one-way key); None when there is none."""
    for name in (key, uid):
        if name is not None and name in labels:
            return labels[name]
    hashed = {study_key(k, salt): v for k, v in labels.items()}
    return hashed.get(key)
