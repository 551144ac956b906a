"""One Prefect task per stage of a study. Each reads and writes the study's staging folder."""

from __future__ import annotations

import importlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from medpipe.config import Config
from medpipe.errors import InputError, ModelError, StudyError

from .dask_client import cluster_client

log = logging.getLogger("medpipe")


def retry_transient(task, task_run, state) -> bool:  # noqa: ANN001 (Prefect's hook signature)
    """Retry failures that may pass (a lost worker, I/O hiccups), not bad input or bad models."""
    try:
        state.result()
    except (InputError, StudyError, ModelError, ValueError, TypeError):
        return False
    except Exception:
        return True
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


def _timed(fn, *args: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    with cluster_client():
        result = fn(*args)
    result = dict(result)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


@task(name="discover", cache_policy=NO_CACHE, persist_result=False, retries=1)
def discover(archive: str, config: dict[str, Any]) -> dict[str, Any]:
    """Scan the archive's headers on the cluster and plan one series per study."""
    ingest_ = library("medpipe.ingest")
    cfg = Config.model_validate(config)
    with cluster_client():
        scan = ingest_.scan_archive(Path(archive), cfg.ingest)
    plans = ingest_.plan_studies(scan, cfg.ingest)
    log.info("found %d studies, %d file problems in %s", len(plans), len(scan.issues), archive)
    return {"plans": [p.to_dict() for p in plans], "issues": [i.to_dict() for i in scan.issues]}


@task(name="ingest", task_run_name="ingest-{plan[study_key]}", **STAGE)
def ingest(plan: dict[str, Any], staging: str, config: dict[str, Any]) -> dict[str, Any]:
    ingest_ = library("medpipe.ingest")
    cfg = Config.model_validate(config)
    Path(staging).mkdir(exist_ok=True)  # not parents: a missing work folder means the run is over
    return _timed(ingest_.ingest_study, ingest_.StudyPlan.from_dict(plan), Path(staging), cfg.ingest)


@task(name="filter", task_run_name="filter-{study_key}", **STAGE)
def filter_(study_key: str, ingested: dict[str, Any], staging: str, config: dict[str, Any]) -> dict[str, Any]:
    return _timed(library("medpipe.ops.stage").filter_study, Path(staging), ingested["modality"], Config.model_validate(config))


@task(name="segment", task_run_name="segment-{study_key}", **STAGE)
def segment(study_key: str, filtered: dict[str, Any], ingested: dict[str, Any], staging: str,
            config: dict[str, Any]) -> dict[str, Any]:
    return _timed(library("medpipe.ops.stage").segment_study, Path(staging), ingested["modality"], Config.model_validate(config))


@task(name="infer", task_run_name="infer-{study_key}-{model}", **STAGE)
def infer(study_key: str, ingested: dict[str, Any], staging: str, config: dict[str, Any], model: str | None = None,
          facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the configured model ``model`` (the first when None) on the study, if its domain holds
    ``facts`` (the plan's, :meth:`medpipe.inference.domain.Facts.from_plan`)."""
    select_model = library("medpipe.inference.model").select_model
    infer_study = library("medpipe.inference.stage").infer_study
    cfg = Config.model_validate(config)
    if not select_model(cfg, model).enabled:
        why = "inference disabled in the configuration"
        return {"skipped": why, "applicable": False, "reason": why}
    return _timed(infer_study, Path(staging), ingested["modality"], cfg, model, facts)
