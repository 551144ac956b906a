"""Fixtures of the PACS tests: a real Orthanc (tests/pacs/orthanc.py) and small real DICOM studies.

Tests that use an Orthanc skip, with the reason, only when Debian's ``orthanc`` / ``orthanc-dicomweb``
are not installed (``make system-packages`` installs them as root; CI runs as root, so they run there).

- ``orthanc``: a fresh, empty Orthanc per test (no auth, StableAge 2 s).
- ``orthanc_factory``: ``orthanc_factory(users=..., modalities=..., stable_age_s=...)`` for other setups;
  every server it made is stopped at the end of the test.
- ``sample_archive`` (session): the sample archive written once, its summary dict.
- ``orthanc_sample`` (session): one Orthanc loaded with the sample archive. Read-only: a test that
  adds or deletes studies uses ``orthanc`` instead.
- ``make_study``: ``make_study(dest, n_series=1, n_instances=4, ...) -> StudyFiles`` writes a small
  generated CT study (real pixel data, unique UIDs per call).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orthanc import OrthancServer, free_port, missing_reason

_MISSING = missing_reason()
needs_orthanc = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def _require_orthanc() -> None:
    if _MISSING is not None:
        pytest.skip(_MISSING)


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """Start Orthancs with options (see :class:`OrthancServer`); all are stopped after the test."""
    _require_orthanc()
    made: list[OrthancServer] = []
    counter = itertools.count()

    def make(**kwargs: Any) -> OrthancServer:
        kwargs.setdefault("stable_age_s", 2)
        srv = OrthancServer(tmp_path / f"orthanc-{next(counter)}", **kwargs)
        made.append(srv)
        return srv.start()

    yield make
    for srv in made:
        srv.stop(kill=True)


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    """A fresh, empty Orthanc (no authentication, StableAge 2 s)."""
    return orthanc_factory()


@pytest.fixture(scope="session")
def sample_archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sample archive (``write_sample_archive``), written once per session."""
    from medpipe.sample.archive import write_sample_archive

    return write_sample_archive(tmp_path_factory.mktemp("pacs-sample") / "archive")


@pytest.fixture(scope="session")
def move_port() -> Iterator[int]:
    """Port of medpipe's C-STORE receiver for C-MOVE (AE title MEDPIPE), known to ``orthanc_sample``."""
    port = free_port()
    yield port
    from medpipe.pacs.dimse import StoreReceiver

    rcv = StoreReceiver._shared.get(("MEDPIPE", port))
    if rcv is not None:
        rcv.shutdown()


@pytest.fixture(scope="session")
def orthanc_sample(
    tmp_path_factory: pytest.TempPathFactory, sample_archive: dict[str, Any], move_port: int
) -> Iterator[OrthancServer]:
    """One Orthanc holding the sample archive, shared by the session: do not modify it. It knows
    the C-MOVE destination MEDPIPE at 127.0.0.1:``move_port``."""
    _require_orthanc()
    srv = OrthancServer(tmp_path_factory.mktemp("orthanc-sample"), stable_age_s=2,
                        modalities={"MEDPIPE": ("MEDPIPE", "127.0.0.1", move_port)})
    srv.start()
    try:
        srv.upload_folder(sample_archive["root"])
        srv.wait_stable()
        yield srv
    finally:
        srv.stop(kill=True)


@dataclass
class StudyFiles:
    """A generated study: its UIDs and files per series."""

    study_uid: str
    series: dict[str, list[Path]]   # SeriesInstanceUID -> files

    @property
    def files(self) -> list[Path]:
        return [p for files in self.series.values() for p in files]


_study_counter = itertools.count(1)


def write_study(
    dest: Path,
    *,
    n_series: int = 1,
    n_instances: int = 4,
    study_date: str = "20261128",
    modality: str = "CT",
    study_uid: str | None = None,
    size: int = 16,
    tag: str = "",
) -> StudyFiles:
    """Write a small CT/MR study with ``n_series`` series of ``n_instances`` slices under ``dest``."""
    from medpipe.sample.series import stable_uid, write_series

    k = next(_study_counter)
    study_uid = study_uid or stable_uid("medpipe-tests-pacs", tag, dest, k)
    rng = np.random.default_rng(k)
    series: dict[str, list[Path]] = {}
    for s in range(n_series):
        series_uid = stable_uid(study_uid, "series", s)
        vol = rng.integers(0, 1000, size=(n_instances, size, size)).astype(np.float32)
        files = write_series(
            vol, (2.0, 1.0, 1.0), dest / f"s{s}", modality=modality, study_uid=study_uid,
            series_uid=series_uid, study_date=study_date, series_number=s + 1,
            series_description=f"series {s}", patient_id=f"PACS-{k:04d}", patient_name=f"Test^{k}",
            StudyTime="101500",
        )
        series[series_uid] = files
    return StudyFiles(study_uid=study_uid, series=series)


@pytest.fixture
def make_study(tmp_path: Path) -> Callable[..., StudyFiles]:
    """``make_study(n_series=1, n_instances=4, study_date=..., modality=...)`` under the test's tmp_path."""
    counter = itertools.count()

    def make(**kwargs: Any) -> StudyFiles:
        return write_study(tmp_path / "studies" / f"st{next(counter)}", **kwargs)

    return make
