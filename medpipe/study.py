"""One study, start to finish: the unit of work of a run.

:func:`process_study` runs a study's stages in the calling process: (fetch ->) ingest, then
filter -> segment and beside them infer (one per model whose domain the study is in, in a thread
of its own), then the report, which is written, verified and published. It returns a :class:`StudyEntry`, the study's line of
``run.json``. A stage's failure is data in that entry (``status`` failed, the error naming the
stage), never an exception: every study that starts gets a report, and a failed result never
replaces an intact published good one. Only a closed publishing gate (the run is stopping,
:class:`~medpipe.publish.GateClosed`) is raised.

:func:`run_window` keeps a bounded number of studies in flight on any executor whose futures
have ``add_done_callback``, and stops starting new ones when asked to.

This module knows nothing of Prefect or Dask: progress reaches whoever runs it through the
``progress`` hook, and the caller makes its cluster the default Dask scheduler.

>>> entry = process_study(plan, StudyContext(staging, out, cfg, provenance, archive))  # doctest: +SKIP
>>> entry.status, entry.timings                                                         # doctest: +SKIP
('ok', {'ingest': 0.4, 'filter': 1.2, 'segment': 2.0, 'infer:model': 0.8, 'report': 1.1, 'infer': 0.8})
"""

from __future__ import annotations

import contextvars
import logging
import queue
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from .atomic import write_json
from .config import Config
from .errors import InputError, ModelError, StudyError
from .ingest import StudyPlan
from .privacy import PathRedactor
from .publish import GateClosed, already_published, publish_study, published_fingerprint

log = logging.getLogger("medpipe")

ProgressHook = Callable[[str, str, dict[str, Any]], None]
"""``progress(stage, event, info)``: event ``start`` (info ``{"study_key"}``) or ``end`` (info
``{"study_key", "seconds", "error"}``, error None when the stage succeeded)."""

Fetch = Callable[[StudyPlan, Path], StudyPlan]
"""``fetch(plan, folder)``: bring the study's files into ``folder``; return the plan to ingest."""


