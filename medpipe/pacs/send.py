"""Results back to every configured destination: enqueue a study's objects, deliver the outboxes.

The flow makes a study's objects for destinations with
:func:`medpipe.report.dicom.write_send_objects` (only when ``send.destinations`` is not empty, and
only for studies processed in this run: an unchanged, skipped study is not sent again), then
:func:`enqueue_study`; at the end of the run :func:`deliver_all` sends what waits in each outbox
and returns the summaries for run.json.

>>> from medpipe.config import Config
>>> enqueue_study("/tmp/out", Config(), "k", "fp", [])   # no destinations: nothing to do
[]
"""

from __future__ import annotations

import logging
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

