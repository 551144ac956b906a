"""Retrieving one planned study into the worker's cache, with its completeness proven.

:func:`fetch_study` takes a plan's ``source`` dict (:func:`medpipe.pacs.plan.plan_pacs`), streams
every planned series into ``cache_dir/<study-key>/`` (Part 10 files as the PACS sent them,
compressed transfer syntaxes included; never a whole study in memory) and checks steps 2 and 3 of
:mod:`medpipe.pacs.completeness`. :func:`plan_retrieved` then scans and plans that folder as
discovery does an archive folder; :func:`fetch_and_plan` does both, which is what the ``fetch``
seam of :func:`medpipe.study.process_study` needs. The folder is removed (:func:`drop_study`) once
the study is published. A study that is still growing or arrived short raises
:class:`~medpipe.pacs.client.IncompleteStudy` (the caller defers it) and leaves nothing behind.

Example (a sketch: ``p`` one of ``plan_pacs(...).plans``, ``client`` open)::

    cache = cache_root(cfg, out)
    study = fetch_and_plan(StudyPlan.from_dict(p), p["source"], cache, client, cfg)
    ...                                   # ingest study.files, publish
    drop_study(cache, p["source"])
"""
from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread

from ..config import Config, IngestConfig
from ..errors import StudyError
from .client import IncompleteStudy, PacsClient, PacsError

if TYPE_CHECKING:
    from ..ingest.plan import StudyPlan

log = logging.getLogger(__name__)
_UID_NAME = re.compile(r"^[0-9]+(\.[0-9]+)*\.dcm$")


class SeriesGrowing(IncompleteStudy):
    """A series' count changed between two observations of this run: still receiving instances."""


def cache_root(cfg: Config, out: str | Path) -> Path:
    """Where studies are retrieved: ``source.cache_dir``, else ``OUT/.work/pacs-cache`` (one
    folder per study, removed when the study is done; ``source.cache_max_gb`` bounds it)."""
    return Path(cfg.source.cache_dir) if cfg.source.cache_dir else Path(out) / ".work" / "pacs-cache"


def study_folder(cache_dir: Path, source: dict[str, Any]) -> Path:
    """The folder of one study's retrieved files: ``cache_dir/<study-key>``."""
    return Path(cache_dir) / source["study_key"]


def cache_bytes(cache_dir: Path) -> int:
    """Bytes of the files under ``cache_dir`` (0 when it does not exist)."""
    root = Path(cache_dir)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def wait_for_space(cache_dir: Path, max_bytes: int | None, timeout_s: float = 600.0,
                   sleep: Callable[[float], None] = time.sleep) -> None:
    """Wait while the cache holds ``max_bytes`` or more (studies in flight free it when published)."""
    if not max_bytes:
        return
    deadline = time.monotonic() + timeout_s
    while (used := cache_bytes(cache_dir)) >= max_bytes:
        if time.monotonic() >= deadline:
            raise PacsError(f"retrieval cache {cache_dir} holds {used / 1e9:.1f} GB >= source.cache_max_gb "
                            f"for {timeout_s:.0f} s: are finished studies' folders removed?")
        sleep(1.0)


def recheck_counts(source: dict[str, Any], client: PacsClient,
                   sleep: Callable[[float], None] = time.sleep) -> None:
    """Count again the series planned with ``recheck`` (first seen, no server stability flag), once
    ``recheck_after`` has passed; a changed count raises :class:`SeriesGrowing`."""
    todo = [s for s in source["series"] if s.get("recheck")]
    if not todo:
        return
    wait = float(source.get("recheck_after") or 0) - time.time()
    if wait > 0:
        sleep(wait)
    now = {se.series_uid: se.n_instances for se in client.find_series(source["study_uid"])}
    changed = {}
    for s in todo:
        n = now.get(s["series_uid"])
        if n is None:
            n = len(client.list_instances(source["study_uid"], s["series_uid"]))
        if n != s["expected"]:
            changed[s["series_uid"]] = (s["expected"], n)
    if changed:
        what = "; ".join(f"series {_label(source, uid)}: {a} -> {b} instance(s)" for uid, (a, b) in changed.items())
        raise SeriesGrowing(f"study {source['study_key']}: still growing ({what}): deferred", changed)


def _label(source: dict[str, Any], series_uid: str) -> str:
    for i, s in enumerate(source["series"]):
        if s["series_uid"] == series_uid:
            return f"{s.get('number') if s.get('number') is not None else i} ({s.get('modality') or '?'})"
    return "?"


def arrived_uids(folder: Path) -> dict[str, Path]:
    """SOPInstanceUID -> file of every DICOM file in ``folder``.

    The clients name each file ``<SOPInstanceUID>.dcm`` from the object as it arrived (its file
    meta over DICOMweb, the C-STORE request over DIMSE); other files are read (header only).
    """
    out: dict[str, Path] = {}
    for p in sorted(Path(folder).iterdir()):
        if _UID_NAME.match(p.name):
            out[p.name[:-4]] = p
            continue
        try:
            ds = dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            out[str(ds.SOPInstanceUID)] = p
        except Exception as exc:  # noqa: BLE001 - an unreadable file is a missing instance
            log.warning("%s: received file is not readable DICOM (%s)", p, exc)
    return out


