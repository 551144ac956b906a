"""Tasks that close a study (report, publish) and a run (run.json, run.html, artifacts)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from medpipe.atomic import write_json
from medpipe.config import Config
from medpipe.errors import StudyError
from medpipe.outputs import OutputLayout

from .dask_client import cluster_client
from .study import library

log = logging.getLogger("medpipe")


@task(name="report", task_run_name="report-{study_key}", cache_policy=NO_CACHE, persist_result=False, retries=1)
def finish_study(
    study_key: str,
    plan: dict[str, Any],
    stages: dict[str, dict[str, Any]],
    errors: dict[str, str],
    staging: str,
    out: str,
    provenance: dict[str, Any],
    config: dict[str, Any],
    archive: str,
) -> dict[str, Any]:
    """Write the study's reports into its staging folder and publish it; return its run.json entry.

    Only a complete, verified folder is published (:mod:`medpipe.publish`), and a failed result
    never replaces an intact successful one. When Dask runs this task again after a lost worker
    and the first attempt had already published this very result, that result is kept as it is.
    Paths of archive files are replaced by tokens (:mod:`medpipe.privacy`); the entry's
    ``private_issues`` carries them for the operator's log and is not part of run.json.
    """
    library("medpipe.report")  # imported once per process, under the stage tasks' lock
    from medpipe.privacy import PathRedactor
    from medpipe.publish import already_published, publish_study, published_fingerprint
    from medpipe.report import assemble_record

    cfg = Config.model_validate(config)
    t0 = time.perf_counter()
    layout = OutputLayout(Path(out))
    staging_dir, final = Path(staging), layout.study(study_key)
    fingerprint = provenance["input_fingerprint"]
    if not staging_dir.is_dir():
        done = already_published(final, fingerprint)
        if done is None:
            raise StudyError(study_key, "its staging folder is gone (a lost worker or a stopped run); "
                             "nothing was published")
        return _entry(study_key, plan, done, _timings(stages), kept_previous=False, record_time=0.0)

    redactor = PathRedactor.for_output(out, archive)
    timings = _timings(stages)
    error = "; ".join(f"{stage}: {msg}" for stage, msg in errors.items()) or None
    record = assemble_record(study_key, {"plan": plan, **stages}, timings, provenance, error=error)
    private = [redactor.issue(i)[1] | {"study_key": study_key} for i in record.get("issues") or []]
    record = redactor.deep(record, known=plan.get("files") or ())
    record = _write_report(staging_dir, record, cfg, plan.get("files") or None, error)
    record_time = round(time.perf_counter() - t0, 3)
    kept_previous = record["status"] != "ok" and published_fingerprint(final)[0] is not None
    if not kept_previous:
        keep = ("filtered.zarr",) if cfg.run.keep_intermediates else ()
        publish_study(staging_dir, final, keep=keep, gate=layout.work / provenance["run_id"])
    entry = _entry(study_key, plan, record, timings, kept_previous=kept_previous, record_time=record_time)
    return {**entry, "private_issues": private}


def _write_report(staging: Path, record: dict[str, Any], cfg: Config, source_files: list[str] | None,
                  error: str | None) -> dict[str, Any]:
    """Write the report files; a successful record whose folder is incomplete becomes a failed one."""
    from medpipe.publish import verify_study
    from medpipe.report import write_study_report

    try:
        with cluster_client():
            record["outputs"] = write_study_report(staging, record, cfg, source_files=source_files)
    except Exception as exc:  # the report of a study must not hide its results: keep the JSON
        log.exception("report of study %s failed", record["study_key"])
        record["status"], record["error"] = "failed", f"{error + '; ' if error else ''}report: {exc}"
        record["outputs"] = {"json": "report.json"}
        write_json(staging / "report.json", record)
    problems = verify_study(staging) if record["status"] == "ok" else []
    if problems:
        record["status"], record["error"] = "failed", "outputs incomplete: " + "; ".join(problems)
        record["outputs"] = write_study_report(staging, record, cfg)
    return record


def _timings(stages: dict[str, Any]) -> dict[str, float]:
    """Seconds per stage, from the stages' results."""
    return {name: r.get("seconds", 0.0) for name, r in stages.items() if isinstance(r, dict)}


def _entry(study_key: str, plan: dict[str, Any], record: dict[str, Any], timings: dict[str, float], *,
           kept_previous: bool, record_time: float) -> dict[str, Any]:
    """The run.json entry of a reported study."""
    from medpipe.report import key_findings

    return {
        "study_key": study_key,
        "status": record["status"],
        "error": record.get("error"),
        "output": f"studies/{study_key}",
        "previous_output_kept": kept_previous,
        "modality": plan.get("modality"),
        "seconds": round(sum(timings.values()) + record_time, 3),
        "timings": {**timings, "report": record_time},
        "findings": key_findings(record),
        "files": sorted(record.get("outputs") or {}),
    }
