"""DIMSE client: C-FIND to query and C-GET to retrieve on medpipe's own socket loop
(:mod:`medpipe.pacs.dimse_get`), C-MOVE to medpipe's own C-STORE SCP and C-STORE to send with
pynetdicom.

Retrieval writes each instance to its own Part 10 file as it arrives (the dataset bytes as
received, never decoded, in the transfer syntax the PACS sent; C-GET streams them to the file PDU
by PDU), so a study never sits in memory. For C-GET medpipe offers the storage SOP classes of
images with the SCP role, each once per transfer syntax (uncompressed, JPEG, JPEG-LS, JPEG 2000,
RLE), so that the PACS can send compressed instances as it holds them instead of transcoding.

Association failures: a permanent rejection for an unknown calling or called AE title raises
:class:`~medpipe.pacs.client.PacsAuthError` at once (AE titles are DIMSE's credentials); a
transient rejection, a refused connection, an abort or a timeout is retried with backoff.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
)

from ..config import PacsConfig
from .address import PacsAddress
from .auth import Credentials
from .client import (
    PacsAuthError,
    PacsError,
    RemoteSeries,
    RemoteStudy,
    StoreResult,
    StudyQuery,
    TransientError,
    pacs_semaphore,
    throttled,
    with_retries,
)
from .dicomweb import _FileWriter, instance_file_name
from .dimse_get import GetAssociation, Rejected, StatusFailed

log = logging.getLogger(__name__)

#: Image storage SOP classes offered for C-GET (with 10 transfer-syntax contexts each: 12 x 10 + 1 <= 128).
GET_STORAGE_CLASSES: tuple[UID, ...] = (
    CTImageStorage, EnhancedCTImageStorage, MRImageStorage, EnhancedMRImageStorage,
    ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
    PositronEmissionTomographyImageStorage, NuclearMedicineImageStorage, UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage, SecondaryCaptureImageStorage, XRayAngiographicImageStorage,
)
#: One context per compressed syntax (a context settles on one syntax); the uncompressed pair share one.
GET_TRANSFER_SYNTAXES: tuple[tuple[UID, ...], ...] = (
    (ExplicitVRLittleEndian, ImplicitVRLittleEndian), (JPEGLosslessSV1,), (JPEGBaseline8Bit,),
    (JPEGExtended12Bit,), (JPEG2000Lossless,), (JPEG2000,), (JPEGLSLossless,), (JPEGLSNearLossless,),
    (RLELossless,),
)
# A-ASSOCIATE-RJ reasons (source 1, service user) that mean "these AE titles are not accepted".
_RJ_CALLING_AET, _RJ_CALLED_AET = 3, 7


def _da(d: Any) -> str:
    return d.strftime("%Y%m%d") if d else ""


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


class DimseClient:
    """A DIMSE PACS at ``address`` (``dimse://CALLED_AET@HOST:PORT``); see the module docstring."""

    def __init__(self, address: PacsAddress, cfg: PacsConfig, creds: Credentials | None = None) -> None:
        self.address = address
        self.cfg = cfg
        self._sem = pacs_semaphore(address, cfg.max_concurrent)

    def close(self) -> None:
        pass   # one association per operation: nothing is held between calls

    def __enter__(self) -> DimseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ associations
    def _ae(self) -> AE:
        ae = AE(ae_title=self.cfg.calling_aet)
        t = self.cfg.timeout_s
        ae.acse_timeout = t
        ae.dimse_timeout = t
        ae.network_timeout = t
        ae.connection_timeout = t
        return ae

    @contextmanager
    def _association(self, what: str, contexts: list[Any], ext_neg: list[Any] | None = None,
                     handlers: list[Any] | None = None) -> Iterator[Any]:
        """An established association (throttled); rejections and failures mapped to medpipe errors."""
        ae = self._ae()
        ae.requested_contexts = contexts
        rejection: dict[str, int] = {}

        def on_acse(event: Any) -> None:
            p = event.primitive
            if getattr(p, "result", None) in (0x01, 0x02):
                rejection.update(result=p.result, source=p.result_source, reason=p.diagnostic)

        with throttled(self._sem):
            assoc = ae.associate(self.address.host, self.address.port, ae_title=self.address.called_aet,
                                 max_pdu=0, ext_neg=ext_neg,
                                 evt_handlers=[(evt.EVT_ACSE_RECV, on_acse), (evt.EVT_CONN_OPEN, _no_delay),
                                               *(handlers or [])])
            if not assoc.is_established:
                if rejection:
                    raise self._rejected(what, rejection["result"], rejection["source"], rejection["reason"])
                raise TransientError("no association (connection refused, aborted or timed out)")
            try:
                yield assoc
            finally:
                if assoc.is_established:
                    assoc.release()

    def _rejected(self, what: str, result: int, source: int, reason: int) -> PacsError:
        """The error of an A-ASSOCIATE-RJ: unknown AE titles are an auth error, other permanent
        rejections an error, transient ones a retry."""
        where = self.address.redacted()
        if result == 0x01 and source == 0x01 and reason in (_RJ_CALLING_AET, _RJ_CALLED_AET):
            which = "calling" if reason == _RJ_CALLING_AET else "called"
            return PacsAuthError(f"{what} {where}: association rejected: {which} AE title not recognised "
                                 f"(calling {self.cfg.calling_aet!r}, called {self.address.called_aet!r})")
        if result == 0x01:
            return PacsError(f"{what} {where}: association rejected permanently "
                             f"(result {result}, source {source}, reason {reason})")
        return TransientError("association rejected (transient)")

    def _what(self, op: str) -> str:
        return f"{op} {self.address.redacted()}"

    # ------------------------------------------------------------------ C-FIND
    @contextmanager
    def _link(self, what: str, contexts: list[Any], roles: Sequence[Any] = ()) -> Iterator[GetAssociation]:
        """An association on medpipe's own socket loop (throttled), released after the block, aborted
        on an error; rejections mapped as for :meth:`_association`."""
        link = GetAssociation(self.address.host, self.address.port, calling_aet=self.cfg.calling_aet,
                              called_aet=self.address.called_aet, timeout_s=self.cfg.timeout_s)
        with throttled(self._sem):
            try:
                link.open(contexts, roles)
            except Rejected as rj:
                raise self._rejected(what, rj.result, rj.source, rj.reason) from None
            try:
                yield link
            except BaseException:
                link.abort()
                raise
            link.release()

    def _find(self, identifier: Dataset) -> list[Dataset]:
        """C-FIND on medpipe's own loop (pynetdicom's reactors would cost more than the PACS's answer)."""
        what = self._what(f"C-FIND {identifier.QueryRetrieveLevel}")

        def attempt() -> list[Dataset]:
            try:
                with self._link(what, [build_context(StudyRootQueryRetrieveInformationModelFind)]) as link:
                    return link.find(StudyRootQueryRetrieveInformationModelFind, identifier)
            except StatusFailed as exc:
                if exc.status == 0xA700 or (exc.status & 0xF000) == 0xC000:
                    raise PacsError(f"{what}: failed with status 0x{exc.status:04X}") from None
                raise TransientError(f"C-FIND status 0x{exc.status:04X}") from None

        return with_retries(attempt, cfg=self.cfg, what=what)

    def find_studies(self, query: StudyQuery) -> list[RemoteStudy]:
        """C-FIND at STUDY level (several modalities as one multi-valued ModalitiesInStudy), with
        NumberOfStudyRelated* counts."""
        found: dict[str, RemoteStudy] = {}
        for modality in ["\\".join(query.modalities)]:
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = query.study_uid or ""
            q.StudyDate = f"{_da(query.date_from)}-{_da(query.date_to)}" if (query.date_from or query.date_to) else ""
            q.StudyTime = ""
            q.ModalitiesInStudy = modality
            q.StudyDescription = query.description or ""
            q.NumberOfStudyRelatedSeries = None
            q.NumberOfStudyRelatedInstances = None
            for ds in self._find(q):
                uid = str(ds.get("StudyInstanceUID", "") or "")
                if not uid:
                    continue
                mods = ds.get("ModalitiesInStudy") or ()
                mods = (str(mods),) if isinstance(mods, str) else tuple(str(m) for m in mods)
                found[uid] = RemoteStudy(
                    study_uid=uid, study_date=str(ds.get("StudyDate", "") or ""),
                    study_time=str(ds.get("StudyTime", "") or ""), modalities=mods,
                    description=str(ds.get("StudyDescription", "") or ""),
                    n_series=_int(ds.get("NumberOfStudyRelatedSeries")),
                    n_instances=_int(ds.get("NumberOfStudyRelatedInstances")))
        studies = list(found.values())
        return studies[: query.limit] if query.limit else studies

    def find_series(self, study_uid: str) -> list[RemoteSeries]:
        """C-FIND at SERIES level with NumberOfSeriesRelatedInstances."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.Modality = ""
        q.SeriesDescription = ""
        q.SeriesNumber = None
        q.NumberOfSeriesRelatedInstances = None
        return [RemoteSeries(series_uid=str(ds.SeriesInstanceUID), modality=str(ds.get("Modality", "") or ""),
                             description=str(ds.get("SeriesDescription", "") or ""),
                             number=_int(ds.get("SeriesNumber")),
                             n_instances=_int(ds.get("NumberOfSeriesRelatedInstances")))
                for ds in self._find(q) if ds.get("SeriesInstanceUID")]

    def list_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """SOPInstanceUIDs of a series (C-FIND at IMAGE level)."""
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        q.SOPInstanceUID = ""
        return sorted(str(ds.SOPInstanceUID) for ds in self._find(q) if ds.get("SOPInstanceUID"))

    # ------------------------------------------------------------------ C-GET
    def retrieve_series(self, study_uid: str, series_uid: str, dest: Path) -> int:
        """Retrieve a series into ``dest`` (C-GET, or C-MOVE when ``pacs.retrieve`` is "move");
        return the number of instances written."""
        if self.cfg.retrieve == "move":
            return self._move_series(study_uid, series_uid, Path(dest))
        return self._get_series(study_uid, series_uid, Path(dest))

    def _series_identifier(self, study_uid: str, series_uid: str) -> Dataset:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        return q

    def _get_series(self, study_uid: str, series_uid: str, dest: Path) -> int:
        """C-GET on medpipe's own socket loop (:mod:`medpipe.pacs.dimse_get`: each dataset streamed
        to its file as its PDUs arrive), one association per attempt, throttled like the others."""
        dest.mkdir(parents=True, exist_ok=True)
        what = self._what("C-GET")

        def attempt() -> int:
            contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
            contexts += [build_context(sop, list(ts)) for sop in GET_STORAGE_CLASSES for ts in GET_TRANSFER_SYNTAXES]
            roles = [build_role(sop, scp_role=True) for sop in GET_STORAGE_CLASSES]
            written: list[Path] = []
            try:
                with self._link(what, contexts, roles) as link:
                    status = link.get(StudyRootQueryRetrieveInformationModelGet,
                                      self._series_identifier(study_uid, series_uid), dest, written)
            except StatusFailed as exc:
                for p in written:
                    p.unlink(missing_ok=True)
                _raise_for_final(exc.status, exc.failed, what)
                raise PacsError(f"{what}: failed with status 0x{exc.status:04X}") from None
            except BaseException:
                for p in written:
                    p.unlink(missing_ok=True)
                raise
            if status == 0xB000:
                log.warning("%s: some sub-operation(s) failed; the arrival check will tell what is missing", what)
            return len(written)

        return with_retries(attempt, cfg=self.cfg, what=what)

    # ------------------------------------------------------------------ C-MOVE
    def _move_series(self, study_uid: str, series_uid: str, dest: Path) -> int:
        dest.mkdir(parents=True, exist_ok=True)
        what = self._what(f"C-MOVE to {self.cfg.move_aet}")
        receiver = StoreReceiver.shared(self.cfg.move_aet, self.cfg.move_port)

        def attempt() -> int:
            written: list[Path] = []
            try:
                with receiver.route(series_uid, dest, written):
                    with self._association(what, [build_context(StudyRootQueryRetrieveInformationModelMove)]) as a:
                        _drain_retrieve(a.send_c_move(self._series_identifier(study_uid, series_uid),
                                                      self.cfg.move_aet, StudyRootQueryRetrieveInformationModelMove),
                                        what)
            except BaseException:
                for p in written:
                    p.unlink(missing_ok=True)
                raise
            return len(written)

        return with_retries(attempt, cfg=self.cfg, what=what)

    # ------------------------------------------------------------------ C-STORE
    def store(self, paths: Sequence[Path]) -> StoreResult:
        """C-STORE each file on one association (contexts from the files' SOP classes and transfer syntaxes)."""
        result = StoreResult()
        heads: dict[str, Dataset] = {}
        for p in paths:
            try:
                heads[str(p)] = dcmread(p, stop_before_pixels=True)
            except Exception as exc:  # noqa: BLE001 - one bad file is one failed entry
                result.failed[str(p)] = f"not a readable DICOM file ({exc})"
        if not heads:
            return result
        pairs = {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in heads.values()}
        by_class: dict[str, set[str]] = {}
        for sop, ts in pairs:
            by_class.setdefault(sop, {ExplicitVRLittleEndian, ImplicitVRLittleEndian}).add(ts)
        contexts = [build_context(sop, sorted(ts)) for sop, ts in sorted(by_class.items())]
        what = self._what("C-STORE")
        pending = dict(heads)

        def attempt() -> None:
            with self._association(what, contexts) as assoc:
                for path in list(pending):
                    status = assoc.send_c_store(Path(path))
                    if not status:
                        raise TransientError("C-STORE: no response (timeout or abort)")
                    code = int(status.Status)
                    sop = str(pending[path].SOPInstanceUID)
                    if code in (0x0000, 0xB000, 0xB007, 0xB006):
                        result.stored.append(sop)
                    else:
                        result.failed[path] = f"C-STORE status 0x{code:04X}"
                    del pending[path]

        with_retries(attempt, cfg=self.cfg, what=what)
        return result


def _no_delay(event: Any) -> None:
    """TCP_NODELAY on the association's socket: a small C-STORE-RSP otherwise waits on Nagle's
    algorithm for the peer's delayed ACK (tens of ms per instance in C-GET)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _file_writer(dest_of: Callable[[Any], Path | None], written: list[Path],
                 writer: _FileWriter | None = None) -> Callable[[Any], int]:
    """An EVT_C_STORE handler that writes the received bytes (with file meta) as a Part 10 file,
    through ``writer``'s thread when given (the arrival check runs after it has finished)."""

    def handle(event: Any) -> int:
        dest = dest_of(event)
        if dest is None:
            return 0xA700   # refused (out of resources): nobody here asked for this series
        path = dest / instance_file_name(str(event.request.AffectedSOPInstanceUID or ""))
        data = event.encoded_dataset(include_meta=True)
        written.append(path)
        if writer is None:
            path.write_bytes(data)
        else:
            writer.open(path)
            writer.write(data)
        return 0x0000

    return handle


def _drain_retrieve(responses: Iterator[tuple[Dataset, Dataset | None]], what: str) -> None:
    """Consume C-GET/C-MOVE responses; a failed or partial end is an error (counts are checked later too)."""
    final = None
    for status, _ in responses:
        if not status:
            raise TransientError("no response (timeout or abort)")
        final = status
    if final is None:
        raise TransientError("no final response")
    code = int(final.Status)
    failed = _int(final.get("NumberOfFailedSuboperations")) or 0
    _raise_for_final(code, failed, what)
    if code == 0xB000 and failed:
        log.warning("%s: %d sub-operation(s) failed; the counts check will tell what is missing", what, failed)


def _raise_for_final(code: int, failed: int, what: str) -> None:
    """Raise the error of a failed or refused final C-GET/C-MOVE status (nothing for the others)."""
    if code == 0xA702 or (code & 0xF000) in (0xA000, 0xC000):
        raise PacsError(f"{what}: failed with status 0x{code:04X} ({failed} sub-operation(s) failed)")
    if code == 0xA701 or code == 0xA801:
        raise PacsError(f"{what}: refused with status 0x{code:04X} (move destination unknown to the PACS?)")


class StoreReceiver:
    """medpipe's own C-STORE SCP for C-MOVE, one per (AE title, port) in the process.

    Incoming instances are routed by SeriesInstanceUID to the folder of the retrieval that asked
    for that series; anything else is refused (status 0xA700).
    """

    _shared: dict[tuple[str, int], StoreReceiver] = {}
    _lock = threading.Lock()

    def __init__(self, aet: str, port: int) -> None:
        self._routes: dict[str, tuple[Path, list[Path]]] = {}
        self._routes_lock = threading.Lock()
        ae = AE(ae_title=aet)
        for sop in GET_STORAGE_CLASSES:
            for ts in GET_TRANSFER_SYNTAXES:
                ae.add_supported_context(sop, list(ts))
        self._server = ae.start_server(("", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._handle)])

    @classmethod
    def shared(cls, aet: str, port: int) -> StoreReceiver:
        with cls._lock:
            rcv = cls._shared.get((aet, port))
            if rcv is None:
                rcv = cls._shared[(aet, port)] = cls(aet, port)
            return rcv

    @contextmanager
    def route(self, series_uid: str, dest: Path, written: list[Path]) -> Iterator[None]:
        with self._routes_lock:
            self._routes[series_uid] = (dest, written)
        try:
            yield
        finally:
            with self._routes_lock:
                self._routes.pop(series_uid, None)

    def _handle(self, event: Any) -> int:
        series = str(event.dataset.get("SeriesInstanceUID", ""))
        with self._routes_lock:
            route = self._routes.get(series)
        if route is None:
            return 0xA700
        dest, written = route
        return _file_writer(lambda _e: dest, written)(event)

    def shutdown(self) -> None:
        self._server.shutdown()
        with self._lock:
            for k, v in list(self._shared.items()):
                if v is self:
                    del self._shared[k]
