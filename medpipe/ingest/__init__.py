"""Ingest: DICOM archive to OME-Zarr.

``scan_archive`` (headers, in parallel) -> ``plan_studies`` (one series per study, and why)
-> ``ingest_study`` (sorted, rescaled, checked volume streamed into ``image.zarr``).
"""

from .catalogue import catalogue_path
from .convert import ingest_study
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
