"""The archive flow: discover studies, then per study ingest, filter, segment, infer and report.

``process_archive`` is what deployments and the CLI run. It reads the configuration and starts
``run_pipeline`` on the Dask cluster that the configuration (or the run's parameters) names, so
a run triggered from the Prefect UI can choose its archive, output, configuration and cluster.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed

from medpipe import __version__
from medpipe.config import Config, deep_merge
from medpipe.outputs import (
    OutputLayout,
    clean_work,
    completed_fingerprint,
    input_fingerprint,
    new_run_id,
    now_iso,
    run_lock,
    versions,
)
from tasks import study as stages
from tasks.model import check_model
from tasks.report import finish_study, write_run_summary

from . import progress
from .cluster import gpu_annotations, task_runner

log = logging.getLogger("medpipe")


@flow(name="medpipe-archive", log_prints=True)
def process_archive(
    archive: str,
    out: str,
    config: dict[str, Any] | None = None,
    config_file: str | None = None,
    force: bool = False,
    dask_address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Process every study of ``archive`` into ``out``; return the run record (run.json).

    Parameters
    ----------
    archive, out : str
        The archive folder to read and the output folder to write.
    config : dict, optional
        Configuration values (same structure as the YAML file), applied over ``config_file``.
    config_file : str, optional
        A YAML, JSON or TOML configuration file.
    force : bool
        Reprocess studies whose inputs, configuration and model are unchanged (backfill).
    dask_address : str, optional
        ``tcp://HOST:PORT`` of an existing Dask scheduler instead of a local cluster.
    workers : int, optional
        Worker processes of the local cluster (overrides the configuration).
    """
    overrides: dict[str, Any] = {}
    if force:
        overrides["run"] = {"force": True}
    if dask_address:
        overrides["cluster"] = {"kind": "address", "address": dask_address}
    if workers:
        overrides.setdefault("cluster", {})["workers"] = workers
    cfg = Config.load(config_file, overrides=deep_merge(config or {}, overrides))
    from medpipe.access import check_out_folder  # refuse outputs outside the allowed roots
    check_out_folder(out, cfg.run.allowed_out_roots)
    pipeline = run_pipeline.with_options(task_runner=task_runner(cfg.cluster))
    return pipeline(archive=str(Path(archive).resolve()), out=str(Path(out).resolve()),
                    config=cfg.model_dump(mode="json"))


@flow(name="medpipe-pipeline")
def run_pipeline(archive: str, out: str, config: dict[str, Any]) -> dict[str, Any]:
    """Run every study of the archive on this flow's Dask cluster and write run.json."""
    cfg = Config.model_validate(config)
    logger = get_run_logger()
    if not Path(archive).is_dir():
        raise FileNotFoundError(f"{archive}: archive folder not found")
    run_id = new_run_id()
    started, t0 = now_iso(), time.perf_counter()
    run: dict[str, Any] = {
        "run_id": run_id,
        "started": started,
        "finished": None,
        "status": "running",
        "versions": versions(),
        "parameters": {"archive": archive, "out": out, "config": config,
                       "config_fingerprint": cfg.fingerprint()},
        "prefect": _prefect_ids(),
        "dask": {"dashboard": _dashboard_link(logger)},
        "studies": [],
        "issues": [],
    }
    progress.emit("cluster", run["dask"])
    with run_lock(Path(out)):
        clean_work(Path(out))
        try:
            model = check_model.submit(config).result() if cfg.model.enabled else None
            run["model"] = model
            found = stages.discover.submit(archive, config).result()
            run["issues"] = found["issues"]
            run["studies"] = _drive(found["plans"], run_id, out, cfg, model)
            run["status"] = "completed"
        except Exception as exc:
            run["status"], run["error"] = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            run["finished"] = now_iso()
            run["seconds"] = round(time.perf_counter() - t0, 2)
            run["counts"] = {s: sum(1 for st in run["studies"] if st["status"] == s) for s in ("ok", "failed", "skipped")}
            write_run_summary.submit(out, run).result()
            clean_work(Path(out))
            progress.emit("finished", run)
    return run