def fetch_study(source: dict[str, Any], cache_dir: Path, client: PacsClient, *,
                max_bytes: int | None = None, sleep: Callable[[float], None] = time.sleep) -> Path:
    """Retrieve the planned series of one study into ``cache_dir/<study-key>/``; return that folder.

    Raises
    ------
    SeriesGrowing, IncompleteStudy
        A count changed, the listing disagrees with the count, or the instances that arrived are
        not exactly those listed (the folder is removed; the study is deferred by the caller).
    PacsAuthError, PacsUnavailable
        From the client (after its retries).
    """
    recheck_counts(source, client, sleep)
    wait_for_space(cache_dir, max_bytes, sleep=sleep)
    folder = study_folder(cache_dir, source)
    if folder.exists():
        shutil.rmtree(folder)   # a previous attempt's leftovers
    folder.mkdir(parents=True)
    study_uid = source["study_uid"]
    try:
        for i, s in enumerate(source["series"]):
            uid, expected = s["series_uid"], int(s["expected"])
            dest = folder / f"series-{i:03d}"
            t0 = time.monotonic()
            # the listing is asked for while the series streams in (two requests in flight)
            with ThreadPoolExecutor(1) as pool:
                listing = pool.submit(client.list_instances, study_uid, uid)
                n = client.retrieve_series(study_uid, uid, dest)
                listed = set(listing.result())
            if len(listed) != expected:
                raise SeriesGrowing(f"study {source['study_key']}: series {_label(source, uid)} lists "
                                    f"{len(listed)} instance(s) where {expected} were counted: still changing",
                                    {uid: (expected, len(listed))})
            got = arrived_uids(dest)
            missing = listed - set(got)
            extra = set(got) - listed
            if missing or extra:   # an unreadable file is a missing instance; a duplicate is harmless
                raise IncompleteStudy(
                    f"study {source['study_key']}: series {_label(source, uid)}: {len(set(got) & listed)} of "
                    f"{expected} listed instance(s) arrived ({len(missing)} missing, {len(extra)} not "
                    f"listed; {n} received): deferred",
                    {uid: (expected, len(set(got) & listed))})
            log.debug("study %s series %d: %d instance(s) in %.2f s", source["study_key"], i, n,
                      time.monotonic() - t0)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def plan_retrieved(folder: Path, plan: StudyPlan, ingest_cfg: IngestConfig) -> StudyPlan:
    """The plan to ingest ``plan``'s study from its retrieved files in ``folder``.

    ``folder`` is scanned and planned as discovery does an archive folder (the series to ingest
    is chosen by the same rules); the result keeps ``plan.fingerprint``, the study's identity for
    skipping and for the UIDs of the objects sent back, which is what the PACS listed (series and
    instance counts), not the cache's paths and times.

    Raises
    ------
    StudyError
        ``folder`` holds no study with ``plan.study_key``, or nothing of it to ingest (the
        planner's reason, e.g. no series of an ingested modality).

    Examples
    --------
    >>> from medpipe.config import IngestConfig
    >>> from medpipe.ingest import StudyPlan
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...     plan_retrieved(Path(empty), StudyPlan("k1", "CT"), IngestConfig())
    Traceback (most recent call last):
    ...
    medpipe.errors.StudyError: study k1: the retrieved files hold nothing to process: no series of this study
    """
    # medpipe.ingest brings zarr and the converters: only the workers that fetch need it
    from ..ingest import plan_studies, scan_archive

    scan = scan_archive(Path(folder), ingest_cfg)
    found = [p for p in plan_studies(scan, ingest_cfg) if p.study_key == plan.study_key]
    if not found or not found[0].files:
        why = found[0].skip_reason if found else "no series of this study"
        raise StudyError(plan.study_key, f"the retrieved files hold nothing to process: {why}")
    got = found[0]
    got.fingerprint = plan.fingerprint or got.fingerprint
    return got


def fetch_and_plan(plan: StudyPlan, source: dict[str, Any], cache_dir: Path, client: PacsClient, cfg: Config, *,
                   sleep: Callable[[float], None] = time.sleep) -> StudyPlan:
    """Retrieve a planned study into ``cache_dir/<study-key>/`` (:func:`fetch_study`, the cache
    bounded by ``source.cache_max_gb``) and return the plan to ingest it (:func:`plan_retrieved`).

    ``plan`` is the study as :func:`~medpipe.pacs.plan.plan_pacs` planned it (no files yet) and
    ``source`` its ``source`` dict. The folder stays until :func:`drop_study`: the objects sent
    back are made from its files after the study is published.

    Raises
    ------
    SeriesGrowing, IncompleteStudy
        As :func:`fetch_study` (nothing is left in the cache; the caller defers the study).
    StudyError
        The retrieved files hold nothing to ingest (the folder stays for :func:`drop_study`).
    PacsAuthError, PacsUnavailable
        From the client (after its retries).
    """
    root = fetch_study(source, cache_dir, client, max_bytes=int(cfg.source.cache_max_gb * 1e9), sleep=sleep)
    return plan_retrieved(root, plan, cfg.ingest)


def drop_study(cache_dir: Path, source: dict[str, Any]) -> None:
    """Remove a study's cache folder (after it is published, or when it is given up)."""
    shutil.rmtree(study_folder(cache_dir, source), ignore_errors=True)
