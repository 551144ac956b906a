"""The archive flow: discover studies, decide which to process, then one task per study.

The flow plans (discovery, and the skip decision from each study's input fingerprint), runs
one ``process_study`` task per study to do (:func:`medpipe.study.process_study`: ingest,
filter, segment, infer, report and publish, each stage's failure reported in the study's
entry) with a bounded number in flight (``run.max_studies_in_flight``), and writes the run
record. ``process_archive`` is what deployments and the CLI run. It reads the configuration and starts
``run_pipeline`` on the Dask cluster that the configuration (or the run's parameters) names, so
a run triggered from the Prefect UI can choose its archive, output, configuration and cluster.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Callable
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
    OutputLayout,
    OutputLockedError,
    clean_work,
    input_fingerprint,
    now_iso,
    run_lock,
    versions,
)
from medpipe.privacy import PathRedactor
from medpipe.publish import close_gate, published_fingerprint
from medpipe.report import run_markdown, run_table
from medpipe.report.run import write_run_record
from tasks import pacs as pacs_tasks
from tasks import study as stages
from medpipe.run_plan import (
    ToDo, add_file_issues, count, decide, models_fingerprint, models_identity, run_record, write_record,
)
from medpipe.study import StudyEntry, entry_for, published_entry, run_window
from tasks.model import check_model

from . import progress
from .cluster import gpu_annotations, task_runner
from .stopping import RunInterrupted, StopRequest

log = logging.getLogger("medpipe")


@flow(name="medpipe-archive", log_prints=True)
def process_archive(
    archive: str | None = None,
    out: str = "",
    config: dict[str, Any] | None = None,
    config_file: str | None = None,
    force: bool = False,
    dask_address: str | None = None,
    workers: int | None = None,
    source: str | None = None,
    send: list[str] | None = None,
    since: str | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """Process every study of ``archive`` (a folder or a PACS) into ``out``; return the run record (run.json).

    Parameters
    ----------
    archive, out : str
        The source to read (a folder, or a PACS address: ``dicomweb+http(s)://HOST:PORT/PATH``
        or ``dimse://AET@HOST:PORT``, see docs/pacs.md) and the output folder to write.
    source : str, optional
        The same as ``archive`` (a folder or a PACS address); when given it wins. A custom run from
        the UI names its PACS here.
    send : list of str, optional
        PACS addresses that receive each processed study's SEG, SR and report image (through the
        outbox in ``OUT/private/outbox``); replaces ``send.destinations`` of the configuration.
    since, until : str, optional
        ``YYYY-MM-DD``: the window of a PACS run (a backfill), overriding the watermark.
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
    from medpipe.pacs import PacsAddress

    archive = source or archive
    if not archive or not out:
        raise ValueError("process_archive: give `out`, and `archive` or `source` (a folder or a PACS address)")
    overrides: dict[str, Any] = {}
    if PacsAddress.is_pacs(archive):
        overrides["source"] = {"url": archive}
    for name, value in (("since", since), ("until", until)):
        if value:
            overrides.setdefault("source", {})[name] = value
    if send is not None:
        overrides["send"] = {"destinations": list(send)}
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
    where = archive if PacsAddress.is_pacs(archive) else str(Path(archive).resolve())
    try:
        return pipeline(archive=where, out=str(Path(out).resolve()), config=cfg.model_dump(mode="json"))
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
    from medpipe.pacs import PacsAddress

    cfg = Config.model_validate(config)
    logger = get_run_logger()
    pacs = PacsAddress.is_pacs(archive)
    if not pacs and not Path(archive).is_dir():
        raise FileNotFoundError(f"{archive}: archive folder not found")
    layout = OutputLayout(Path(out))
    t0 = time.perf_counter()
    run = run_record(archive, out, cfg)
    run_id = run["run_id"]
    run["prefect"], run["dask"] = _prefect_ids(), {"dashboard": _dashboard_link(logger)}
    progress.emit("cluster", run["dask"])
    stop = StopRequest()
    with run_lock(Path(out)), stop.installed():
        clean_work(Path(out))
        gate = layout.work / run_id
        # The paths of a PACS study are those of its retrieved files, under the cache.
        files_root = str(pacs_tasks.cache_root(cfg, out)) if pacs else archive
        redactor = PathRedactor(b"", files_root)  # replaced by the keyed one below; a full disk may refuse the key
        private: list[dict[str, Any]] = []
        write_run_record(out, run)  # from now on, run.json is this run's (also on a full disk)
        try:
            gate.mkdir(parents=True, exist_ok=True)
            redactor = PathRedactor.for_output(out, files_root)
            # The skip decision needs the models' identities, not TensorFlow: a night with
            # nothing new never loads a model. The full check runs once before the first study.
            model = models_identity(cfg)
            run["model"] = model
            record = _recorder(run["studies"], redactor, private)
            if pacs:
                pacs_plan, plans = _plan_pacs(config, out, cfg, model, layout, run, record)
            else:
                found = stages.discover.submit(archive, config, out).result()
                add_file_issues(run, private, found["issues"], redactor)
                plans = found["plans"]
            todo, skipped = decide(plans, layout, cfg, model)
            if todo and cfg.model.enabled:  # a bad model file stops the run before any study starts
                run["model"] = check_model(config)
            for entry in skipped:
                record(entry)
            progress.emit("planned", {"total": len(plans), "to_process": len(todo)})
            _process(todo, run, out, cfg, stop, gate, record, files_root)
            if cfg.send.destinations and not stop:
                # Also what earlier runs left in the outboxes; a destination that is down keeps it.
                run["outbox"] = pacs_tasks.deliver_outboxes(config, out)
            if pacs and not stop:
                _commit_window(out, pacs_plan, run)
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
            count(run)
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
    write_record(out, run, private)
    try:
        create_markdown_artifact(run_markdown(run), key="medpipe-run-summary", description="medpipe run summary")
        create_table_artifact(run_table(run), key="medpipe-studies", description="Studies of this run")
    except Exception as exc:  # the files are the record; the UI's copy may fail with the API
        log.warning("run summary artifacts not created: %s", exc)


