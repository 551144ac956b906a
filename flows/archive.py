"""The archive flow: discover studies, then per study ingest, filter, segment, infer and report.

``process_archive`` is what deployments and the CLI run. It reads the configuration and starts
``run_pipeline`` on the Dask cluster that the configuration (or the run's parameters) names, so
a run triggered from the Prefect UI can choose its archive, output, configuration and cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture

from medpipe import __version__
from medpipe.config import Config, deep_merge
from medpipe.outputs import (
    STATUSES,
    OutputLayout,
    OutputLockedError,
    clean_work,
    input_fingerprint,
    new_run_id,
    now_iso,
    run_lock,
    versions,
)
from medpipe.privacy import PathRedactor, append_log
from medpipe.publish import already_published, close_gate, published_fingerprint
from medpipe.report import key_findings, run_markdown, run_table
from medpipe.report.run import write_run_record
from tasks import study as stages
from tasks.model import check_model
from tasks.report import finish_study

from . import progress
from .cluster import gpu_annotations, task_runner
from .stopping import RunInterrupted, StopRequest

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
    if workers is not None:
        overrides.setdefault("cluster", {})["workers"] = workers
    cfg = Config.load(config_file, overrides=deep_merge(config or {}, overrides))
    from medpipe.access import check_out_folder  # refuse outputs outside the allowed roots
    check_out_folder(out, cfg.run.allowed_out_roots)
    pipeline = run_pipeline.with_options(task_runner=task_runner(cfg.cluster))
    try:
        return pipeline(archive=str(Path(archive).resolve()), out=str(Path(out).resolve()),
                        config=cfg.model_dump(mode="json"))
    finally:
        _sweep_work(Path(out).resolve())


def _sweep_work(out: Path) -> None:
    """Remove staging that a task still running when the run ended wrote before the cluster closed."""
    try:
        with run_lock(out):
            clean_work(out)
    except (OutputLockedError, OSError):  # another run has started: its own start cleans up
        pass


@flow(name="medpipe-pipeline")
def run_pipeline(archive: str, out: str, config: dict[str, Any]) -> dict[str, Any]:
    """Run every study of the archive on this flow's Dask cluster and write run.json.

    run.json is written when the run starts (status ``running``) and again when it ends, however
    it ends: ``completed``, ``failed`` (with ``error``) or ``interrupted`` (SIGTERM/SIGINT,
    then :class:`~flows.stopping.RunInterrupted` is raised after the record is written).
    """
    cfg = Config.model_validate(config)
    logger = get_run_logger()
    if not Path(archive).is_dir():
        raise FileNotFoundError(f"{archive}: archive folder not found")
    layout = OutputLayout(Path(out))
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
        "counts": {},
        "studies": [],
        "issues": [],
    }
    progress.emit("cluster", run["dask"])
    stop = StopRequest()
    with run_lock(Path(out)), stop.installed():
        clean_work(Path(out))
        gate = layout.work / run_id
        redactor = PathRedactor(b"", archive)  # replaced by the keyed one below; a full disk may refuse the key
        private: list[dict[str, Any]] = []
        write_run_record(out, run)  # from now on, run.json is this run's (also on a full disk)
        try:
            gate.mkdir(parents=True, exist_ok=True)
            redactor = PathRedactor.for_output(out, archive)
            model = check_model.submit(config).result() if cfg.model.enabled else None
            run["model"] = model
            found = stages.discover.submit(archive, config).result()
            for issue in found["issues"]:
                public, secret = redactor.issue(issue)
                run["issues"].append(public)
                private.append(secret)
            _drive(found["plans"], run, out, cfg, model, stop, redactor, private)
            run["status"] = "interrupted" if stop else "completed"
        except Exception as exc:
            run["status"], run["error"] = "failed", redactor.text(f"{type(exc).__name__}: {exc}")
            raise
        except KeyboardInterrupt:
            run["status"], run["error"] = "interrupted", "stopped at once by a second signal"
            raise
        finally:
            close_gate(gate, remove=True)  # nothing of this run is published after this point
            run["finished"] = now_iso()
            run["seconds"] = round(time.perf_counter() - t0, 2)
            run["studies"].sort(key=lambda e: e["study_key"])
            run["counts"] = {s: sum(1 for st in run["studies"] if st["status"] == s) for s in STATUSES}
            _record_run(out, run, private)
            # Keep this run's closed gate until its cluster is gone (tasks may still be running);
            # process_archive sweeps the rest then.
            clean_work(Path(out), keep_run=run_id)
            progress.emit("finished", run)
    if stop:
        raise RunInterrupted(stop.signum)
    return run


def _record_run(out: str, run: dict[str, Any], private: list[dict[str, Any]]) -> None:
    """Write run.json, run.html, the operator's log and the Prefect artifacts; never raise."""
    problems = write_run_record(out, run)
    for p in problems:
        log.error("run record: %s", p)
    try:  # a file of a processed study is named by discovery and by its study's report: once here
        append_log(out, run["run_id"], list({(e["file_id"], e["reason"]): e for e in private}.values()))
    except OSError as exc:
        log.error("operator's log %s: %s", Path(out) / "private", exc)
    try:
        create_markdown_artifact(run_markdown(run), key="medpipe-run-summary", description="medpipe run summary")
        create_table_artifact(run_table(run), key="medpipe-studies", description="Studies of this run")
    except Exception as exc:  # the files are the record; the UI's copy may fail with the API
        log.warning("run summary artifacts not created: %s", exc)


