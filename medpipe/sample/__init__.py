"""A deterministic sample DICOM archive and a writer of DICOM series for tests."""

from .archive import brain_reference, phantom, write_sample_archive
from .series import stable_uid, write_series

__all__ = ["brain_reference", "phantom", "stable_uid", "write_sample_archive", "write_series"]
