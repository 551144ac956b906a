"""The versioned JSON Schema of ``report.json`` and its validation.

>>> SCHEMA_VERSION in report_schema()["properties"]["schema_version"]["enum"]
True
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMA_VERSION = "1.2"  # 1.1: optional "objects" (which DICOM objects were made, why not); 1.2: "models"
SCHEMA_FILE = "report.schema.json"


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


def report_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that every ``report.json`` follows (a fresh copy)."""
    return json.loads(_schema_text())


@lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    schema = report_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate_report(doc: dict[str, Any]) -> None:
    """Check ``doc`` against :func:`report_schema`.

    Raises
    ------
    ValueError
        Listing every problem as ``<json path>: <message>``.
    """
    if not isinstance(doc, dict):
        raise TypeError(f"report must be a dict, got {type(doc).__name__}")
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:20]]
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        key = doc.get("study_key", "?")
        raise ValueError(f"report of study {key} does not follow schema {SCHEMA_VERSION}:\n  "
                         + "\n  ".join(lines) + more)
