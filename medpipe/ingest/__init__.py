"""Ingest: DICOM archive to OME-Zarr.

``scan_archive`` (headers, in parallel) -> ``plan_studies`` (one series per study, and why)
-> ``ingest_study`` (sorted, rescaled, checked volume streamed into ``image.zarr``).
"""

from typing import Any

from .catalogue import catalogue_path
from .deid import clean_description, source_facts
from .geometry import Geometry, build_geometry
from .plan import StudyPlan, fingerprint, format_plan, plan_studies
from .scan import FileIssue, Instance, ScanResult, read_instance, scan_archive, scan_known

__all__ = [
    "FileIssue", "Geometry", "Instance", "ScanResult", "StudyPlan", "build_geometry", "catalogue_path",
    "clean_description",
    "fingerprint", "format_plan", "ingest_study", "plan_studies", "read_instance", "scan_archive", "scan_known",
    "source_facts",
]


def __getattr__(name: str) -> Any:
    """``ingest_study`` loads the converter (Zarr, Dask, the operators) when first used: planning
    (``medpipe plan``, a night with nothing new) never needs it."""
    if name == "ingest_study":
        from .convert import ingest_study

        return ingest_study
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
