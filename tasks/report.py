"""Tasks that close a study (report, publish) and a run (run.json, run.html, artifacts)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from medpipe.atomic import write_json
from medpipe.config import Config
from medpipe.outputs import OutputLayout, completed_fingerprint, publish_study

from .dask_client import cluster_client

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
) -> dict[str, Any]:
    """Write the study's reports into its staging folder and publish it; return its run.json entry.

    A failed study is published only where no earlier successful output exists, so a bad night
    never replaces a good result (its error is in run.json either way).
    """
    from medpipe.report import assemble_record, key_findings, write_study_report

    cfg = Config.model_validate(config)
    t0 = time.perf_counter()
    staging_dir, final = Path(staging), OutputLayout(Path(out)).study(study_key)
    staging_dir.mkdir(parents=True, exist_ok=True)
    timings = {name: r.get("seconds", 0.0) for name, r in stages.items() if isinstance(r, dict)}
    error = "; ".join(f"{stage}: {msg}" for stage, msg in errors.items()) or None
    record = assemble_record(study_key, {"plan": plan, **stages}, timings, provenance, error=error)
    written: dict[str, str] = {}
    try:
        with cluster_client():
            written = write_study_report(staging_dir, record, cfg, source_files=plan.get("files") or None)
    except Exception as exc:  # the report of a study must not hide its results: keep the JSON
        log.exception("report of study %s failed", study_key)
        record["status"], record["error"] = "failed", f"{error + '; ' if error else ''}report: {exc}"
        write_json(staging_dir / "report.json", record)
    record_time = round(time.perf_counter() - t0, 3)
    kept_previous = record["status"] == "failed" and completed_fingerprint(Path(out), study_key) is not None
    if not kept_previous:
        keep = ("filtered.zarr",) if cfg.run.keep_intermediates else ()
        publish_study(staging_dir, final, keep=keep)
    return {
        "study_key": study_key,
        "status": record["status"],
        "error": record["error"],
        "output": f"studies/{study_key}",
        "previous_output_kept": kept_previous,
        "modality": plan.get("modality"),
        "seconds": round(sum(timings.values()) + record_time, 3),
        "timings": {**timings, "report": record_time},
        "findings": key_findings(record),
        "files": sorted(written),
    }


@task(name="run-summary", cache_policy=NO_CACHE, persist_result=False)
def write_run_summary(out: str, run: dict[str, Any]) -> dict[str, Any]:
    """Write OUT/run.json and OUT/run.html and publish the summary as Prefect artifacts."""
    from medpipe.report import run_markdown, run_table, write_run_html

    layout = OutputLayout(Path(out))
    write_json(layout.run_json, run)
    write_run_html(layout.root, run)
    create_markdown_artifact(run_markdown(run), key="medpipe-run-summary", description="medpipe run summary")
    create_table_artifact(run_table(run), key="medpipe-studies", description="Studies of this run")
    return run
