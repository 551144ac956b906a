"""Planning a night from a PACS: which studies to fetch, which to defer and why. Queries only.

The window runs from the stored watermark (the end of the last run's window) minus
``source.overlap_hours`` (late arrivals with an earlier StudyDate/StudyTime are caught) to now;
``source.since`` / ``source.until`` override it for backfills. A first run with neither a
watermark nor ``since`` is refused (:class:`~medpipe.pacs.client.NoWatermark`) instead of pulling
a whole PACS. Where the server has a feed of arrivals (Orthanc's ``/changes``) it adds the studies
imported since the last run whatever their StudyDate; studies deferred by earlier runs are asked
for by UID. ``source.modalities`` and ``source.study_description`` are pushed into the query;
``ingest.modalities`` is applied to what comes back (one query, not one per modality).

Each study's series are judged by :mod:`medpipe.pacs.completeness`; a study with a growing series
is deferred, the others become plans. Nothing is retrieved here.

Example (a sketch: ``client`` from :func:`~medpipe.pacs.client.open_client`)::

    plan = plan_pacs(client, cfg, out)
    for p in plan.plans: ...                 # fetch_study(p["source"], cache, client), ingest, publish
    commit_window(out, plan, deferred=keys_deferred_while_fetching)
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import time as _time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any

from ..config import Config
from ..keys import study_key as make_study_key
from .address import PacsAddress
from .client import NoWatermark, PacsClient, RemoteSeries, RemoteStudy, StudyQuery
from .completeness import judge_series
from .state import SourceState, load_state, save_state, state_dir

log = logging.getLogger(__name__)


@dataclass
class PacsPlan:
    """The outcome of :func:`plan_pacs`.

    ``plans``: one dict per study to fetch (``study_key``, ``modality``, ``fingerprint``,
    ``files: []``, ``source``); ``source`` holds the StudyInstanceUID and series UIDs, which are
    identifiers: it is for :func:`~medpipe.pacs.retrieve.fetch_study`, not for files under OUT.
    ``deferred`` / ``skipped``: ``{"study_key", "reason"}``. ``window``: ``start``, ``end`` (ISO)
    and how the start was chosen. ``state``: the source state to commit when the run ends.
    """

    address: PacsAddress
    plans: list[dict[str, Any]] = field(default_factory=list)
    deferred: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    window: dict[str, Any] = field(default_factory=dict)
    state: SourceState = field(default_factory=SourceState)
    study_uids: dict[str, str] = field(default_factory=dict)   # study_key -> StudyInstanceUID
    end: datetime | None = None


def _study_dt(s: RemoteStudy) -> datetime | None:
    try:
        d = datetime.strptime(s.study_date[:8], "%Y%m%d")
    except ValueError:
        return None
    digits = "".join(ch for ch in s.study_time.split(".")[0] if ch.isdigit())
    if len(digits) >= 2:
        digits = (digits + "0000")[:6]
        try:
            return datetime.combine(d.date(), time(int(digits[:2]), int(digits[2:4]), int(digits[4:6])))
        except ValueError:
            return d
    return d


def window_of(state: SourceState, cfg: Config, address: PacsAddress, out: Path | None,
              now: datetime) -> tuple[datetime, datetime, str]:
    """The (start, end, how) of this run's window; raises NoWatermark on a first run without ``since``
    (``out`` None: no stored state, so only ``since`` can start it)."""
    src = cfg.source
    end = datetime.combine(src.until, time.max) if src.until else now
    if src.since:
        return datetime.combine(src.since, time.min), end, "since"
    if state.watermark is None:
        where = f"{state_dir(out, address) / 'state.json'} does not exist" if out is not None else "no --out given"
        raise NoWatermark(
            f"{address.redacted()}: no watermark yet ({where}) "
            "and no --since: a first run against a PACS needs --since YYYY-MM-DD (or source.since), "
            "so that it does not pull the whole archive")
    return state.watermark - timedelta(hours=src.overlap_hours), end, "watermark - overlap"


def watermark_problem(cfg: Config, out: str | Path) -> str | None:
    """Why a run of the configured PACS source into ``out`` must be refused before it starts
    (a first run with no watermark and no ``since``), or None. Reads only.

    >>> watermark_problem(Config.model_validate({"source": {"since": "2026-11-01"}}), "/nonexistent")
    """
    if cfg.source.since is not None or not cfg.source.url:
        return None
    if load_state(Path(out), PacsAddress.parse(cfg.source.url)).watermark is None:
        return no_watermark_text(cfg.source.url, out)
    return None


def no_watermark_text(url: str, out: str | Path) -> str:
    """The refusal of a first run from ``url`` into ``out`` (no watermark there), without any secret.

    >>> no_watermark_text("dimse://ORTHANC@pacs:4242", "/out")[:60]
    'dimse://ORTHANC@pacs:4242: no watermark in /out yet (a first'
    """
    return (f"{PacsAddress.parse(url).redacted()}: no watermark in {out} yet (a first run); give --since "
            "YYYY-MM-DD (or source.since) to say where to start instead of pulling the whole PACS")


def fingerprint_of(series: Iterable[tuple[str, int]]) -> str:
    """The input fingerprint of a PACS study: its series UIDs and instance counts (so an unchanged
    study is skipped without retrieving it)."""
    h = hashlib.sha256(b"pacs-study\x00")
    for uid, n in sorted(series):
        h.update(f"{uid}\x00{n}\x00".encode())
    return h.hexdigest()


def plan_pacs(client: PacsClient, cfg: Config, out: Path | None, now: datetime | None = None, *,
              is_done: Callable[[str, str], bool] | None = None) -> PacsPlan:
    """Plan this run against the PACS of ``client`` (queries only).

    Parameters
    ----------
    client
        An open :class:`~medpipe.pacs.client.PacsClient`.
    cfg
        The configuration (``source``, ``ingest.modalities``, ``ingest.uid_salt``).
    out
        The output folder (source state under ``OUT/pacs/<source-id>/``, read here, written by
        :func:`commit_window`); None: no stored state (a plan to look at: only ``since`` starts it).
    now
        The clock, the PACS's local time (default: this machine's local time).
    is_done
        ``is_done(study_key, fingerprint)``: True when that study is already published with that
        input; such studies stay in ``plans`` (the caller skips them as for folders) but do not
        count against ``source.max_studies``.
    """
    now = now or datetime.now()
    now_ts = now.timestamp()   # observations follow the run's clock; the recount waits in real time
    src = cfg.source
    address = client.address
    state = load_state(out, address) if out is not None else SourceState(address=address.redacted())
    start, end, how = window_of(state, cfg, address, out, now)
    plan = PacsPlan(address=address, end=end, window={"start": start.isoformat(timespec="seconds"),
                                                      "end": end.isoformat(timespec="seconds"), "from": how})
    new_state = SourceState(address=address.redacted(), watermark=state.watermark,
                            change_cursor=state.change_cursor, observations=dict(state.observations))
    plan.state = new_state

    # Spaces pushed as '?' (Orthanc's QIDO matches no value with a space); the exact pattern is applied below.
    query = StudyQuery(date_from=start.date(), date_to=end.date(), modalities=tuple(src.modalities or ()),
                       description=src.study_description.replace(" ", "?") if src.study_description else None)
    found: dict[str, RemoteStudy] = {}
    for s in client.find_studies(query):
        dt = _study_dt(s)
        if dt is not None and s.study_time and dt < start:
            continue   # before the window on its first day
        found[s.study_uid] = s
    by_uid_origin: dict[str, str] = {uid: "window" for uid in found}

    extra_uids: list[tuple[str, str]] = []
    has_feed = src.use_change_feed and hasattr(client, "changes") \
        and getattr(client, "orthanc", lambda: None)() is not None
    backfill = bool(src.since or src.until)
    if has_feed and state.change_cursor is None:
        # the first run only places the cursor (its window covers the past); later runs read from it
        new_state.change_cursor = client.changes(None)[1]   # type: ignore[attr-defined]
    elif has_feed and not backfill:
        # a backfill leaves the cursor alone, so the next nightly run still sees what arrived meanwhile
        feed_uids, cursor = client.changes(state.change_cursor)   # type: ignore[attr-defined]
        new_state.change_cursor = cursor
        extra_uids += [(u, "change feed") for u in sorted(feed_uids)]
        plan.window["change_feed"] = True
    extra_uids += [(u, "deferred earlier") for u in sorted(set(state.pending.values()))]
    for uid, origin in extra_uids:
        if uid in found:
            continue
        hits = client.find_studies(StudyQuery(study_uid=uid))
        if hits:
            found[uid] = hits[0]
            by_uid_origin[uid] = origin

    allowed = {m.upper() for m in (src.modalities or cfg.ingest.modalities)}
    desc_pattern = (src.study_description or "").lower()
    studies = sorted(found.values(), key=lambda s: (s.study_date, s.study_time, s.study_uid))
    taken = 0
    recheck_after = _time.time() + src.recheck_wait_s
    for s in studies:
        key = make_study_key(s.study_uid, cfg.ingest.uid_salt)
        plan.study_uids[key] = s.study_uid
        if s.modalities and not allowed & {m.upper() for m in s.modalities}:
            plan.skipped.append({"study_key": key, "reason": f"no modality of {sorted(allowed)} in study "
                                                             f"({', '.join(s.modalities)})"})
            continue
        if desc_pattern and not fnmatch.fnmatchcase(s.description.lower(), desc_pattern):
            continue   # feed and pending studies were not filtered by the server, the window's loosely
        entry = _plan_study(client, s, key, cfg, new_state, allowed, now_ts, recheck_after)
        if "reason" in entry and "source" not in entry:
            (plan.deferred if entry.get("deferred") else plan.skipped).append(
                {"study_key": key, "reason": entry["reason"]})
            if entry.get("deferred"):
                new_state.pending[key] = s.study_uid
            continue
        done = is_done(key, entry["fingerprint"]) if is_done else False
        if not done and src.max_studies is not None and taken >= src.max_studies:
            plan.deferred.append({"study_key": key, "reason": f"source.max_studies ({src.max_studies}) reached "
                                                              "this run: taken up by a later run"})
            new_state.pending[key] = s.study_uid
            continue
        taken += 0 if done else 1
        entry["source"]["origin"] = by_uid_origin.get(s.study_uid, "window")
        plan.plans.append(entry)
    return plan


def _plan_study(client: PacsClient, s: RemoteStudy, key: str, cfg: Config, state: SourceState,
                allowed: set[str], now_ts: float, recheck_after: float) -> dict[str, Any]:
    """One study's plan dict, or ``{"reason", "deferred"}`` when it is deferred or has nothing to fetch."""
    all_series = client.find_series(s.study_uid)
    series: list[tuple[RemoteSeries, int]] = []
    for se in all_series:
        if se.modality and se.modality.upper() not in allowed:
            continue   # SR, SEG, PR, KO...: not an input of the pipeline
        n = se.n_instances if se.n_instances is not None else len(client.list_instances(s.study_uid, se.series_uid))
        if n > 0:
            series.append((se, n))
    if not series:
        return {"reason": f"no image series ({len(all_series)} series, none of modality {sorted(allowed)})",
                "deferred": False}
    growing: list[str] = []
    out_series: list[dict[str, Any]] = []
    stability = getattr(client, "series_stability", None)
    for se, n in series:
        prev, cur = state.observe(se.series_uid, n, now_ts, cfg.ingest.uid_salt)
        j = judge_series(n, prev, cur, now_ts, cfg.source.stable_age_s,
                         (lambda uid=se.series_uid: stability(uid)) if stability else (lambda: None))
        if j.verdict == "growing":
            growing.append(f"series {se.number if se.number is not None else '?'} ({se.modality}): {j.reason}")
        out_series.append({"series_uid": se.series_uid, "expected": n, "modality": se.modality,
                           "number": se.number, "recheck": j.verdict == "recheck", "why": j.reason})
    if growing:
        return {"reason": "still growing: " + "; ".join(growing), "deferred": True}
    main = max(out_series, key=lambda d: d["expected"])
    return {
        "study_key": key,
        "modality": main["modality"] or (s.modalities[0] if s.modalities else ""),
        "fingerprint": fingerprint_of((d["series_uid"], d["expected"]) for d in out_series),
        "files": [],
        "source": {
            "address": client.address.url, "study_key": key, "study_uid": s.study_uid,
            "study_date": s.study_date, "series": out_series,
            "recheck_after": recheck_after if any(d["recheck"] for d in out_series) else None,
        },
    }


