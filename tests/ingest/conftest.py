"""Fixtures for ingest tests: small real DICOM series written with pydicom in tmp dirs."""

from __future__ import annotations

import pytest

from medpipe.config import IngestConfig


@pytest.fixture
def cfg() -> IngestConfig:
    return IngestConfig()
