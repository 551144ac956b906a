"""What medpipe remembers about a PACS source between runs.

``OUT/pacs/<source-id>/state.json`` (no identifier in it):

- ``watermark``: the end of the last run's window (ISO date-time, the PACS's local time);
- ``change_cursor``: where the server's change feed (Orthanc ``/changes``) was last read;
- ``observations``: per series (keyed by a one-way hash of its SeriesInstanceUID) the instance
  count last seen, when it was first seen with that count (``since``) and last seen (``seen``),
  so that a later run knows how long a series has kept its count.

``OUT/private/pacs/<source-id>/pending.json`` (identifying: under ``OUT/private``, 0700): the
StudyInstanceUIDs of studies deferred or left over (cap, failure), queried again by UID on the
next run even when they fall outside its window.

Both are written atomically, and only when a run ends (:func:`medpipe.pacs.plan.commit_window`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..errors import ConfigError
from ..keys import uid_key
from .address import PacsAddress

STATE_VERSION = 1
#: Observations of series not seen for this long are dropped (a series is re-observed if it comes back).
FORGET_AFTER_S = 30 * 24 * 3600.0


@dataclass
class Observation:
    count: int
    since: float   # epoch seconds: first seen with this count
    seen: float    # epoch seconds: last seen


@dataclass
class SourceState:
    address: str = ""
    watermark: datetime | None = None
    change_cursor: int | None = None
    observations: dict[str, Observation] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)   # study_key -> StudyInstanceUID (private file)

    def observe(self, series_uid: str, count: int, now: float, salt: str) -> tuple[Observation | None, Observation]:
        """Record that ``series_uid`` has ``count`` instances at ``now``; return (previous, current)."""
        key = uid_key(series_uid, salt)
        prev = self.observations.get(key)
        if prev is not None and prev.count == count:
            cur = Observation(count=count, since=prev.since, seen=now)
        else:
            cur = Observation(count=count, since=now, seen=now)
        self.observations[key] = cur
        return prev, cur

    def forget_old(self, now: float) -> None:
        self.observations = {k: o for k, o in self.observations.items() if now - o.seen < FORGET_AFTER_S}


def state_dir(out: Path, address: PacsAddress) -> Path:
    return Path(out) / "pacs" / address.id


def private_dir(out: Path, address: PacsAddress) -> Path:
    return Path(out) / "private" / "pacs" / address.id


def load_state(out: Path, address: PacsAddress) -> SourceState:
    """The stored state of ``address`` under ``out`` (an empty one on a first run)."""
    path = state_dir(out, address) / "state.json"
    state = SourceState(address=address.redacted())
    if path.exists():
        try:
            raw = json.loads(path.read_text())
            state.watermark = datetime.fromisoformat(raw["watermark"]) if raw.get("watermark") else None
            state.change_cursor = raw.get("change_cursor")
            state.observations = {k: Observation(**v) for k, v in (raw.get("observations") or {}).items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable PACS source state ({exc}); move it away to start afresh "
                              "(the next run then needs --since)") from None
    pending = private_dir(out, address) / "pending.json"
    if pending.exists():
        try:
            state.pending = dict(json.loads(pending.read_text()))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{pending}: unreadable ({exc})") from None
    return state


def save_state(out: Path, address: PacsAddress, state: SourceState) -> Path:
    """Write both files atomically; return the path of state.json."""
    body: dict[str, Any] = {
        "version": STATE_VERSION,
        "address": state.address or address.redacted(),
        "watermark": state.watermark.isoformat() if state.watermark else None,
        "change_cursor": state.change_cursor,
        "observations": {k: asdict(o) for k, o in sorted(state.observations.items())},
    }
    priv = private_dir(out, address)
    priv.mkdir(parents=True, exist_ok=True)
    for d in (priv, priv.parent, priv.parent.parent):   # OUT/private and below: owner only
        os.chmod(d, 0o700)
    write_json(priv / "pending.json", dict(sorted(state.pending.items())))
    os.chmod(priv / "pending.json", 0o600)
    return write_json(state_dir(out, address) / "state.json", body)
