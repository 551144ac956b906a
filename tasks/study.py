"""The Prefect tasks of a run: ``discover`` the archive, then one ``process_study`` task per study."""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from medpipe.config import Config
from medpipe.errors import InputError, ModelError, StudyError

from .dask_client import cluster_client

log = logging.getLogger("medpipe")


def retry_transient(task, task_run, state) -> bool:  # noqa: ANN001 (Prefect's hook signature)
    """Retry failures that may pass (a lost worker, I/O hiccups), not bad input, bad models or a
    stopping run (:func:`medpipe.study.is_transient`)."""
    try:
        state.result()
    except (InputError, StudyError, ModelError, ValueError, TypeError):
        return False
    except Exception as exc:
        return library("medpipe.study").is_transient(exc)
    return False


# Results are not cached by Prefect: a study is skipped or redone from the fingerprints of its
# inputs stored with its published outputs (medpipe.outputs), which survive across runs and
# servers. Hashing file lists as Prefect cache keys would only repeat that work.
STAGE = dict(cache_policy=NO_CACHE, retry_condition_fn=retry_transient, persist_result=False)


_IMPORTS = threading.Lock()


def library(module: str) -> Any:
    """Import ``module`` of the library, one import at a time per process.

    Stage tasks import lazily (a worker loads only the stages it runs), and one worker runs
    several tasks in threads. Two imports at once can make CPython 3.11 fail in ast.parse
    (gh-106905, "AST constructor recursion depth mismatch"); a lock costs nothing after the
    first import.
    """
    with _IMPORTS:
        return importlib.import_module(module)


@task(name="discover", cache_policy=NO_CACHE, persist_result=False, retries=1)
def discover(archive: str, config: dict[str, Any], out: str | None = None) -> dict[str, Any]:
    """Scan the archive's headers on the cluster and plan one series per study.

    With ``out``, the archive's catalogue under ``OUT/private/catalogue/`` answers for every file
    whose stat is unchanged since the last run; only new and changed files are read.
    """
    ingest_ = library("medpipe.ingest")
    cfg = Config.model_validate(config)
    catalogue = ingest_.catalogue_path(out, archive) if out else None
    with cluster_client():
        scan = ingest_.scan_archive(Path(archive), cfg.ingest, catalogue=catalogue)
    plans = ingest_.plan_studies(scan, cfg.ingest)
    log.info("found %d studies, %d file problems in %s (%d of %d headers read)", len(plans), len(scan.issues),
             archive, scan.n_read, scan.n_files)
    return {"plans": [p.to_dict() for p in plans], "issues": [i.to_dict() for i in scan.issues]}


# What a study task imports (the stages import lazily); workers load them as they start (flows/worker_preload.py).
STUDY_MODULES = ("medpipe.ingest", "medpipe.ingest.convert", "medpipe.ops.stage", "medpipe.inference.stage",
                 "medpipe.report", "medpipe.study")


@task(name="process_study", task_run_name="study-{plan[study_key]}", **STAGE)
def process_study(plan: dict[str, Any], staging: str, out: str, config: dict[str, Any], provenance: dict[str, Any],
                  archive: str, gate: str | None = None) -> Any:
    """Run one study's stages and publish its report (:func:`medpipe.study.process_study`);
    return its :class:`~medpipe.study.StudyEntry`.

    A study planned from a PACS (its plan has ``source``) is first retrieved into the bounded
    cache (stage ``fetch``, :class:`tasks.pacs.PacsFetch`); an incomplete one is ``deferred``.
    When destinations are configured, the objects of a study processed here are put into each
    destination's outbox (the flow delivers them at the end of the run). The study's retrieved
    files are removed when it is done.

    Each stage shows in the task run's logs as it starts and ends (with its seconds), and a
    table artifact of the task run lists the stages, their seconds and errors.
    """
    for module in STUDY_MODULES:  # the stages import these lazily: here, under the lock
        library(module)
    study = library("medpipe.study")
    pacs = library("tasks.pacs")
    cfg = Config.model_validate(config)
    ctx = study.StudyContext(staging=Path(staging), out=Path(out), cfg=cfg, provenance=provenance,
                             archive=archive, gate=None if gate is None else Path(gate))
    stages = _StageLog()
    fetch = pacs.PacsFetch(config, plan["source"], pacs.cache_root(cfg, out)) if plan.get("source") else None
    try:
        with cluster_client():  # the stages' chunk work runs on the run's cluster
            entry = study.process_study(plan, ctx, progress=stages, fetch=fetch)
        _send(pacs, entry, plan, fetch, cfg, out, ctx.fingerprint, Path(staging))
    finally:
        if fetch is not None:
            fetch.cleanup()
    stages.artifact(entry.study_key, entry.status)
    return entry


def _send(pacs: Any, entry: Any, plan: dict[str, Any], fetch: Any, cfg: Config, out: str, fingerprint: str,
          staging: Path) -> None:
    """Enqueue a processed study's objects for the destinations; a problem is logged (the study's
    result stands: it is published; its objects are made again when the study is next redone)."""
    if not cfg.send.destinations or entry.status != "ok":
        return
    files = list(fetch.fetched.files) if fetch is not None and fetch.fetched is not None else list(plan.get("files") or [])
    try:
        problems = pacs.enqueue_results(entry, files, cfg, out, fingerprint, staging.with_name(staging.name + ".send"))
    except Exception as exc:  # noqa: BLE001 - the next run retries a study whose objects were not enqueued
        problems = [f"results not enqueued for sending: {type(exc).__name__}: {exc}"]
    for p in problems:
        log.warning("study %s: %s", entry.study_key, p)


class _StageLog:
    """The progress hook: a line in the task run's log per stage start and end, and the rows of
    the stage table (errors come redacted from :mod:`medpipe.study`)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def __call__(self, stage: str, event: str, info: dict[str, Any]) -> None:
        from prefect import get_run_logger

        logger = get_run_logger()
        if event == "start":
            logger.info("%s: started", stage)
            return
        seconds, error = info.get("seconds") or 0.0, info.get("error")
        self.rows.append({"stage": stage, "seconds": seconds, "status": "failed" if error else "ok",
                          "error": error})
        if error:
            logger.warning("%s: failed after %.2f s: %s", stage, seconds, error)
        else:
            logger.info("%s: done in %.2f s", stage, seconds)

    def artifact(self, study_key: str, status: str) -> None:
        """A table artifact on the task run: each stage, its seconds and error."""
        from prefect.artifacts import create_table_artifact

        try:
            create_table_artifact(self.rows, description=f"Stages of study {study_key}: {status}")
        except Exception as exc:  # the files are the record; the UI's copy may fail with the API
            log.warning("stage table of study %s not created: %s", study_key, exc)