def commit_window(out: Path, plan: PacsPlan, deferred: Iterable[str] = ()) -> Path:
    """Write the source state when the run ends: watermark to the window's end (never backwards),
    change-feed cursor, series observations, and as pending every study deferred at planning or
    named in ``deferred`` (study keys deferred or failed while fetching). Returns state.json's path."""
    state = plan.state
    for key in deferred:
        uid = plan.study_uids.get(key)
        if uid:
            state.pending[key] = uid
    taken = {p["study_key"] for p in plan.plans} - set(deferred)
    for key in taken:
        state.pending.pop(key, None)
    if plan.end is not None and (state.watermark is None or plan.end > state.watermark):
        state.watermark = plan.end
    state.forget_old(_time.time())
    return save_state(out, plan.address, state)


def format_pacs_plan(plan: PacsPlan) -> str:
    """The text ``medpipe plan PACS`` prints: the window, studies to fetch, deferred and skipped ones."""
    w = plan.window
    lines = [f"{plan.address.redacted()}: window {w.get('start')} .. {w.get('end')} (from {w.get('from')}"
             f"{', plus the change feed' if w.get('change_feed') else ''})",
             f"{len(plan.plans)} studies to fetch, {len(plan.deferred)} deferred, {len(plan.skipped)} skipped"]
    for p in plan.plans:
        ser = p["source"]["series"]
        n = sum(d["expected"] for d in ser)
        recheck = " (counted again before retrieval)" if p["source"].get("recheck_after") else ""
        lines.append(f"study {p['study_key']}  {p['modality']:<3} FETCH {len(ser)} series, {n} instance(s)"
                     f" [{p['source'].get('origin', 'window')}]{recheck}")
    for d in plan.deferred:
        lines.append(f"study {d['study_key']}  DEFER: {d['reason']}")
    for d in plan.skipped:
        lines.append(f"study {d['study_key']}  SKIP: {d['reason']}")
    return "\n".join(lines)