# --------------------------------------------------------------------------- results
@dataclass
class StageResult:
    """What one stage of a study produced: its JSON-safe ``value``, or the ``error`` that ended it."""

    name: str
    seconds: float = 0.0
    value: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class StudyEntry:
    """A study's entry of ``run.json`` (:meth:`to_dict`), with what is not part of it beside.

    ``private_issues`` (file problems with their paths, for the operator's log) and ``stages``
    (this run's stage results) never reach run.json. Optional fields absent from an entry today
    (``reason``, ``previous_output_kept``, ``timings``, ``files``, ``models``) are left out of
    :meth:`to_dict` when unset, so the entries of skipped and processed studies keep their shapes.
    """

    study_key: str
    status: str
    error: str | None = None
    reason: str | None = None
    output: str | None = None
    previous_output_kept: bool | None = None
    modality: str | None = None
    seconds: float = 0.0
    timings: dict[str, float] | None = None
    findings: str | None = None
    files: list[str] | None = None
    models: dict[str, dict[str, Any]] | None = None
    private_issues: list[dict[str, Any]] = field(default_factory=list)
    stages: list[StageResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The run.json entry (docs/output-contract.md)."""
        d: dict[str, Any] = {"study_key": self.study_key, "status": self.status, "error": self.error,
                             "output": self.output}
        if self.previous_output_kept is not None:
            d["previous_output_kept"] = self.previous_output_kept
        d |= {"modality": self.modality, "seconds": self.seconds}
        if self.timings is not None:
            d["timings"] = dict(self.timings)
        d["findings"] = self.findings
        if self.files is not None:
            d["files"] = list(self.files)
        if self.models:
            d["models"] = self.models
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass
class StudyContext:
    """Where and how a study is processed.

    ``staging`` is the study's folder under the run's work folder (``gate``, see
    :func:`medpipe.publish.publish_study`); ``provenance`` holds ``run_id`` and
    ``input_fingerprint`` besides the versions and configuration written into the report.
    """

    staging: Path
    out: Path
    cfg: Config
    provenance: dict[str, Any]
    archive: str
    gate: Path | None = None

    @property
    def final(self) -> Path:
        return Path(self.out) / "studies" / Path(self.staging).name

    @property
    def fingerprint(self) -> str:
        return str(self.provenance["input_fingerprint"])


def entry_for(plan: StudyPlan | dict[str, Any], out: str | Path, status: str, *, error: str | None = None,
              reason: str | None = None) -> StudyEntry:
    """The entry of a study with no report of this run (skipped, interrupted, lost)."""
    plan = _plan_dict(plan)
    key = plan["study_key"]
    exists = (Path(out) / "studies" / key / "report.json").is_file()
    return StudyEntry(study_key=key, status=status, error=error, reason=reason,
                      output=f"studies/{key}" if exists else None, modality=plan.get("modality"))


def published_entry(plan: StudyPlan | dict[str, Any], out: str | Path, fingerprint: str,
                    run_id: str | None = None) -> StudyEntry | None:
    """The entry of a study whose result for ``fingerprint`` is published intact (by run ``run_id``
    when given), else None: what a stopped run or a retried study reports for it."""
    from .report import key_findings

    key = _plan_dict(plan)["study_key"]
    doc = already_published(Path(out) / "studies" / key, fingerprint)
    if doc is None or (run_id is not None and (doc.get("provenance") or {}).get("run_id") != run_id):
        return None
    entry = entry_for(plan, out, doc["status"], error=doc.get("error"))
    entry.findings = key_findings(doc)
    return entry


# --------------------------------------------------------------------------- stages
def is_transient(exc: BaseException) -> bool:
    """Whether a failure may pass when tried again (a lost worker, an I/O hiccup), unlike bad
    input, a bad model or a bug in the arguments. PACS errors are not: the clients retry what
    may pass themselves, and an incomplete study is deferred, not fetched again at once."""
    from .pacs.client import PacsError

    return not isinstance(exc, (InputError, StudyError, ModelError, ValueError, TypeError, GateClosed, PacsError))


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Runner:
    """Runs one study's stages, timing each, retrying transient failures, telling ``progress``."""

    def __init__(self, key: str, cfg: Config, progress: ProgressHook | None, redactor: PathRedactor):
        self.key, self.cfg, self.progress, self.redactor = key, cfg, progress, redactor
        self.stages: list[StageResult] = []

    def _tell(self, stage: str, event: str, info: dict[str, Any]) -> None:
        if self.progress is None:
            return
        try:
            self.progress(stage, event, {"study_key": self.key, **info})
        except Exception:  # a broken display never breaks a study
            log.debug("progress hook failed", exc_info=True)

    def run(self, name: str, fn: Callable[[], Any]) -> StageResult:
        """Run ``fn`` as stage ``name``; its failure becomes the result's ``error``."""
        self._tell(name, "start", {})
        t0 = time.perf_counter()
        delays = [self.cfg.run.retry_delay_s * 2**i for i in range(self.cfg.run.retries)]
        while True:
            try:
                value = fn()
                result = StageResult(name, round(time.perf_counter() - t0, 3), value=value)
                break
            except GateClosed:
                raise
            except Exception as exc:
                if delays and is_transient(exc):  # a lost worker or storage hiccup may pass
                    log.warning("study %s: %s failed, retrying: %s", self.key, name,
                                self.redactor.text(_error_text(exc)))
                    time.sleep(delays.pop(0))
                    continue
                result = StageResult(name, round(time.perf_counter() - t0, 3), error=_error_text(exc))
                log.warning("study %s: %s failed: %s", self.key, name, self.redactor.text(result.error))
                break
        self.stages.append(result)
        self._tell(name, "end", {"seconds": result.seconds,
                                 "error": None if result.ok else self.redactor.text(result.error)})
        return result

    def add(self, result: StageResult) -> None:
        """A result known without running anything (a model that does not apply)."""
        self.stages.append(result)


def _timed(fn: Callable[..., dict[str, Any]], *args: Any) -> Callable[[], dict[str, Any]]:
    """``fn(*args)``'s result with its ``seconds`` (stage results carry their time, as reports read it)."""
    def call() -> dict[str, Any]:
        t0 = time.perf_counter()
        result = dict(fn(*args))
        result["seconds"] = round(time.perf_counter() - t0, 3)
        return result
    return call


def ingest_stage(plan: StudyPlan, staging: Path, cfg: Config) -> dict[str, Any]:
    """Stage ``ingest``: the plan's series into ``staging/image.zarr``."""
    from .ingest import ingest_study

    staging.mkdir(exist_ok=True)  # not parents: a missing work folder means the run is over
    return ingest_study(plan, staging, cfg.ingest)


def infer_stage(staging: Path, modality: str, cfg: Config, model: str, facts: dict[str, Any]) -> dict[str, Any]:
    """Stage ``infer:<model>``: one configured model over the study (nothing when it is disabled)."""
    from .inference.model import select_model
    from .inference.stage import infer_study

    if not select_model(cfg, model).enabled:
        why = "inference disabled in the configuration"
        return {"skipped": why, "applicable": False, "reason": why}
    return infer_study(staging, modality, cfg, model, facts)


def process_study(plan: StudyPlan | dict[str, Any], ctx: StudyContext, progress: ProgressHook | None = None,
                  fetch: Fetch | None = None) -> StudyEntry:
    """Run one study's stages and publish its report; return its run.json entry.

    Parameters
    ----------
    plan : StudyPlan or its dict
        The study as planned by discovery (``files`` to ingest, unless ``fetch`` brings them).
    ctx : StudyContext
        Staging folder, OUT, configuration, provenance, archive root and the run's gate.
    progress : callable, optional
        Told at each stage's start and end (:data:`ProgressHook`).
    fetch : callable, optional
        Runs first, as stage ``fetch``: brings the study's files into a folder of the run's work
        area (removed when the study is done) and returns the plan to ingest. When it raises
        :class:`~medpipe.pacs.client.IncompleteStudy` (a series still growing, or fewer
        instances arrived than the PACS listed) the study is ``deferred``: nothing is processed
        or published, and a later run takes it up.

    Returns
    -------
    StudyEntry
        ``failed`` with the error naming the stage(s) when one failed; the report is published
        anyway unless an intact good result of earlier runs is there (``previous_output_kept``).
        ``deferred`` with the ``reason`` when the fetch found the study incomplete.

    Raises
    ------
    GateClosed
        The run is stopping: nothing of this study was published.
    """
    t0 = time.perf_counter()
    plan = plan if isinstance(plan, StudyPlan) else StudyPlan.from_dict(plan)
    key, cfg, staging = plan.study_key, ctx.cfg, Path(ctx.staging)
    run_id = ctx.provenance.get("run_id")
    # A retried study (its worker was lost after it published) keeps what this run published.
    doc = already_published(ctx.final, ctx.fingerprint) if run_id else None
    if doc is not None and (doc.get("provenance") or {}).get("run_id") == run_id:
        return _reported(plan.to_dict(), doc, {}, kept_previous=False, record_time=0.0, private=[])
    if staging.exists():  # what a lost attempt left half-written
        shutil.rmtree(staging, ignore_errors=True)
    redactor = PathRedactor.for_output(ctx.out, ctx.archive)
    runner = _Runner(key, cfg, progress, redactor)
    fetched = staging.with_name(staging.name + ".fetch")
    try:
        if fetch is not None:
            incomplete: list[BaseException] = []
            got = runner.run("fetch", lambda: _fetch(fetch, plan, fetched, incomplete))
            if incomplete:  # never a partial series processed: the study waits for a later run
                return entry_for(plan, ctx.out, "deferred", reason=redactor.text(str(incomplete[0])))
            plan = got.value["plan"] if got.ok else plan
            ok = got.ok
        else:
            ok = True
        ingest = runner.run("ingest", _timed(ingest_stage, plan, staging, cfg)) if ok else None
        if ingest is not None and ingest.ok:
            _image_stages(runner, plan, staging, ingest.value["modality"], cfg)
        entry = report_study(plan, runner.stages, ctx, progress, redactor)
        if entry.timings:  # stages overlap (infer beside filter and segment): the study's wall time
            entry.seconds = round(time.perf_counter() - t0, 3)
        return entry
    finally:
        shutil.rmtree(fetched, ignore_errors=True)


def _image_stages(runner: _Runner, plan: StudyPlan, staging: Path, modality: str, cfg: Config) -> None:
    """filter -> segment, and beside them every model's ``infer`` (it reads only the ingested image).

    Inference runs in a thread of its own: filter and segment spend much of their time waiting
    on their chunk work on the cluster, and the model's start (its framework and weights) then
    costs no time of the study. Its results join the study's in a fixed order.
    """
    inferred = _Runner(runner.key, cfg, runner.progress, runner.redactor)
    with ThreadPoolExecutor(1, thread_name_prefix=f"infer-{runner.key}") as pool:
        infer = pool.submit(contextvars.copy_context().run, _infer_all, inferred, plan, staging, modality, cfg)
        try:
            filt = runner.run("filter", _timed(_ops("filter_study"), staging, modality, cfg))
            if filt.ok:
                runner.run("segment", _timed(_ops("segment_study"), staging, modality, cfg))
        finally:
            infer.result()  # also when filter or segment raised: never a thread left behind
    runner.stages.extend(inferred.stages)


def _fetch(fetch: Fetch, plan: StudyPlan, folder: Path, incomplete: list[BaseException]) -> dict[str, Any]:
    from .pacs.client import IncompleteStudy

    folder.mkdir(exist_ok=True)
    try:
        got = fetch(plan, folder)
    except IncompleteStudy as exc:
        incomplete.append(exc)
        raise
    if not isinstance(got, StudyPlan):
        raise TypeError(f"study {plan.study_key}: fetch returned {type(got).__name__}, not a StudyPlan")
    return {"plan": got}


def _ops(name: str) -> Callable[..., dict[str, Any]]:
    from .ops import stage

    return getattr(stage, name)


def _infer_all(runner: _Runner, plan: StudyPlan, staging: Path, modality: str, cfg: Config) -> None:
    """One ``infer:<model>`` stage per model whose domain holds the study; the others are
    results without a run (not applicable, and why). A disabled model keeps its (instant)
    stage, so runs look the same with inference off."""
    from .inference.domain import Facts
    from .inference.stage import plan_models

    facts = Facts.from_plan(plan).to_dict()
    try:
        planned = plan_models(cfg, facts)
    except Exception as exc:  # a model gone since the run's check: this study's failure only
        runner.add(StageResult("infer", error=_error_text(exc)))
        return
    for m in planned:
        name = f"infer:{m['name']}"
        if m["applicable"] or not m["enabled"]:
            runner.run(name, _timed(infer_stage, staging, modality, cfg, m["name"], facts))
        else:
            runner.add(StageResult(name, value=m["result"]))


# --------------------------------------------------------------------------- report and publish
def report_study(plan: StudyPlan | dict[str, Any], stages: list[StageResult], ctx: StudyContext,
                 progress: ProgressHook | None = None, redactor: PathRedactor | None = None) -> StudyEntry:
    """Stage ``report``: write the study's reports into its staging folder and publish it.

    ``stages`` are the results of the stages before it, failed ones included. Only a complete,
    verified folder is published (:mod:`medpipe.publish`), through the run's gate, and a failed
    result never replaces an intact successful one. Paths of archive files are replaced by
    tokens (:mod:`medpipe.privacy`); the entry's ``private_issues`` carries them for the
    operator's log.
    """
    from .report.record import model_outcomes, with_infer_timing

    plan_d = _plan_dict(plan)
    redactor = redactor or PathRedactor.for_output(ctx.out, ctx.archive)
    runner = _Runner(plan_d["study_key"], ctx.cfg, progress, redactor)
    results = {s.name: s.value for s in stages if s.ok and s.name != "fetch"}
    errors = {s.name: s.error for s in stages if not s.ok}
    timings = {name: float(v.get("seconds", 0.0)) for name, v in results.items() if isinstance(v, dict)}
    timings |= {s.name: s.seconds for s in stages if s.ok and s.name == "fetch"}
    box: dict[str, StudyEntry] = {}

    def report() -> dict[str, Any]:
        box["entry"] = _report(plan_d, results, errors, timings, ctx, redactor)
        return {}

    rep = runner.run("report", report)
    if rep.ok:
        entry = box["entry"]
    else:  # not published: what earlier runs published stays, and the run says why
        done = "; ".join(f"{k}: {v}" for k, v in errors.items())
        entry = entry_for(plan_d, ctx.out, "failed", error=f"{done + '; ' if done else ''}report: {rep.error}")
    outcomes = model_outcomes(results, errors)
    if outcomes:  # each model's label and score, or why it did not apply
        entry.models = outcomes
    if entry.timings is not None:
        entry.timings = with_infer_timing(entry.timings)
    entry.stages = [*stages, rep]
    return entry


def _report(plan: dict[str, Any], results: dict[str, Any], errors: dict[str, str], timings: dict[str, float],
            ctx: StudyContext, redactor: PathRedactor) -> StudyEntry:
    from .report import assemble_record

    t0 = time.perf_counter()
    key, staging, final = plan["study_key"], Path(ctx.staging), ctx.final
    if not staging.is_dir():
        doc = already_published(final, ctx.fingerprint)
        if doc is None:
            raise StudyError(key, "its staging folder is gone (a lost worker or a stopped run); "
                                  "nothing was published")
        return _reported(plan, doc, timings, kept_previous=False, record_time=0.0, private=[])
    error = "; ".join(f"{stage}: {msg}" for stage, msg in errors.items()) or None
    record = assemble_record(key, {"plan": plan, **results}, timings, ctx.provenance, error=error)
    private = [redactor.issue(i)[1] | {"study_key": key} for i in record.get("issues") or []]
    record = redactor.deep(record, known=plan.get("files") or ())
    record = write_report(staging, record, ctx.cfg, plan.get("files") or None, error)
    record_time = round(time.perf_counter() - t0, 3)
    kept_previous = record["status"] != "ok" and published_fingerprint(final)[0] is not None
    if not kept_previous:
        keep = ("filtered.zarr",) if ctx.cfg.run.keep_intermediates else ()
        publish_study(staging, final, keep=keep, gate=ctx.gate)
    return _reported(plan, record, timings, kept_previous=kept_previous, record_time=record_time,
                     private=private)


def write_report(staging: Path, record: dict[str, Any], cfg: Config, source_files: list[str] | None,
                 error: str | None) -> dict[str, Any]:
    """Write the report files; a successful record whose folder is incomplete becomes a failed one."""
    from .publish import verify_study
    from .report import write_study_report

    try:
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


def _reported(plan: dict[str, Any], record: dict[str, Any], timings: dict[str, float], *, kept_previous: bool,
              record_time: float, private: list[dict[str, Any]]) -> StudyEntry:
    """The run.json entry of a reported study."""
    from .report import key_findings

    key = plan["study_key"]
    return StudyEntry(
        study_key=key, status=record["status"], error=record.get("error"), output=f"studies/{key}",
        previous_output_kept=kept_previous, modality=plan.get("modality"),
        seconds=round(sum(timings.values()) + record_time, 3), timings={**timings, "report": record_time},
        findings=key_findings(record), files=sorted(record.get("outputs") or {}), private_issues=private)


def _plan_dict(plan: StudyPlan | dict[str, Any]) -> dict[str, Any]:
    return plan.to_dict() if isinstance(plan, StudyPlan) else dict(plan)


# --------------------------------------------------------------------------- the window
T = TypeVar("T")


class _Future(Protocol):
    def add_done_callback(self, fn: Callable[[Any], Any]) -> Any: ...


F = TypeVar("F", bound=_Future)


@dataclass
class WindowLeft(Generic[T]):
    """What a stopped :func:`run_window` did not finish: started (in flight) and never started."""

    in_flight: list[T]
    waiting: list[T]


def run_window(items: Iterable[T], submit: Callable[[T], F], on_done: Callable[[T, F], None], window: int,
               stopped: Callable[[], bool] = lambda: False, poll_s: float = 0.5) -> WindowLeft[T]:
    """Submit ``items`` in order, at most ``window`` in flight; call ``on_done(item, future)`` as
    each completes, in this thread. Once ``stopped()`` is true, nothing more is submitted and
    it returns at once with what was not finished (futures still running are not waited for).

    >>> from concurrent.futures import ThreadPoolExecutor
    >>> with ThreadPoolExecutor(2) as ex:
    ...     done = []
    ...     left = run_window(range(5), lambda i: ex.submit(pow, i, 2), lambda i, f: done.append(f.result()), 2)
    >>> sorted(done), left.in_flight, left.waiting
    ([0, 1, 4, 9, 16], [], [])
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    waiting = list(reversed(list(items)))
    running: dict[int, tuple[T, F]] = {}
    finished: queue.Queue[Any] = queue.Queue()

    def start() -> None:
        item = waiting.pop()
        fut = submit(item)
        running[id(fut)] = (item, fut)
        fut.add_done_callback(finished.put)

    while waiting and not stopped() and len(running) < window:
        start()
    while running and not stopped():
        try:
            fut = finished.get(timeout=poll_s)
        except queue.Empty:
            continue
        got = running.pop(id(fut), None)
        if got is None:
            continue
        on_done(*got)
        if waiting and not stopped():
            start()
    if stopped():
        return WindowLeft([item for item, _ in running.values()], list(reversed(waiting)))
    return WindowLeft([], [])
