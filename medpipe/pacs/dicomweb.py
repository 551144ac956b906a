"""DICOMweb client: QIDO-RS to query, WADO-RS to retrieve (streamed to files), STOW-RS to store.

Built on ``httpx`` rather than ``dicomweb-client`` because retrieval must stream a multipart
response part by part to disk (``dicomweb-client`` yields parsed datasets, i.e. each instance
decoded in memory) and because medpipe needs its own throttle, retries and error mapping.

When the server is an Orthanc (``GET /system`` at the HTTP root answers with Orthanc's fields),
two Orthanc extras are used: the change feed ``/changes`` (studies imported since a cursor, whatever
their StudyDate) and the series stability flag ``/series/{id}`` ``IsStable`` / ``LastUpdate``.
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import re
import ssl
import struct
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from ..config import PacsConfig
from .address import PacsAddress
from .auth import Credentials, scrub
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

log = logging.getLogger(__name__)

_UID_IN_PATH = re.compile(r"(studies|series|instances)/[0-9.]+")
#: Accept of WADO-RS retrieval: Part 10 instances in the transfer syntax the server holds (no transcoding).
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_CHUNK = 1 << 20
_STOW_BATCH_BYTES = 64 << 20


def _tag(item: dict[str, Any], tag: str, default: Any = None) -> Any:
    """First value of a DICOM JSON attribute (PN as its Alphabetic string)."""
    values = item.get(tag, {}).get("Value")
    if not values:
        return default
    v = values[0]
    return v.get("Alphabetic", default) if isinstance(v, dict) else v


def _tag_all(item: dict[str, Any], tag: str) -> tuple[str, ...]:
    return tuple(str(v) for v in item.get(tag, {}).get("Value", []) or [])


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


class DicomWebClient:
    """A DICOMweb PACS at ``address`` (``dicomweb+http(s)://HOST:PORT/PATH``).

    Every request holds the address's process-wide semaphore (``pacs.max_concurrent``) and is
    retried with backoff on 5xx, 429, timeouts and refused connections; 401/403 raise
    :class:`~medpipe.pacs.client.PacsAuthError` at once.
    """

    def __init__(self, address: PacsAddress, cfg: PacsConfig, creds: Credentials,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.address = address
        self.cfg = cfg
        self._creds = creds
        self._sem = pacs_semaphore(address, cfg.max_concurrent)
        verify: Any = str(cfg.ca_bundle) if cfg.ca_bundle else True
        self._http = httpx.Client(
            base_url=address.base_url, headers=creds.http_headers(), verify=verify,
            timeout=httpx.Timeout(cfg.timeout_s), transport=transport,
            limits=httpx.Limits(max_connections=cfg.max_concurrent, max_keepalive_connections=cfg.max_concurrent),
        )
        self._server: dict[str, Any] | None | bool = False   # False: not probed yet

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _what(self, method: str, url: str) -> str:
        """``METHOD address/path`` for messages: no credential, and no UID (messages reach run.json)."""
        path = url if url.startswith(("/", "http")) else "/" + url
        path = _UID_IN_PATH.sub(r"\1/...", path.split("?")[0])
        return scrub(f"{method} {self.address.redacted()}{path}" if not path.startswith("http")
                     else f"{method} {path}", self._creds)

    def _check(self, r: httpx.Response, what: str) -> httpx.Response:
        if r.status_code in (401, 403):
            raise PacsAuthError(f"{what}: HTTP {r.status_code}: the PACS refused medpipe's credentials "
                                f"(pacs.auth is {self._creds.kind!r})")
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise TransientError(f"HTTP {r.status_code}")
        if r.status_code >= 400:
            r.read()
            raise PacsError(f"{what}: HTTP {r.status_code}: {scrub(r.text[:300], self._creds)}")
        return r

    def _send(self, method: str, url: str, *, stream: bool = False, absolute: bool = False,
              **kwargs: Any) -> httpx.Response:
        """One request with throttle, retries and error mapping. ``stream=True`` returns an open
        response (the caller closes it; the semaphore is held only while sending: see retrieve)."""
        what = self._what(method, url)

        def attempt() -> httpx.Response:
            try:
                with throttled(self._sem):
                    if stream:
                        req = self._http.build_request(method, url, **kwargs)
                        r = self._http.send(req, stream=True)
                    else:
                        r = self._http.request(method, url, **kwargs)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                self._refuse_untrusted(exc, what)
                raise TransientError(scrub(f"{type(exc).__name__}: {exc}", self._creds)) from None
            try:
                return self._check(r, what)
            except PacsError:
                r.close()
                raise

        return with_retries(attempt, cfg=self.cfg, what=what)

    def _refuse_untrusted(self, exc: BaseException, what: str) -> None:
        """A certificate that does not verify is a configuration matter: no retry."""
        if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise PacsError(f"{what}: the server's TLS certificate is not trusted (set pacs.ca_bundle to the "
                            f"CA that signed it): {exc}") from None

    def _json(self, url: str, params: dict[str, Any] | None = None) -> Any:
        if params:
            url = f"{url}?{_query_string(params)}"
        r = self._send("GET", url, headers={"Accept": "application/dicom+json"})
        if r.status_code == 204 or not r.content:
            return []
        try:
            return r.json()
        except json.JSONDecodeError:
            raise PacsError(f"{self._what('GET', url)}: the answer is not JSON") from None

    # ------------------------------------------------------------------ QIDO-RS
    def find_studies(self, query: StudyQuery) -> list[RemoteStudy]:
        """QIDO-RS ``/studies`` by StudyDate range, ModalitiesInStudy (several as one comma list,
        matched as any of) and StudyDescription, each with its instance and series counts."""
        params: dict[str, Any] = {"includefield": [
            "StudyDate", "StudyTime", "ModalitiesInStudy", "StudyDescription",
            "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]}   # repeated: Orthanc reads no comma list
        if query.date_from or query.date_to:
            lo = query.date_from.strftime("%Y%m%d") if query.date_from else ""
            hi = query.date_to.strftime("%Y%m%d") if query.date_to else ""
            params["StudyDate"] = f"{lo}-{hi}"
        if query.description:
            params["StudyDescription"] = query.description
        if query.study_uid:
            params["StudyInstanceUID"] = query.study_uid
        if query.limit:
            params["limit"] = query.limit
        if query.modalities:
            params["ModalitiesInStudy"] = ",".join(query.modalities)
        found: dict[str, RemoteStudy] = {}
        for item in self._json("studies", params):
            s = RemoteStudy(
                study_uid=str(_tag(item, "0020000D", "")), study_date=str(_tag(item, "00080020", "") or ""),
                study_time=str(_tag(item, "00080030", "") or ""), modalities=_tag_all(item, "00080061"),
                description=str(_tag(item, "00081030", "") or ""),
                n_series=_int(_tag(item, "00201206")), n_instances=_int(_tag(item, "00201208")),
            )
            if s.study_uid:
                found[s.study_uid] = s
        return list(found.values())

    def find_series(self, study_uid: str) -> list[RemoteSeries]:
        """QIDO-RS ``/studies/{uid}/series`` with NumberOfSeriesRelatedInstances."""
        items = self._json(f"studies/{study_uid}/series", {
            "includefield": ["Modality", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances"]})
        return [RemoteSeries(series_uid=str(_tag(i, "0020000E", "")), modality=str(_tag(i, "00080060", "") or ""),
                             description=str(_tag(i, "0008103E", "") or ""), number=_int(_tag(i, "00200011")),
                             n_instances=_int(_tag(i, "00201209")))
                for i in items if _tag(i, "0020000E")]

    def list_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """SOPInstanceUIDs of a series (QIDO-RS ``.../instances``)."""
        items = self._json(f"studies/{study_uid}/series/{series_uid}/instances", {"includefield": "00080018"})
        return sorted(str(_tag(i, "00080018")) for i in items if _tag(i, "00080018"))

    # ------------------------------------------------------------------ WADO-RS
    def retrieve_series(self, study_uid: str, series_uid: str, dest: Path) -> int:
        """Stream ``/studies/{uid}/series/{uid}`` (multipart/related) into ``dest``, one Part 10 file per
        instance as the server holds it (compressed transfer syntaxes included); return the count.

        Memory stays flat: each part goes to disk in chunks as it arrives. A failure mid-stream
        removes this attempt's files and is retried as a whole.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        url = f"studies/{study_uid}/series/{series_uid}"
        what = self._what("GET", url)

        def attempt() -> int:
            written: list[Path] = []
            try:
                with throttled(self._sem):
                    conn, r = self._open_stream(url, what)
                    try:
                        if r.status == 204:
                            return 0
                        boundary = _boundary(r.getheader("content-type", ""), what)
                        with _FileWriter() as writer:   # disk writes overlap the socket reads
                            for part in _iter_parts(iter(lambda: r.read(_CHUNK), b""), boundary, what):
                                head = bytearray()
                                for chunk in part:   # enough of the part to read its file meta
                                    head += chunk
                                    if len(head) >= 4096:
                                        break
                                path = dest / instance_file_name(sop_uid_from_meta(bytes(head[:4096])))
                                written.append(path)
                                writer.open(path)
                                writer.write(bytes(head))
                                for chunk in part:
                                    writer.write(chunk)
                    except (OSError, http.client.HTTPException) as exc:
                        raise TransientError(scrub(f"{type(exc).__name__}: {exc}", self._creds)) from None
                    finally:
                        conn.close()
            except BaseException:
                for p in written:
                    p.unlink(missing_ok=True)
                raise
            return len(written)

        return with_retries(attempt, cfg=self.cfg, what=what)

    def _open_stream(self, url: str, what: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """``GET`` with the standard library's http.client, read in 1 MiB pieces: on 2 busy cores it
        moves a WADO-RS series about twice as fast as httpx's 64 KiB stream (benchmarks/pacs.py)."""
        a = self.address
        if a.tls:
            ctx = ssl.create_default_context(cafile=str(self.cfg.ca_bundle) if self.cfg.ca_bundle else None)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                a.host, a.port, timeout=self.cfg.timeout_s, context=ctx)
        else:
            conn = http.client.HTTPConnection(a.host, a.port, timeout=self.cfg.timeout_s)
        try:
            conn.request("GET", f"{a.path}/{url}", headers={"Accept": WADO_ACCEPT, **self._creds.http_headers()})
            r = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._refuse_untrusted(exc, what)
            raise TransientError(scrub(f"{type(exc).__name__}: {exc}", self._creds)) from None
        if r.status >= 400:
            body = r.read(300).decode("utf-8", "replace")
            conn.close()
            if r.status in (401, 403):
                raise PacsAuthError(f"{what}: HTTP {r.status}: the PACS refused medpipe's credentials "
                                    f"(pacs.auth is {self._creds.kind!r})")
            if r.status >= 500 or r.status in (408, 429):
                raise TransientError(f"HTTP {r.status}")
            raise PacsError(f"{what}: HTTP {r.status}: {scrub(body, self._creds)}")
        return conn, r

    # ------------------------------------------------------------------ STOW-RS
    def store(self, paths: Sequence[Path]) -> StoreResult:
        """STOW-RS ``POST /studies`` of Part 10 files, streamed in batches; per-file outcome from the answer."""
        from pydicom import dcmread

        result = StoreResult()
        sop_of: dict[str, str] = {}
        for p in paths:
            try:
                sop_of[str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)] = str(p)
            except Exception as exc:  # noqa: BLE001 - a bad file is one failed entry, not a failed call
                result.failed[str(p)] = f"not a readable DICOM file ({exc})"
        batch: list[Path] = []
        size = 0
        for p in [Path(x) for x in sop_of.values()]:
            batch.append(p)
            size += p.stat().st_size
            if size >= _STOW_BATCH_BYTES:
                self._stow(batch, sop_of, result)
                batch, size = [], 0
        if batch:
            self._stow(batch, sop_of, result)
        return result

    def _stow(self, batch: list[Path], sop_of: dict[str, str], result: StoreResult) -> None:
        boundary = uuid.uuid4().hex
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json"}

        def body() -> Iterator[bytes]:
            for p in batch:
                yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                with open(p, "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        yield chunk
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode()

        # a generator body cannot be replayed: each attempt builds a fresh one
        r = self._send_stow(headers, body)
        answer = r.json() if r.content else {}
        ok = {str(_tag(i, "00081155")) for i in (answer.get("00081199", {}).get("Value") or [])}
        bad = {str(_tag(i, "00081155")): f"failure reason {_tag(i, '00081197')}"
               for i in (answer.get("00081198", {}).get("Value") or [])}
        in_batch = {sop: path for sop, path in sop_of.items() if Path(path) in set(batch)}
        for sop, path in in_batch.items():
            if sop in ok:
                result.stored.append(sop)
            else:
                result.failed[path] = bad.get(sop, "not acknowledged by the server")

    def _send_stow(self, headers: dict[str, str], body: Any) -> httpx.Response:
        what = self._what("POST", "studies")

        def attempt() -> httpx.Response:
            try:
                with throttled(self._sem):
                    r = self._http.post("studies", content=body(), headers=headers)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                raise TransientError(scrub(f"{type(exc).__name__}: {exc}", self._creds)) from None
            if r.status_code in (202, 409):   # partial success / all failed: the body says which
                return r
            return self._check(r, what)

        return with_retries(attempt, cfg=self.cfg, what=what)

    # ------------------------------------------------------------------ Orthanc extras
    def _root_url(self, path: str) -> str:
        scheme = "https" if self.address.tls else "http"
        host = f"[{self.address.host}]" if ":" in self.address.host else self.address.host
        return f"{scheme}://{host}:{self.address.port}{path}"

    def orthanc(self) -> dict[str, Any] | None:
        """Orthanc's ``/system`` when the server is an Orthanc (REST at the HTTP root), else None."""
        if self._server is False:
            info: dict[str, Any] | None = None
            try:
                r = self._send("GET", self._root_url("/system"))
                data = r.json()
                if isinstance(data, dict) and "DicomAet" in data and "Version" in data:
                    info = data
            except PacsAuthError:
                raise
            except (PacsError, ValueError):
                info = None
            self._server = info
        return self._server or None

    def changes(self, since: int | None) -> tuple[set[str], int]:
        """Studies (StudyInstanceUIDs) with new or newly stable series since the cursor ``since``, and
        the new cursor. ``since=None`` reads no history: only the current cursor (a first run's
        window query already covers the past). Orthanc only."""
        if since is None:
            last = self._send("GET", self._root_url("/changes"), params={"last": ""}).json()
            return set(), int(last.get("Last", 0))
        study_ids: set[str] = set()
        series_ids: set[str] = set()
        cursor = since
        while True:
            page = self._send("GET", self._root_url("/changes"), params={"since": cursor, "limit": 1000}).json()
            for ch in page.get("Changes", []):
                kind = ch.get("ChangeType", "")
                if kind in ("NewStudy", "StableStudy"):
                    study_ids.add(ch["ID"])
                elif kind in ("NewSeries", "StableSeries"):
                    series_ids.add(ch["ID"])
            cursor = int(page.get("Last", cursor))
            if page.get("Done", True):
                break
        for sid in series_ids:
            info = self._rest_get(f"/series/{sid}")
            if info and info.get("ParentStudy"):
                study_ids.add(info["ParentStudy"])
        uids = set()
        for sid in study_ids:
            info = self._rest_get(f"/studies/{sid}")
            uid = (info or {}).get("MainDicomTags", {}).get("StudyInstanceUID")
            if uid:
                uids.add(uid)
        return uids, cursor

    def _rest_get(self, path: str) -> dict[str, Any] | None:
        """Orthanc REST ``GET`` (None when the resource is gone)."""
        try:
            return self._send("GET", self._root_url(path)).json()
        except PacsError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    def series_stability(self, series_uid: str) -> bool | None:
        """Orthanc's ``IsStable`` of the series (None: not an Orthanc, or the series is unknown)."""
        if self.orthanc() is None:
            return None
        r = self._send("POST", self._root_url("/tools/lookup"), content=series_uid)
        ids = [x["ID"] for x in r.json() if x.get("Type") == "Series"]
        if not ids:
            return None
        info = self._rest_get(f"/series/{ids[0]}")
        return None if info is None else bool(info.get("IsStable"))


def _query_string(params: dict[str, Any]) -> str:
    """A QIDO query string with DICOM's matching characters (``* ? , -``) left literal: Orthanc's
    QIDO does not decode ``%2A`` back to ``*`` (and matches nothing then). Lists repeat the key.

    >>> _query_string({"StudyDate": "20260101-", "StudyDescription": "CT*", "includefield": ["a", "b"]})
    'StudyDate=20260101-&StudyDescription=CT*&includefield=a&includefield=b'
    """
    parts = []
    for key, value in params.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            parts.append(f"{quote(str(key), safe='')}={quote(str(v), safe='*?,-.:_')}")
    return "&".join(parts)


class _FileWriter:
    """Writes files on a thread of its own, fed through a bounded queue (at most ``_QUEUE`` chunks of
    up to 1 MiB in flight), so that reading the next bytes from the socket does not wait for the disk.
    An error on the writer's side is raised in the caller at the next call or on exit."""

    _QUEUE = 16

    def __init__(self) -> None:
        self._q: queue.Queue[tuple[str, Any]] = queue.Queue(self._QUEUE)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="medpipe-wado-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fh = None
        while True:
            op, arg = self._q.get()
            if op == "stop":
                break
            if self._error is not None:
                continue   # drain
            try:
                if op == "open":
                    if fh is not None:
                        fh.close()
                    fh = open(arg, "wb")
                elif fh is not None:
                    fh.write(arg)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._error = exc
        if fh is not None:
            fh.close()

    def _put(self, op: str, arg: Any) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((op, arg))

    def open(self, path: Path) -> None:
        self._put("open", path)

    def write(self, data: bytes) -> None:
        self._put("data", data)

    def __enter__(self) -> _FileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._q.put(("stop", None))
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error


# --------------------------------------------------------------------------- files named by SOP UID
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def sop_uid_from_meta(head: bytes) -> str | None:
    """MediaStorageSOPInstanceUID from the start of a Part 10 file (its file meta group), or None.

    >>> import io, pydicom
    >>> from pydicom.dataset import FileMetaDataset
    >>> ds = pydicom.Dataset(); ds.SOPInstanceUID = "1.2.3.4"; ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    >>> ds.file_meta = FileMetaDataset(); ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    >>> ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    >>> ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    >>> buf = io.BytesIO(); ds.save_as(buf, enforce_file_format=True)
    >>> sop_uid_from_meta(buf.getvalue())
    '1.2.3.4'
    """
    if head[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return None
        vr = head[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if pos + 12 > len(head):
                return None
            length, hdr = struct.unpack_from("<I", head, pos + 8)[0], 12
        else:
            length, hdr = struct.unpack_from("<H", head, pos + 6)[0], 8
        if elem == 0x0003:
            value = head[pos + hdr:pos + hdr + length].rstrip(b"\0 ").decode("ascii", "replace")
            return value if _UID.match(value) and len(value) <= 64 else None
        pos += hdr + length
    return None


def instance_file_name(sop_uid: str | None) -> str:
    """``<SOPInstanceUID>.dcm`` (so the arrived instances are known without reading the files
    again), or a random name when the UID could not be read (the file is then read to check it)."""
    return f"{sop_uid}.dcm" if sop_uid and _UID.match(sop_uid) else f"x-{uuid.uuid4().hex}.dcm"


# --------------------------------------------------------------------------- multipart/related, streamed
def _boundary(content_type: str, what: str) -> bytes:
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if not content_type.lower().startswith("multipart/related") or not m:
        raise PacsError(f"{what}: expected multipart/related with a boundary, got {content_type!r}")
    return m.group(1).encode()


def _iter_parts(chunks: Iterator[bytes], boundary: bytes, what: str) -> Iterator[Iterator[bytes]]:
    """Split a multipart body into parts, each an iterator of body chunks (headers dropped).

    Only ``len(delimiter)`` bytes are kept back between chunks, so a part of any size streams
    through without being held whole. Each part's iterator must be consumed before the next.
    """
    delim = b"\r\n--" + boundary
    buf = bytearray(b"\r\n")   # the first delimiter has no CRLF before it
    it = iter(chunks)
    eof = False

    def fill() -> bool:
        nonlocal eof
        if eof:
            return False
        try:
            buf.extend(next(it))
            return True
        except StopIteration:
            eof = True
            return False

    # preamble: up to the first delimiter
    while (i := buf.find(delim)) < 0:
        if len(buf) > len(delim):
            del buf[: len(buf) - len(delim)]
        if not fill():
            raise PacsError(f"{what}: multipart body without a boundary line")
    del buf[: i + len(delim)]
    while True:
        while len(buf) < 2 and fill():
            pass
        if buf[:2] == b"--":
            return   # close delimiter
        while (h := buf.find(b"\r\n\r\n")) < 0:
            if not fill():
                raise PacsError(f"{what}: truncated multipart part headers")
        del buf[: h + 4]

        def body() -> Iterator[bytes]:
            while True:
                j = buf.find(delim)
                if j >= 0:
                    if j:
                        yield bytes(buf[:j])
                    del buf[: j + len(delim)]
                    return
                keep = len(delim)
                if len(buf) > keep:
                    out = bytes(buf[: len(buf) - keep])
                    del buf[: len(buf) - keep]
                    yield out
                if not fill():
                    raise TransientError("the multipart body ended inside a part (connection cut?)")

        yield body()