def _drive(plans: list[dict[str, Any]], run_id: str, out: str, cfg: Config,
           model: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Submit each study's stages as their inputs complete; return run.json's study entries.

    ingest -> filter -> segment, and ingest -> infer, then report. A failed stage stops only its
    own study's dependent stages; the study is then reported with what it has and the error.
    A window of studies is in flight at a time, which bounds staging disk and scheduler load.
    """
    layout = OutputLayout(Path(out))
    config = cfg.model_dump(mode="json")
    entries: list[dict[str, Any]] = []
    todo: list[_Study] = []
    for plan in plans:
        key = plan["study_key"]
        fp = input_fingerprint(plan.get("fingerprint", ""), cfg.fingerprint(), (model or {}).get("sha256"))
        if plan.get("skip_reason"):
            entries.append(_entry(plan, layout, "skipped", reason=plan["skip_reason"]))
        elif not cfg.run.force and completed_fingerprint(layout.root, key) == fp:
            entries.append(_entry(plan, layout, "skipped", reason="unchanged since its last successful run"))
        else:
            todo.append(_Study(plan, str(layout.staging(run_id, key)), fp))
    progress.emit("planned", {"total": len(plans), "to_process": len(todo)})
    for entry in entries:
        progress.emit("study", entry)

    # Transient failures (a lost worker, a storage hiccup) are retried with exponential backoff.
    backoff = [cfg.run.retry_delay_s * 2**i for i in range(cfg.run.retries)] or None
    opts = dict(retries=cfg.run.retries, retry_delay_seconds=backoff, timeout_seconds=cfg.run.study_timeout_s)
    ingest, filter_, segment, infer = (t.with_options(**opts) for t in
                                       (stages.ingest, stages.filter_, stages.segment, stages.infer))
    gpu = gpu_annotations(cfg.cluster)
    provenance = {"medpipe_version": __version__, "run_id": run_id, "config": config,
                  "config_fingerprint": cfg.fingerprint(), "versions": versions()}
    bar = create_progress_artifact(0.0, key="medpipe-progress", description="Studies finished") if todo else None

    running: dict[PrefectFuture, tuple[_Study, str]] = {}
    reported = 0
    waiting = list(reversed(todo))
    window = max(4, 2 * cfg.cluster.workers)

    def submit(study: _Study, stage: str, fut: PrefectFuture) -> None:
        running[fut] = (study, stage)

    def start(study: _Study) -> None:
        submit(study, "ingest", ingest.submit(study.plan, study.staging, config))

    def advance(study: _Study, stage: str) -> None:
        """Submit what ``stage``'s completion makes ready, or the report when nothing is left."""
        r, key = study.results, study.key
        if stage == "ingest":
            with _annotate(gpu):
                submit(study, "filter", filter_.submit(key, r["ingest"], study.staging, config))
                submit(study, "infer", infer.submit(key, r["ingest"], study.staging, config))
        elif stage == "filter":
            with _annotate(gpu):
                submit(study, "segment", segment.submit(key, r["filter"], r["ingest"], study.staging, config))
        if stage != "report" and not study.outstanding(running):
            prov = {**provenance, "input_fingerprint": study.fingerprint}
            submit(study, "report", finish_study.submit(key, study.plan, r, study.errors, study.staging,
                                                        out, prov, config))

    while waiting and len({s for s, _ in running.values()}) < window:
        start(waiting.pop())
    while running:
        fut = next(as_completed(list(running)))
        study, stage = running.pop(fut)
        fut.wait()  # the final state comes with the Dask result; the API may still say RUNNING
        state = fut.state
        if stage == "report":
            entry = fut.result() if state.is_completed() else _report_failed(study, state, layout)
            entries.append(entry)
            progress.emit("study", entry)
            reported += 1
            if bar is not None:
                update_progress_artifact(bar, 100.0 * reported / len(todo))
            if waiting:
                start(waiting.pop())
            continue
        if state.is_completed():
            study.results[stage] = fut.result()
        else:
            study.errors[stage] = _error_text(state)
            logging.getLogger("medpipe").warning("study %s: %s failed: %s", study.key, stage, study.errors[stage])
        advance(study, stage if state.is_completed() else "failed")
    return sorted(entries, key=lambda e: e["study_key"])


class _Study:
    """One study's progress through the stages of a run."""

    def __init__(self, plan: dict[str, Any], staging: str, fingerprint: str):
        self.plan, self.staging, self.fingerprint = plan, staging, fingerprint
        self.key: str = plan["study_key"]
        self.results: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}

    def outstanding(self, running: dict[PrefectFuture, tuple["_Study", str]]) -> bool:
        return any(s is self for s, _ in running.values())


def _entry(plan: dict[str, Any], layout: OutputLayout, status: str, *, error: str | None = None,
           reason: str | None = None) -> dict[str, Any]:
    """A run.json study entry for a study with no report of this run (skipped, or report failed)."""
    key = plan["study_key"]
    exists = (layout.study(key) / "report.json").is_file()
    entry = {"study_key": key, "status": status, "error": error, "output": f"studies/{key}" if exists else None,
             "modality": plan.get("modality"), "seconds": 0.0, "findings": None}
    return {**entry, "reason": reason} if reason else entry


def _report_failed(study: _Study, state: Any, layout: OutputLayout) -> dict[str, Any]:
    errors = "; ".join(f"{k}: {v}" for k, v in study.errors.items())
    return _entry(study.plan, layout, "failed", error=f"{errors + '; ' if errors else ''}report: {_error_text(state)}")


def _error_text(state: Any) -> str:
    try:
        state.result()
    except Exception as exc:  # the exception a failed task raised, with its message
        return f"{type(exc).__name__}: {exc}"
    return state.message or state.name


def _annotate(annotations: dict[str, Any]) -> AbstractContextManager:
    """``dask.annotate`` where there is something to annotate (GPU resources), else nothing."""
    if not annotations:
        return nullcontext()
    import dask

    return dask.annotate(**annotations)


def _prefect_ids() -> dict[str, Any]:
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return {}
    return {"flow_run_id": str(ctx.flow_run.id), "flow_run_name": ctx.flow_run.name}


def _dashboard_link(logger: Any) -> str | None:
    """Print the Dask dashboard address and link it from the flow run."""
    ctx = FlowRunContext.get()
    # `.client` starts the runner's Dask client now; `_client` is still None before the first submit.
    client = getattr(getattr(ctx, "task_runner", None), "client", None)
    link = getattr(client, "dashboard_link", None)
    if link:
        logger.info("Dask dashboard: %s", link)
        create_link_artifact(link, link_text="Dask dashboard", description="Dask dashboard of this run")
    return link