def _drive(plans: list[dict[str, Any]], run: dict[str, Any], out: str, cfg: Config,
           model: dict[str, Any] | None, stop: StopRequest, redactor: PathRedactor,
           private: list[dict[str, Any]]) -> None:
    """Submit each study's stages as their inputs complete; add its entry to ``run["studies"]``.

    ingest -> filter -> segment, and ingest -> infer, then report. A failed stage stops only its
    own study's dependent stages; the study is then reported with what it has and the error.
    A window of studies is in flight at a time, which bounds staging disk and scheduler load.
    When ``stop`` is set, no stage is submitted any more and the studies not finished are
    recorded as ``interrupted`` (or ``ok`` where this run had already published them).
    """
    run_id, entries = run["run_id"], run["studies"]
    layout = OutputLayout(Path(out))
    config = cfg.model_dump(mode="json")

    def record(entry: dict[str, Any]) -> None:
        private.extend(entry.pop("private_issues", None) or [])
        entry = redactor.deep(entry)
        entries.append(entry)
        progress.emit("study", entry)

    todo: list[_Study] = []
    for plan in plans:
        key = plan["study_key"]
        fp = input_fingerprint(plan.get("fingerprint", ""), cfg.fingerprint(), _models_fingerprint(model))
        if plan.get("skip_reason"):
            record(_entry(plan, layout, "skipped", reason=plan["skip_reason"]))
            continue
        done, damage = published_fingerprint(layout.study(key))
        if not cfg.run.force and done == fp:
            record(_entry(plan, layout, "skipped", reason="unchanged since its last successful run"))
            continue
        if damage:
            log.warning("study %s: published outputs damaged (%s); redoing it", key, "; ".join(damage))
        todo.append(_Study(plan, str(layout.staging(run_id, key)), fp))
    progress.emit("planned", {"total": len(plans), "to_process": len(todo)})

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
    finished: queue.Queue[PrefectFuture] = queue.Queue()
    reported = 0
    waiting = list(reversed(todo))
    window = max(4, 2 * cfg.cluster.workers)

    def submit(study: _Study, stage: str, fut: PrefectFuture) -> None:
        running[fut] = (study, stage)
        fut.add_done_callback(finished.put)

    def start(study: _Study) -> None:
        submit(study, "ingest", ingest.submit(study.plan, study.staging, config))

    def advance(study: _Study, stage: str) -> None:
        """Submit what ``stage``'s completion makes ready, or the report when nothing is left."""
        r, key = study.results, study.key
        if stage == "ingest":
            from medpipe.inference.domain import Facts
            from medpipe.inference.stage import plan_models

            facts = Facts.from_plan(study.plan).to_dict()
            try:
                planned = plan_models(cfg, facts)
            except Exception as exc:  # a model gone since the run's check: this study's failure only
                study.errors["infer"] = f"{type(exc).__name__}: {exc}"
                planned = []
            with _annotate(gpu):
                submit(study, "filter", filter_.submit(key, r["ingest"], study.staging, config))
                # One infer task per model whose domain the study is in; the others are reported
                # as not applicable, with the reason, without a task. A disabled model keeps its
                # (instant) task, as before domains, so runs look the same with inference off.
                for m in planned:
                    if m["applicable"] or not m["enabled"]:
                        submit(study, f"infer:{m['name']}",
                               infer.submit(key, r["ingest"], study.staging, config, m["name"], facts))
                    else:
                        r[f"infer:{m['name']}"] = m["result"]
        elif stage == "filter":
            with _annotate(gpu):
                submit(study, "segment", segment.submit(key, r["filter"], r["ingest"], study.staging, config))
        if stage != "report" and not study.outstanding(running):
            prov = {**provenance, "input_fingerprint": study.fingerprint}
            submit(study, "report", finish_study.submit(key, study.plan, r, study.errors, study.staging,
                                                        out, prov, config, run["parameters"]["archive"]))

    while waiting and not stop and len({s for s, _ in running.values()}) < window:
        start(waiting.pop())
    while running and not stop:
        try:
            fut = finished.get(timeout=0.5)
        except queue.Empty:
            continue
        if fut not in running:
            continue
        study, stage = running.pop(fut)
        fut.wait()  # the final state comes with the Dask result; the API may still say RUNNING
        state = fut.state
        if stage == "report":
            from medpipe.report.record import model_outcomes, with_infer_timing

            entry = fut.result() if state.is_completed() else _report_failed(study, state, layout)
            outcomes = model_outcomes(study.results, study.errors)
            if outcomes:  # each model's label and score, or why it did not apply
                entry["models"] = outcomes
            if isinstance(entry.get("timings"), dict):
                entry["timings"] = with_infer_timing(entry["timings"])
            record(entry)
            reported += 1
            if bar is not None:
                update_progress_artifact(bar, 100.0 * reported / len(todo))
            if waiting and not stop:
                start(waiting.pop())
            continue
        if state.is_completed():
            study.results[stage] = fut.result()
        else:
            study.errors[stage] = _error_text(state)
            log.warning("study %s: %s failed: %s", study.key, stage, redactor.text(study.errors[stage]))
        if not stop:
            advance(study, stage if state.is_completed() else "failed")
    if stop:
        close_gate(layout.work / run_id)
        in_flight = {s.key: s for s, _ in running.values()}
        for study in [*in_flight.values(), *waiting]:
            record(_interrupted(study, layout, started=study.key in in_flight))


def _models_fingerprint(model: dict[str, Any] | None) -> str | None:
    """What a study's results depend on of the models: each one's file and domain (its card may
    change what it applies to without a new file)."""
    if not model:
        return None
    parts = [(m.get("sha256"), m.get("domain")) for m in model.get("models") or [model]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


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


def _interrupted(study: _Study, layout: OutputLayout, *, started: bool) -> dict[str, Any]:
    """The entry of a study the stop caught: ``ok`` if this run published it, else ``interrupted``."""
    doc = already_published(layout.study(study.key), study.fingerprint)
    if doc is not None:
        entry = _entry(study.plan, layout, doc["status"], error=doc.get("error"))
        return {**entry, "findings": key_findings(doc)}
    reason = "the run was stopped while it was processed" if started else "the run was stopped before it started"
    return _entry(study.plan, layout, "interrupted", reason=reason)


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
