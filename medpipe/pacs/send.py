"""Results back to every configured destination: enqueue a study's objects, deliver the outboxes.

Each study processed in this run gets its objects for destinations made and enqueued by
:func:`enqueue_results` (:func:`medpipe.report.dicom.write_send_objects`, then
:func:`enqueue_study`; only when ``send.destinations`` is not empty: an unchanged, skipped study
is not sent again); at the end of the run :func:`deliver_all` sends what waits in each outbox and
returns the summaries for run.json.

>>> from medpipe.config import Config
>>> enqueue_study("/tmp/out", Config(), "k", "fp", [])   # no destinations: nothing to do
[]
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..privacy import private_dir
from .address import PacsAddress
from .auth import Credentials, scrub
from .client import PacsAuthError, PacsError, open_client
from .outbox import OUTBOX_DIR, Outbox

log = logging.getLogger(__name__)


def outboxes(out: str | Path, cfg: Any) -> list[Outbox]:
    """The outbox of each ``cfg.send.destinations`` address, in the configured order."""
    return [Outbox(out, url) for url in cfg.send.destinations]


def enqueue_study(out: str | Path, cfg: Any, study_key: str, fingerprint: str,
                  files: Sequence[str | Path]) -> list[str]:
    """Put one study's objects into the outbox of every destination; return the (redacted)
    destinations it was enqueued for (not those that already hold this very result)."""
    if not cfg.send.destinations:
        return []
    if not files:
        raise ValueError(f"study {study_key}: no objects to send")
    return [box.address.redacted() for box in outboxes(out, cfg) if box.enqueue(study_key, fingerprint, files)]


def enqueue_results(entry: Any, source_files: Sequence[str], cfg: Any, out: str | Path, fingerprint: str,
                    send_dir: Path) -> list[str]:
    """Make the objects of a study processed in this run and put them into each destination's outbox.

    The objects (:func:`medpipe.report.dicom.write_send_objects`) are made from the published
    folder ``OUT/studies/<study-key>`` (its report.json) and the study's ``source_files``, in
    ``send_dir`` (outside OUT's published studies: they are identifying), which is removed once
    the outboxes hold their copies. Nothing is done when no destination is configured, when
    ``entry`` (the study's :class:`~medpipe.study.StudyEntry`: ``study_key``, ``status``) is not
    ``ok``, or without source files.

    Returns
    -------
    list of str
        The problems met making the objects, and each wanted object not made with its reason
        (the study's result stands: its objects are made again when it is next redone).
    """
    if not cfg.send.destinations or entry.status != "ok" or not source_files:
        return []
    # report.dicom brings highdicom and zarr: imported only when a study has objects to send
    from ..report.dicom import write_send_objects

    study_dir = Path(out) / "studies" / entry.study_key
    record = json.loads((study_dir / "report.json").read_text())
    try:
        made = write_send_objects(study_dir, record, cfg, list(source_files), send_dir)
        if made.files:
            enqueue_study(out, cfg, entry.study_key, fingerprint, made.files)
    finally:
        shutil.rmtree(send_dir, ignore_errors=True)  # identifying: the outboxes hold the copies
    return [*made.problems, *(f"{k} not sent: {v}" for k, v in made.reasons.items() if k in cfg.send.objects)]


def deliver_all(out: str | Path, cfg: Any, creds: Credentials | None = None,
                connect: Callable[..., Any] = open_client) -> list[dict[str, Any]]:
    """Deliver every destination's outbox; return one :meth:`Outbox.summary` per destination.

    A destination that cannot be reached keeps its entries for the next run. Wrong credentials
    (:class:`~medpipe.pacs.client.PacsAuthError`) are raised after every other destination was
    tried, so that the run fails with exit status 3 and the rest is still delivered.
    """
    summaries, auth_error = [], None
    for box in outboxes(out, cfg):
        if box.pending():
            try:
                with connect(box.address, cfg.pacs, creds) as client:
                    box.deliver(client, creds)
            except PacsAuthError as exc:
                auth_error = auth_error or exc
            except PacsError as exc:  # e.g. an association refused when opening the client
                log.warning("destination %s: %s", box.address.redacted(), scrub(str(exc), creds))
        summaries.append(box.summary())
    if auth_error is not None:
        raise auth_error
    return summaries


def stray_outboxes(out: str | Path, cfg: Any) -> list[dict[str, Any]]:
    """Outboxes of addresses no longer configured that still hold results: ``id`` and ``pending``
    (their entries wait until the address is configured again, or the folder is removed)."""
    root = private_dir(out) / OUTBOX_DIR
    configured = {PacsAddress.parse(u).id for u in cfg.send.destinations}
    out_list = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        pending = d / "pending"
        if d.name in configured or not pending.is_dir():
            continue
        n = sum(1 for e in pending.iterdir() if (e / "entry.json").is_file())
        if n:
            out_list.append({"id": d.name, "pending": n})
    return out_list

