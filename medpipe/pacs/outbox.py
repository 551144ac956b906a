"""A durable outbox per destination: results wait in ``OUT/`` until the PACS has them.

Layout (owner-only: the objects carry the patient's identity)::

    OUT/private/outbox/<destination-id>/       0700, one folder per destination address
      pending/<study-key>/entry.json           study_key, fingerprint, files, attempts, last_error,
      pending/<study-key>/<object>.dcm         enqueued, last_attempt (files 0600)
      delivered.jsonl                          one line per delivered entry (study_key, fingerprint,
                                               files, SOPInstanceUIDs, attempts, delivered time)

An entry is made in a temporary folder beside ``pending/`` and renamed into place, so a reader
sees a whole entry or none; a study processed again replaces its older pending entry. A study
whose fingerprint was already delivered to this destination is not enqueued again. ``deliver``
sends each pending entry; an entry whose sending fails stays with its error and is tried again by
the next ``deliver``; a :class:`~medpipe.pacs.client.PacsUnavailable` stops the destination for
this call (the others stay pending), a :class:`~medpipe.pacs.client.PacsAuthError` is recorded
and raised (the run fails with exit 3). Resending is safe: the objects' SOPInstanceUIDs are
derived from the study's inputs, so a PACS stores each object once.

Example::

    box = Outbox(out, "dicomweb+http://127.0.0.1:8042/dicom-web")
    box.enqueue(study_key, fingerprint, [send_dir / "seg.dcm", send_dir / "sr.dcm"])
    with open_client(box.address, cfg.pacs, creds) as client:
        box.deliver(client, creds)
    box.summary()   # {"destination": ..., "pending": 0, "delivered": 1, "failed": 0, ...}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from .. import atomic
from ..privacy import private_dir
from .address import PacsAddress
from .auth import Credentials, scrub
from .client import PacsAuthError, PacsUnavailable, StoreResult

log = logging.getLogger(__name__)

OUTBOX_DIR = "outbox"
ENTRY_FILE = "entry.json"
DELIVERED_LOG = "delivered.jsonl"
_ERROR_MAX = 500  # characters of an error kept in an entry and in run.json


class Sender(Protocol):
    """What the outbox needs of a PACS client: ``store(paths) -> StoreResult``."""

    def store(self, paths: Sequence[Path]) -> StoreResult: ...


@dataclass
class DeliveryReport:
    """What one :meth:`Outbox.deliver` did: entries (study keys) delivered and failed, those left
    untried after the destination became unavailable, and that error (scrubbed)."""

    destination: str
    delivered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    untried: list[str] = field(default_factory=list)
    unavailable: str | None = None
    seconds: float = 0.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _private_mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _write_private_json(path: Path, obj: Any) -> None:
    """Write JSON owner-only (0600), atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Outbox:
    """The outbox of one destination under ``OUT/private/outbox/<destination-id>/``.

    Parameters
    ----------
    out : Path
        The output folder OUT.
    address : str or PacsAddress
        The destination (``dicomweb+http(s)://...`` or ``dimse://AET@HOST:PORT``).
    """

    def __init__(self, out: str | Path, address: str | PacsAddress):
        self.address = address if isinstance(address, PacsAddress) else PacsAddress.parse(address)
        self.root = _private_mkdir(private_dir(out) / OUTBOX_DIR / self.address.id)
        os.chmod(self.root.parent, 0o700)
        self.pending_dir = _private_mkdir(self.root / "pending")
        self._last: DeliveryReport | None = None

    # -- enqueue ---------------------------------------------------------------------------------

    def enqueue(self, study_key: str, fingerprint: str, files: Sequence[str | Path], *,
                force: bool = False) -> bool:
        """Put a study's objects in the outbox (copies, 0600); True when enqueued.

        Replaces a pending entry of the same study (its older results are not sent). A study whose
        ``fingerprint`` was already delivered here is not enqueued again unless ``force``.

        Raises
        ------
        ValueError
            When ``files`` is empty, a file is missing, or two files share a name.
        """
        if not study_key or "/" in study_key or study_key.startswith("."):
            raise ValueError(f"outbox {self.address.redacted()}: bad study key {study_key!r}")
        paths = [Path(f) for f in files]
        if not paths:
            raise ValueError(f"outbox {self.address.redacted()}: study {study_key}: no files to enqueue")
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"outbox {self.address.redacted()}: study {study_key}: missing {', '.join(missing)}")
        if len({p.name for p in paths}) != len(paths):
            raise ValueError(f"outbox {self.address.redacted()}: study {study_key}: two files share a name")
        if not force and self.was_delivered(study_key, fingerprint):
            log.info("outbox %s: study %s already delivered with these inputs; not enqueued",
                     self.address.redacted(), study_key)
            return False
        tmp = Path(tempfile.mkdtemp(prefix=f".{study_key}.", suffix=".tmp", dir=self.root))
        try:
            names = []
            for p in paths:
                target = tmp / p.name
                shutil.copyfile(p, target)
                os.chmod(target, 0o600)
                names.append(p.name)
            _write_private_json(tmp / ENTRY_FILE, {
                "study_key": study_key, "fingerprint": fingerprint, "files": names, "attempts": 0,
                "last_error": None, "enqueued": _now(), "last_attempt": None})
            atomic.replace_dir(tmp, self.pending_dir / study_key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True

    def was_delivered(self, study_key: str, fingerprint: str) -> bool:
        """True when this study with this input fingerprint was delivered to this destination."""
        return any(e.get("study_key") == study_key and e.get("fingerprint") == fingerprint
                   for e in self.delivered_log())

    # -- reading ---------------------------------------------------------------------------------

    def pending(self) -> list[dict[str, Any]]:
        """The pending entries, oldest first, each with ``dir`` (its folder)."""
        entries = []
        for d in sorted(self.pending_dir.iterdir()):
            if d.name.startswith(".") or not (d / ENTRY_FILE).is_file():
                continue
            try:
                entry = json.loads((d / ENTRY_FILE).read_text())
            except (OSError, ValueError) as exc:
                log.warning("outbox %s: unreadable entry %s: %s", self.address.redacted(), d.name, exc)
                continue
            entries.append({**entry, "dir": d})
        return sorted(entries, key=lambda e: (e.get("enqueued") or "", e.get("study_key") or ""))

    def delivered_log(self) -> list[dict[str, Any]]:
        """The lines of ``delivered.jsonl`` (a torn last line, from a crash, is left out)."""
        path = self.root / DELIVERED_LOG
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    # -- delivering ------------------------------------------------------------------------------

    def deliver(self, client: Sender, creds: Credentials | None = None) -> DeliveryReport:
        """Send every pending entry through ``client``; delivered entries leave the outbox.

        A failure of one entry (a refused object, an unexpected error) is recorded on it and
        the others are still sent. :class:`PacsUnavailable` stops this destination for this call:
        that entry and the rest stay pending. :class:`PacsAuthError` is recorded and raised.
        Error texts are scrubbed of the secrets of ``creds``.
        """
        report = DeliveryReport(self.address.redacted())
        t0 = time.perf_counter()
        entries = self.pending()
        for n, entry in enumerate(entries):
            key = entry["study_key"]
            paths = [entry["dir"] / name for name in entry["files"]]
            try:
                result = client.store(paths)
            except PacsUnavailable as exc:
                report.unavailable = self._failed(entry, exc, creds)
                report.failed.append(key)
                report.untried = [e["study_key"] for e in entries[n + 1:]]
                log.warning("outbox %s: unavailable, %d entries stay pending: %s", report.destination,
                            len(entries) - n, report.unavailable)
                break
            except PacsAuthError as exc:
                self._failed(entry, exc, creds)
                report.failed.append(key)
                self._last = report
                raise
            except Exception as exc:  # noqa: BLE001 - one entry's failure never stops the others
                self._failed(entry, exc, creds)
                report.failed.append(key)
                continue
            if result.failed:
                reasons = "; ".join(f"{Path(p).name}: {r}" for p, r in sorted(result.failed.items()))
                self._failed(entry, f"{len(result.failed)} of {len(paths)} objects refused: {reasons}", creds)
                report.failed.append(key)
                continue
            self._delivered(entry, result)
            report.delivered.append(key)
        report.seconds = round(time.perf_counter() - t0, 3)
        self._last = report
        return report

    def _failed(self, entry: dict[str, Any], error: Exception | str, creds: Credentials | None) -> str:
        """Record an attempt and its (scrubbed) error on the entry; return the error text."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        text = scrub(text, creds)[:_ERROR_MAX]
        record = {k: v for k, v in entry.items() if k != "dir"}
        record.update(attempts=int(record.get("attempts") or 0) + 1, last_error=text, last_attempt=_now())
        try:
            _write_private_json(entry["dir"] / ENTRY_FILE, record)
        except OSError as exc:  # replaced or removed meanwhile: the newer entry stands
            log.warning("outbox %s: could not record an attempt of %s: %s", self.address.redacted(),
                        entry["study_key"], exc)
        log.warning("outbox %s: study %s not delivered: %s", self.address.redacted(), entry["study_key"], text)
        return text

    def _delivered(self, entry: dict[str, Any], result: StoreResult) -> None:
        """Log the delivery, then remove the entry (a crash between the two resends it: harmless)."""
        line = {"study_key": entry["study_key"], "fingerprint": entry.get("fingerprint"),
                "files": entry["files"], "sop_instance_uids": list(result.stored),
                "attempts": int(entry.get("attempts") or 0) + 1, "enqueued": entry.get("enqueued"),
                "delivered": _now()}
        path = self.root / DELIVERED_LOG
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        gone = entry["dir"].with_name(f".{entry['dir'].name}.delivered-{os.getpid()}")
        os.replace(entry["dir"], gone)
        shutil.rmtree(gone, ignore_errors=True)

    # -- run.json --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The destination's state for run.json: ``destination`` (redacted address), ``id``,
        ``pending``, ``delivered`` / ``failed`` (by the last ``deliver`` of this object),
        ``delivered_total``, ``oldest_pending`` (enqueued time), ``last_error`` (scrubbed)."""
        pending = self.pending()
        report = self._last
        errors = [e for e in pending if e.get("last_error")]
        last = max(errors, key=lambda e: e.get("last_attempt") or "", default=None)
        return {
            "destination": self.address.redacted(),
            "id": self.address.id,
            "pending": len(pending),
            "delivered": len(report.delivered) if report else 0,
            "failed": len(report.failed) if report else 0,
            "unavailable": report.unavailable if report else None,
            "delivered_total": len(self.delivered_log()),
            "oldest_pending": pending[0].get("enqueued") if pending else None,
            "last_error": last["last_error"] if last else None,
        }
