"""C-FIND and C-GET over one plain socket, each retrieved instance streamed to its file as its PDUs arrive.

pynetdicom runs every PDU through two reactor threads, queues and pydicom-decoded command sets:
for a C-GET that was most of the time spent (far behind DCMTK's ``getscu`` against the same
PACS), and a C-FIND listing beside it took the cores from the retrieval. Here the data phase is
a loop on the socket: P-DATA fragments of a dataset go to the open file as they come (memory
holds at most one PDU, of at most :data:`MAX_PDU` bytes); the few command sets (C-STORE-RQ,
C-GET-RSP and C-FIND-RSP in; C-STORE-RSP, C-GET-RQ and C-FIND-RQ out) are read and written by
hand in Implicit VR Little Endian; identifiers are encoded and decoded by pydicom, and
pynetdicom encodes the A-ASSOCIATE-RQ (presentation contexts, SCP role selection) and decodes
the answer.

Each file is ``<AffectedSOPInstanceUID>.dcm``: a Part 10 file meta group (written here) followed
by the dataset bytes as received, never decoded, in the transfer syntax the PACS chose.
"""

from __future__ import annotations

import socket
import struct
from io import BytesIO
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset
from pydicom.uid import ImplicitVRLittleEndian, UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from .client import PacsError, TransientError
from .dicomweb import instance_file_name

#: The largest PDU medpipe accepts (what one socket read may hold in memory).
MAX_PDU = 1 << 20
_APP_CONTEXT = UID("1.2.840.10008.3.1.1.1")
_RQ, _AC, _RJ, _PDATA, _RELEASE_RQ, _RELEASE_RP, _ABORT = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
# command set elements (group 0000)
_AFFECTED_CLASS, _COMMAND, _MSG_ID, _RESPONDED_TO = 0x0002, 0x0100, 0x0110, 0x0120
_PRIORITY, _DATASET_TYPE, _STATUS, _AFFECTED_INSTANCE = 0x0700, 0x0800, 0x0900, 0x1000
_N_FAILED = 0x1022
_C_STORE_RQ, _C_STORE_RSP, _C_GET_RQ, _C_GET_RSP, _C_FIND_RQ, _C_FIND_RSP = 0x0001, 0x8001, 0x0010, 0x8010, 0x0020, 0x8020
_NO_DATASET = 0x0101


class Rejected(PacsError):
    """A-ASSOCIATE-RJ: ``result`` (1 permanent, 2 transient), ``source`` and ``reason`` as sent."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        super().__init__(f"association rejected (result {result}, source {source}, reason {reason})")
        self.result, self.source, self.reason = result, source, reason


class StatusFailed(PacsError):
    """A failed final C-GET-RSP or C-FIND-RSP: ``status`` and ``failed`` (NumberOfFailedSuboperations)."""

    def __init__(self, status: int, failed: int = 0) -> None:
        super().__init__(f"DIMSE status 0x{status:04X}")
        self.status, self.failed = status, failed


# --------------------------------------------------------------------------- encoding by hand
def _ui(uid: str) -> bytes:
    b = uid.encode("ascii")
    return b + b"\0" if len(b) % 2 else b


def _us(v: int) -> bytes:
    return struct.pack("<H", v)


def command_set(elements: dict[int, bytes]) -> bytes:
    """An Implicit VR Little Endian command set (group 0000) with its group length.

    >>> parse_command(command_set({0x0100: _us(0x8001)}))[0x0100]
    b'\\x01\\x80'
    """
    body = b"".join(struct.pack("<HHI", 0, elem, len(v)) + v for elem, v in sorted(elements.items()))
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def parse_command(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """Element number -> value bytes of an Implicit VR Little Endian command set."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group == 0:
            out[elem] = bytes(data[pos:pos + length])
        pos += length
    return out


def _read_us(cmd: dict[int, bytes], elem: int, default: int = 0) -> int:
    v = cmd.get(elem)
    return struct.unpack("<H", v[:2])[0] if v and len(v) >= 2 else default


