"""DICOM Segmentation and Comprehensive 3D SR (TID 1500) of a study, made with highdicom."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_dicom_outputs(study_dir: Path, record: dict[str, Any], cfg: Any,
                        source_files: list[str]) -> tuple[dict[str, str], list[str]]:
    return {}, ["DICOM SEG/SR not implemented yet"]