def _recorder(entries: list[dict[str, Any]], redactor: PathRedactor,
              private: list[dict[str, Any]]) -> Callable[[StudyEntry], None]:
    """``record(entry)``: add a study's entry to the run (paths redacted), its file problems to
    the operator's log, and tell the progress listeners."""
    def record(entry: StudyEntry) -> None:
        private.extend(entry.private_issues)
        d = redactor.deep(entry.to_dict())
        entries.append(d)
        progress.emit("study", d)
    return record


def window_size(cfg: Config) -> int:
    """Studies in flight at a time: ``run.max_studies_in_flight``, else two per worker (one
    computing while the other waits on its chunk work or writes its report)."""
    return cfg.run.max_studies_in_flight or 2 * cfg.cluster.workers


def _plan_pacs(config: dict[str, Any], out: str, cfg: Config, model: dict[str, Any] | None, layout: OutputLayout,
               run: dict[str, Any], record: Callable[[StudyEntry], None]) -> tuple[Any, list[dict[str, Any]]]:
    """Plan the run from the PACS (queries only): record the window in ``run["source"]`` and the
    studies deferred or skipped at planning; return the plan and the study plans to fetch."""
    from medpipe.pacs import PacsAddress

    address = PacsAddress.parse(cfg.source.url or "")
    models = models_fingerprint(model)

    def is_done(key: str, fingerprint: str) -> bool:  # published with these inputs: not counted against the cap
        done, _ = published_fingerprint(layout.study(key))
        return not cfg.run.force and done == input_fingerprint(fingerprint, cfg.fingerprint(), models)

    t0 = time.perf_counter()
    pacs_plan = pacs_tasks.plan(config, out, is_done)
    run["source"] = {"kind": address.kind, "address": address.redacted(), "window": dict(pacs_plan.window),
                     "deferred": len(pacs_plan.deferred), "committed": False,
                     "plan_seconds": round(time.perf_counter() - t0, 3)}
    for d in pacs_plan.deferred:
        record(entry_for(d, out, "deferred", reason=d["reason"]))
    for d in pacs_plan.skipped:
        record(entry_for(d, out, "skipped", reason=d["reason"]))
    return pacs_plan, pacs_plan.plans