def _read_ui(cmd: dict[int, bytes], elem: int) -> str:
    return cmd.get(elem, b"").rstrip(b"\0 ").decode("ascii", "replace")


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group (Explicit VR Little Endian) of a Part 10 file."""

    def el(elem: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2sHI", 2, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value

    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = (el(0x0001, b"OB", b"\0\1") + el(0x0002, b"UI", _ui(sop_class)) + el(0x0003, b"UI", _ui(sop_instance))
            + el(0x0010, b"UI", _ui(transfer_syntax)) + el(0x0012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID))
            + el(0x0013, b"SH", version + b" " * (len(version) % 2)))
    return b"\0" * 128 + b"DICM" + el(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _pdata(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (control: bit 0 command, bit 1 last fragment)."""
    return struct.pack(">BBIIBB", _PDATA, 0, len(data) + 6, len(data) + 2, context_id, control) + data


class _OneFile:
    """The file being received, written on the reading thread: a write into the page cache costs
    less than handing each PDU to a writer thread."""

    def __init__(self) -> None:
        self._fh: BinaryIO | None = None

    def open(self, path: Path) -> None:
        self.close()
        self._fh = open(path, "wb")

    def write(self, data: bytes | memoryview) -> None:
        assert self._fh is not None
        self._fh.write(data)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------- the association
