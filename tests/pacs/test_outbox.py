"""The durable outbox (medpipe.pacs.outbox) against a Sender that stores into a dict.

Delivery to a real Orthanc (STOW-RS and C-STORE, Orthanc stopped and restarted) is in test_send.py;
here are the outbox's own rules: atomic entries, replacement, retries, one failure not stopping
the others, the unavailable destination stopping, the delivered log and run.json's summary.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from medpipe.pacs.auth import Credentials
from medpipe.pacs.client import PacsAuthError, PacsUnavailable, StoreResult
from medpipe.pacs.outbox import Outbox

URL = "dicomweb+http://127.0.0.1:8042/dicom-web"
SECRET = "hunter2-outbox-secret"


class Store:
    """A PACS in a dict: SOPInstanceUID (here the file's content) -> bytes; scripted failures."""

    def __init__(self):
        self.held: dict[str, bytes] = {}
        self.fail: dict[str, Exception | str] = {}  # file content -> exception, or refusal reason
        self.calls = 0

    def store(self, paths):
        self.calls += 1
        result = StoreResult()
        for p in paths:
            data = Path(p).read_bytes()
            what = self.fail.get(data.decode())
            if isinstance(what, Exception):
                raise what
            if what:
                result.failed[str(p)] = what
                continue
            self.held[data.decode()] = data
            result.stored.append(data.decode())
        return result


def _files(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        (folder / f"{n}.dcm").write_text(n)
        out.append(folder / f"{n}.dcm")
    return out


def test_enqueue_is_private_and_replaces_the_older_entry(tmp_path):
    box = Outbox(tmp_path / "out", URL)
    assert box.enqueue("k1", "fp1", _files(tmp_path / "a", "seg-1", "sr-1"))
    assert box.enqueue("k1", "fp2", _files(tmp_path / "b", "seg-2"))
    (entry,) = box.pending()
    assert entry["fingerprint"] == "fp2" and entry["files"] == ["seg-2.dcm"] and entry["attempts"] == 0
    assert sorted(p.name for p in entry["dir"].iterdir()) == ["entry.json", "seg-2.dcm"]
    for d in (tmp_path / "out" / "private" / "outbox", box.root, box.pending_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((entry["dir"] / "seg-2.dcm").stat().st_mode) == 0o600
    assert not [p for p in box.root.iterdir() if p.name.endswith(".tmp")]  # no half-made entry left
    with pytest.raises(ValueError, match="missing"):
        box.enqueue("k2", "fp", [tmp_path / "nope.dcm"])


def test_deliver_sends_logs_and_does_not_enqueue_a_delivered_study_again(tmp_path):
    box, pacs = Outbox(tmp_path / "out", URL), Store()
    box.enqueue("k1", "fp1", _files(tmp_path / "a", "seg-1", "sr-1"))
    box.enqueue("k2", "fp2", _files(tmp_path / "b", "seg-2"))
    report = box.deliver(pacs)
    assert report.delivered == ["k1", "k2"] and not report.failed and box.pending() == []
    assert set(pacs.held) == {"seg-1", "sr-1", "seg-2"}
    log = box.delivered_log()
    assert [(e["study_key"], e["fingerprint"], e["sop_instance_uids"]) for e in log] == [
        ("k1", "fp1", ["seg-1", "sr-1"]), ("k2", "fp2", ["seg-2"])]
    assert not box.enqueue("k1", "fp1", _files(tmp_path / "c", "seg-1"))  # unchanged: not sent again
    assert box.enqueue("k1", "fp1-new", _files(tmp_path / "d", "seg-1b"))  # reprocessed: sent
    assert box.enqueue("k2", "fp2", _files(tmp_path / "e", "seg-2"), force=True)
    summary = box.summary()
    assert summary["pending"] == 2 and summary["delivered"] == 2 and summary["delivered_total"] == 2
    assert summary["destination"] == URL and summary["last_error"] is None


def test_one_failure_does_not_stop_the_others_and_is_retried(tmp_path):
    box, pacs = Outbox(tmp_path / "out", URL), Store()
    box.enqueue("k1", "fp1", _files(tmp_path / "a", "bad"))
    box.enqueue("k2", "fp2", _files(tmp_path / "b", "good"))
    box.enqueue("k3", "fp3", _files(tmp_path / "c", "boom"))
    pacs.fail = {"bad": "0xA700 out of resources", "boom": RuntimeError(f"broken pipe, token {SECRET}")}
    report = box.deliver(pacs, Credentials(kind="bearer", token=SECRET))
    assert report.delivered == ["k2"] and sorted(report.failed) == ["k1", "k3"]
    pending = {e["study_key"]: e for e in box.pending()}
    assert pending["k1"]["attempts"] == 1 and "bad.dcm: 0xA700 out of resources" in pending["k1"]["last_error"]
    assert pending["k3"]["last_error"] == "RuntimeError: broken pipe, token ***"
    summary = box.summary()
    assert summary["pending"] == 2 and summary["failed"] == 2 and summary["last_error"]
    pacs.fail = {}
    assert box.deliver(pacs).delivered == ["k1", "k3"] and box.pending() == []
    assert [e["attempts"] for e in box.delivered_log()] == [1, 2, 2]
    assert SECRET not in "".join(p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_unavailable_stops_the_destination_and_entries_stay(tmp_path):
    box, pacs = Outbox(tmp_path / "out", URL), Store()
    for k in ("k1", "k2", "k3"):
        box.enqueue(k, "fp", _files(tmp_path / k, f"obj-{k}"))
    pacs.fail = {"obj-k1": PacsUnavailable("dicomweb+http://127.0.0.1:8042/dicom-web: connection refused")}
    report = box.deliver(pacs)
    assert pacs.calls == 1 and report.untried == ["k2", "k3"] and "connection refused" in report.unavailable
    summary = box.summary()
    assert summary["pending"] == 3 and summary["unavailable"] and "connection refused" in summary["last_error"]
    pacs.fail = {}
    assert Outbox(tmp_path / "out", URL).deliver(pacs).delivered == ["k1", "k2", "k3"]  # the next run


def test_auth_error_is_recorded_and_raised(tmp_path):
    box, pacs = Outbox(tmp_path / "out", URL), Store()
    box.enqueue("k1", "fp", _files(tmp_path / "a", "x"))
    pacs.fail = {"x": PacsAuthError("401 Unauthorized")}
    with pytest.raises(PacsAuthError):
        box.deliver(pacs)
    (entry,) = box.pending()
    assert entry["last_error"] == "PacsAuthError: 401 Unauthorized"
    assert json.loads((entry["dir"] / "entry.json").read_text())["attempts"] == 1


def test_destinations_have_their_own_outbox(tmp_path):
    a, b = Outbox(tmp_path, URL), Outbox(tmp_path, "dimse://ORTHANC@127.0.0.1:4242")
    a.enqueue("k1", "fp", _files(tmp_path / "f", "x"))
    assert a.root != b.root and b.pending() == [] and len(a.pending()) == 1