def _commit_window(out: str, pacs_plan: Any, run: dict[str, Any]) -> None:
    """Store the source's watermark and state: the run completed. Studies deferred or failed while
    fetching are queried again by the next run whatever its window."""
    from medpipe.pacs.plan import commit_window

    again = [e["study_key"] for e in run["studies"] if e["status"] in ("deferred", "failed", "interrupted")]
    commit_window(Path(out), pacs_plan, deferred=again)
    run["source"]["committed"] = True


def _process(todo: list[ToDo], run: dict[str, Any], out: str, cfg: Config, stop: StopRequest, gate: Path,
             record: Callable[[StudyEntry], None], files_root: str) -> None:
    """One ``process_study`` task per study, ``window_size`` in flight; record each entry.

    When ``stop`` is set no study starts any more, and those not finished are recorded as
    ``interrupted`` (or ``ok`` where this run had already published them).
    """
    run_id, config = run["run_id"], cfg.model_dump(mode="json")
    layout = OutputLayout(Path(out))
    # Transient failures (a lost worker, a storage hiccup) are retried with exponential backoff;
    # a stage's own transient failures are retried inside the study (medpipe.study).
    backoff = [cfg.run.retry_delay_s * 2**i for i in range(cfg.run.retries)] or None
    task = stages.process_study.with_options(retries=cfg.run.retries, retry_delay_seconds=backoff,
                                             timeout_seconds=cfg.run.study_timeout_s)
    gpu = gpu_annotations(cfg.cluster)
    provenance = {"medpipe_version": __version__, "run_id": run_id, "config": config,
                  "config_fingerprint": cfg.fingerprint(), "versions": versions()}
    bar = create_progress_artifact(0.0, key="medpipe-progress", description="Studies finished") if todo else None
    reported = 0

    def submit(study: ToDo) -> PrefectFuture:
        key = study.plan["study_key"]
        with _annotate(gpu):
            return task.submit(study.plan, str(layout.staging(run_id, key)), out, config,
                               {**provenance, "input_fingerprint": study.fingerprint}, files_root, str(gate))

    def done(study: ToDo, fut: PrefectFuture) -> None:
        nonlocal reported
        fut.wait()  # the final state comes with the Dask result; the API may still say RUNNING
        state = fut.state
        if state.is_completed():
            entry = fut.result()
        else:  # the task itself failed (not a stage: those are in its entry)
            entry = published_entry(study.plan, out, study.fingerprint, run_id) or \
                entry_for(study.plan, out, "failed", error=f"study: {_error_text(state)}")
        record(entry)
        reported += 1
        if bar is not None:
            update_progress_artifact(bar, 100.0 * reported / len(todo))

    left = run_window(todo, submit, done, window_size(cfg), stopped=lambda: bool(stop))
    if stop:
        close_gate(gate)
        for study in left.in_flight:
            record(_interrupted(study, out, started=True))
        for study in left.waiting:
            record(_interrupted(study, out, started=False))


def _interrupted(study: ToDo, out: str, *, started: bool) -> StudyEntry:
    """The entry of a study the stop caught: ``ok`` if this run published it, else ``interrupted``."""
    entry = published_entry(study.plan, out, study.fingerprint)
    if entry is not None:
        return entry
    reason = "the run was stopped while it was processed" if started else "the run was stopped before it started"
    return entry_for(study.plan, out, "interrupted", reason=reason)


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
