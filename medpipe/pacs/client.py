"""The one interface of both PACS clients, their records and errors, the per-PACS throttle and retries.

``open_client(address, pacs_cfg, creds)`` returns a :class:`~medpipe.pacs.dicomweb.DicomWebClient`
(QIDO-RS, WADO-RS, STOW-RS) or a :class:`~medpipe.pacs.dimse.DimseClient` (C-FIND, C-GET or
C-MOVE, C-STORE); callers only use the :class:`PacsClient` protocol.

Errors: :class:`PacsAuthError` (wrong credentials: raised at once, never retried; a run exits 3),
:class:`PacsUnavailable` (down, refused, timeouts, 5xx, after the configured retries),
:class:`IncompleteStudy` (what arrived differs from what the PACS listed), :class:`NoWatermark`
(a first run with neither a watermark nor ``since``: exit 2).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..config import PacsConfig
from ..errors import ConfigError, MedpipeError
from .address import PacsAddress
from .auth import NO_CREDENTIALS, Credentials

log = logging.getLogger(__name__)
T = TypeVar("T")


# --------------------------------------------------------------------------- errors
class PacsError(MedpipeError):
    """Base of the PACS errors; messages name the address (redacted) and never hold a secret."""


class PacsAuthError(PacsError):
    """The PACS refused medpipe's credentials (HTTP 401/403, or an association rejected for the
    calling AE title). Never retried: a run that meets it fails with exit status 3."""


class PacsUnavailable(PacsError):
    """The PACS could not be reached or kept failing (refused, timeouts, 5xx) after the retries."""


class IncompleteStudy(PacsError):
    """Fewer (or other) instances arrived than the PACS listed; ``missing`` maps series UID -> (expected, got)."""

    def __init__(self, message: str, missing: dict[str, tuple[int, int]] | None = None):
        super().__init__(message)
        self.missing = dict(missing or {})


class NoWatermark(PacsError, ConfigError):
    """A first run against a PACS with neither a stored watermark nor ``since``: refused (exit 2)."""


class TransientError(PacsError):
    """One failed attempt that a retry may cure (5xx, timeout, refused connection or association)."""


def failure_message(exc: BaseException) -> tuple[bool, str]:
    """``(usage_error, text)`` for an exception that ended a run or a plan: whether it is the
    user's to fix (exit 2: no watermark and no ``since``, a bad configuration) rather than a
    failure (exit 3: credentials refused, PACS unavailable, anything else), and the words for it.
    PACS errors never hold a secret, so neither does the text.

    >>> failure_message(PacsUnavailable("dimse://ORTHANC@pacs:4242: association refused"))
    (False, 'the PACS cannot be reached: dimse://ORTHANC@pacs:4242: association refused')
    >>> failure_message(ConfigError("source.since: not a date"))
    (True, 'source.since: not a date')
    """
    if isinstance(exc, NoWatermark):
        return True, str(exc)
    if isinstance(exc, PacsAuthError):
        return False, (f"the PACS refused medpipe's credentials: {exc} (check pacs.auth: the environment "
                       "variables or Secret block it names)")
    if isinstance(exc, PacsUnavailable):
        return False, f"the PACS cannot be reached: {exc}"
    if isinstance(exc, ConfigError):
        return True, str(exc)
    return False, f"run failed: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class StudyQuery:
    """A study-level query. Dates are inclusive days; ``modalities`` is ModalitiesInStudy (any of)."""

    date_from: date | None = None
    date_to: date | None = None
    modalities: Sequence[str] = ()
    description: str | None = None
    study_uid: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class RemoteStudy:
    study_uid: str
    study_date: str = ""
    study_time: str = ""
    modalities: tuple[str, ...] = ()
    description: str = ""
    n_series: int | None = None
    n_instances: int | None = None


@dataclass(frozen=True)
class RemoteSeries:
    series_uid: str
    modality: str = ""
    description: str = ""
    number: int | None = None
    n_instances: int | None = None


@dataclass
class StoreResult:
    """What a ``store(paths)`` call did: SOPInstanceUIDs stored and files that failed (path -> reason)."""

    stored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


@runtime_checkable
class PacsClient(Protocol):
    """What medpipe needs of a PACS; both clients implement it."""

    address: PacsAddress

    def find_studies(self, query: StudyQuery) -> list[RemoteStudy]: ...

    def find_series(self, study_uid: str) -> list[RemoteSeries]: ...

    def list_instances(self, study_uid: str, series_uid: str) -> list[str]: ...

    def retrieve_series(self, study_uid: str, series_uid: str, dest: Path) -> int: ...

    def store(self, paths: Sequence[Path]) -> StoreResult: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- throttle and retries
_SEMAPHORES: dict[str, threading.BoundedSemaphore] = {}
_SEMAPHORES_LOCK = threading.Lock()


def pacs_semaphore(address: PacsAddress, max_concurrent: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore of one PACS address (the first caller's ``max_concurrent`` sets its size),
    shared by every client of that address in the process, so parallel study tasks never exceed it."""
    key = f"{address.kind}:{address.host}:{address.port}"
    with _SEMAPHORES_LOCK:
        sem = _SEMAPHORES.get(key)
        if sem is None:
            sem = _SEMAPHORES[key] = threading.BoundedSemaphore(max_concurrent)
        return sem


@contextmanager
def throttled(sem: threading.BoundedSemaphore) -> Iterator[None]:
    sem.acquire()
    try:
        yield
    finally:
        sem.release()


def with_retries(call: Callable[[], T], *, cfg: PacsConfig, what: str,
                 on_retry: Callable[[], None] | None = None) -> T:
    """Run ``call``; after a :class:`TransientError` wait ``backoff_s * 2**k`` and try again, up to
    ``cfg.retries`` times, then raise :class:`PacsUnavailable`. Other errors (auth!) pass at once."""
    delay = cfg.backoff_s
    for attempt in range(cfg.retries + 1):
        try:
            return call()
        except TransientError as exc:
            if attempt >= cfg.retries:
                raise PacsUnavailable(f"{what}: {exc} (after {cfg.retries} retr"
                                      f"{'y' if cfg.retries == 1 else 'ies'})") from None
            log.warning("%s: %s; retry %d of %d in %.1f s", what, exc, attempt + 1, cfg.retries, delay)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def open_client(address: PacsAddress | str, pacs_cfg: PacsConfig | None = None,
                creds: Credentials | None = None, **kwargs: Any) -> PacsClient:
    """The client for ``address`` (a :class:`PacsAddress` or its URL)."""
    if isinstance(address, str):
        address = PacsAddress.parse(address)
    pacs_cfg = pacs_cfg or PacsConfig()
    creds = creds or NO_CREDENTIALS
    if address.kind == "dicomweb":
        from .dicomweb import DicomWebClient

        return DicomWebClient(address, pacs_cfg, creds, **kwargs)
    from .dimse import DimseClient

    return DimseClient(address, pacs_cfg, creds, **kwargs)