class GetAssociation:
    """One association, opened by :meth:`open`; :meth:`find` queries, :meth:`get` retrieves (one
    operation per association); :meth:`release` ends it, :meth:`abort` after an error.

    Errors: :class:`Rejected` (A-ASSOCIATE-RJ), :class:`TransientError` (connection refused, cut,
    aborted or timed out), :class:`StatusFailed` (a failed final status), :class:`PacsError`
    (a protocol violation).
    """

    def __init__(self, host: str, port: int, *, calling_aet: str, called_aet: str, timeout_s: float) -> None:
        self.host, self.port = host, port
        self.calling_aet, self.called_aet = calling_aet, called_aet
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._syntax: dict[int, str] = {}   # accepted context id -> transfer syntax
        self._peer_max = 0

    # ------------------------------------------------------------------ socket
    def _recv_exact(self, n: int) -> bytearray:
        assert self._sock is not None
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        try:
            while got < n:
                k = self._sock.recv_into(view[got:], n - got)
                if not k:
                    raise TransientError("the PACS closed the connection")
                got += k
        except OSError as exc:   # socket.timeout included
            raise TransientError(f"{type(exc).__name__}: {exc}") from None
        return buf

    def _read_pdu(self) -> tuple[int, bytearray]:
        head = self._recv_exact(6)
        kind, _, length = struct.unpack(">BBI", head)
        if length > max(MAX_PDU, 1 << 16) + 6:
            raise PacsError(f"PDU of {length} bytes: larger than the {MAX_PDU} medpipe announced")
        return kind, self._recv_exact(length)

    def _send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        """A command set (and its dataset) in P-DATA PDUs no larger than the peer accepts."""
        room = max((self._peer_max if self._peer_max else 1 << 20) - 12, 64)
        for data, flag in ((command, 0x01), (dataset, 0x00)):
            if data is None:
                continue
            for at in range(0, max(len(data), 1), room):
                piece = data[at:at + room]
                self._send(_pdata(context_id, flag | (0x02 if at + room >= len(data) else 0), piece))

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ association
    def open(self, contexts: Sequence[PresentationContext], roles: Sequence[Any]) -> None:
        """Connect and negotiate ``contexts`` (ids given here: 1, 3, 5, ...) with SCP ``roles``."""
        try:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as exc:
            raise TransientError(f"no association (connection: {type(exc).__name__}: {exc})") from None
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._negotiate(contexts, roles)
        except BaseException:
            self.close()
            raise

    def _negotiate(self, contexts: Sequence[PresentationContext], roles: Sequence[Any]) -> None:
        for i, cx in enumerate(contexts):
            cx.context_id = 2 * i + 1
        rq = A_ASSOCIATE()
        rq.application_context_name = _APP_CONTEXT
        rq.calling_ae_title = self.calling_aet
        rq.called_ae_title = self.called_aet
        rq.presentation_context_definition_list = list(contexts)
        max_len = MaximumLengthNotification()
        max_len.maximum_length_received = MAX_PDU
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        rq.user_information = [max_len, impl, version, *roles]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(rq)
        self._send(pdu.encode())
        kind, body = self._read_pdu()
        if kind == _RJ:
            raise Rejected(body[1], body[2], body[3])
        if kind == _ABORT:
            raise TransientError("association aborted by the PACS")
        if kind != _AC:
            raise PacsError(f"unexpected PDU type 0x{kind:02X} in answer to A-ASSOCIATE-RQ")
        ac = A_ASSOCIATE_AC()
        ac.decode(struct.pack(">BBI", kind, 0, len(body)) + bytes(body))
        self._syntax = {int(item.context_id): str(item.transfer_syntax) for item in ac.presentation_context
                        if item.result == 0 and item.transfer_syntax}
        self._peer_max = int(getattr(ac.user_information, "maximum_length", 0) or 0)

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def release(self) -> None:
        """A-RELEASE-RQ, then wait for A-RELEASE-RP (or the peer closing) and close."""
        try:
            self._send(struct.pack(">BBII", _RELEASE_RQ, 0, 4, 0))
            while True:
                kind, _ = self._read_pdu()
                if kind in (_RELEASE_RP, _ABORT):
                    break
        except TransientError:
            pass
        finally:
            self.close()

    def abort(self) -> None:
        """A-ABORT (service user) and close; errors are ignored (the connection may be gone)."""
        if self._sock is not None:
            try:
                self._sock.sendall(struct.pack(">BBIBBBB", _ABORT, 0, 4, 0, 0, 0, 0))
            except OSError:
                pass
        self.close()

    # ------------------------------------------------------------------ C-FIND
    def find(self, find_class: str, identifier: Dataset) -> list[Dataset]:
        """C-FIND-RQ for ``identifier`` on the first context (``find_class``); return the identifiers
        of the pending responses (a failed final status raises :class:`StatusFailed`)."""
        ctx = 1
        if ctx not in self._syntax:
            raise PacsError(f"the PACS accepted no presentation context for {find_class} (C-FIND)")
        implicit = self._syntax[ctx] == ImplicitVRLittleEndian
        self._send_message(ctx, command_set({
            _AFFECTED_CLASS: _ui(find_class), _COMMAND: _us(_C_FIND_RQ), _MSG_ID: _us(1),
            _PRIORITY: _us(0), _DATASET_TYPE: _us(0x0000)}), encode(identifier, implicit, True))
        found: list[Dataset] = []
        command, dataset = bytearray(), bytearray()
        final: int | None = None
        while True:
            kind, body = self._read_pdu()
            if kind == _ABORT:
                raise TransientError("association aborted by the PACS")
            if kind != _PDATA:
                raise PacsError(f"unexpected PDU type 0x{kind:02X} during C-FIND")
            pos = 0
            while pos + 6 <= len(body):
                length, _, control = struct.unpack_from(">IBB", body, pos)
                data = body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if control & 0x01:
                    command += data
                    if not control & 0x02:
                        continue
                    cmd = parse_command(command)
                    command = bytearray()
                    if _read_us(cmd, _COMMAND) != _C_FIND_RSP:
                        raise PacsError(f"unexpected DIMSE command 0x{_read_us(cmd, _COMMAND):04X} during C-FIND")
                    status = _read_us(cmd, _STATUS)
                    if status not in (0xFF00, 0xFF01):
                        final = status
                        if _read_us(cmd, _DATASET_TYPE, _NO_DATASET) == _NO_DATASET:
                            return self._found(final, found)
                else:
                    dataset += data
                    if control & 0x02:
                        if final is not None:
                            return self._found(final, found)
                        found.append(decode(BytesIO(bytes(dataset)), implicit, True))
                        dataset = bytearray()

    @staticmethod
    def _found(status: int, found: list[Dataset]) -> list[Dataset]:
        if status != 0x0000:
            raise StatusFailed(status)
        return found

    # ------------------------------------------------------------------ C-GET
    def get(self, get_class: str, identifier: Dataset, dest: Path, written: list[Path]) -> int:
        """Send C-GET-RQ for ``identifier`` on the context of ``get_class`` (the first one), write each
        C-STORE sub-operation's dataset to ``dest`` (its path appended to ``written`` first) and
        answer it; return the final status (Success or Warning: a failure raises :class:`StatusFailed`)."""
        writer = _OneFile()
        try:
            return self._get(get_class, identifier, dest, written, writer)
        finally:
            writer.close()

    def _get(self, get_class: str, identifier: Dataset, dest: Path, written: list[Path], writer: _OneFile) -> int:
        ctx = 1
        if ctx not in self._syntax:
            raise PacsError(f"the PACS accepted no presentation context for {get_class} (C-GET)")
        implicit = self._syntax[ctx] == ImplicitVRLittleEndian
        ident = encode(identifier, implicit, True)
        if ident is None:
            raise PacsError("the C-GET identifier could not be encoded")
        self._send_message(ctx, command_set({
            _AFFECTED_CLASS: _ui(get_class), _COMMAND: _us(_C_GET_RQ), _MSG_ID: _us(1),
            _PRIORITY: _us(0), _DATASET_TYPE: _us(0x0000)}), ident)
        command = bytearray()
        store: dict[int, bytes] | None = None   # the C-STORE-RQ whose dataset is arriving
        store_ctx = 0
        skip_dataset = False                      # a C-GET-RSP identifier (failed UIDs): not needed
        final: dict[int, bytes] | None = None
        while True:
            kind, body = self._read_pdu()
            if kind == _ABORT:
                raise TransientError("association aborted by the PACS")
            if kind != _PDATA:
                raise PacsError(f"unexpected PDU type 0x{kind:02X} during C-GET")
            view, pos = memoryview(body), 0
            while pos + 6 <= len(body):
                length, pctx, control = struct.unpack_from(">IBB", body, pos)
                data = view[pos + 6:pos + 4 + length]
                pos += 4 + length
                if control & 0x01:   # command fragment
                    command += data
                    if not control & 0x02:
                        continue
                    cmd = parse_command(command)
                    command = bytearray()
                    field = _read_us(cmd, _COMMAND)
                    has_dataset = _read_us(cmd, _DATASET_TYPE, _NO_DATASET) != _NO_DATASET
                    if field == _C_STORE_RQ:
                        store = cmd
                        sop = _read_ui(cmd, _AFFECTED_INSTANCE)
                        path = dest / instance_file_name(sop)
                        written.append(path)
                        writer.open(path)
                        writer.write(file_meta(_read_ui(cmd, _AFFECTED_CLASS), sop,
                                               self._syntax.get(pctx, ImplicitVRLittleEndian)))
                        store_ctx = pctx
                    elif field == _C_GET_RSP:
                        status = _read_us(cmd, _STATUS)
                        if status not in (0xFF00, 0xFF01):
                            final = cmd
                        skip_dataset = has_dataset
                        if final is not None and not has_dataset:
                            return self._final(final)
                    else:
                        raise PacsError(f"unexpected DIMSE command 0x{field:04X} during C-GET")
                elif skip_dataset:   # dataset fragment of a C-GET-RSP
                    if control & 0x02:
                        skip_dataset = False
                        if final is not None:
                            return self._final(final)
                elif store is not None:   # dataset fragment of a C-STORE-RQ: to its file as it is
                    writer.write(data)
                    if control & 0x02:
                        self._send_message(store_ctx, command_set({
                            _AFFECTED_CLASS: _ui(_read_ui(store, _AFFECTED_CLASS)), _COMMAND: _us(_C_STORE_RSP),
                            _RESPONDED_TO: store.get(_MSG_ID, _us(0)), _DATASET_TYPE: _us(_NO_DATASET),
                            _STATUS: _us(0x0000), _AFFECTED_INSTANCE: _ui(_read_ui(store, _AFFECTED_INSTANCE))}))
                        store = None
                else:
                    raise PacsError("a dataset fragment arrived with no command before it")

    @staticmethod
    def _final(cmd: dict[int, bytes]) -> int:
        status = _read_us(cmd, _STATUS)
        if status == 0x0000 or (status & 0xF000) == 0xB000:
            return status
        raise StatusFailed(status, _read_us(cmd, _N_FAILED))
