"""What a run does with each study it found: process it, or skip it and say why.

The decision needs the studies' plans (discovery), what OUT holds (each published study's
manifest and input fingerprint), the configuration and the models' identities: their files'
SHA-256 and domains, never TensorFlow. The flow decides with :func:`decide`.

:func:`nothing_new` takes the whole decision for a folder archive from the discovery catalogue
and the published manifests alone, in the calling process. When every study is unchanged and
intact it writes the run record (every study ``skipped``) and the run is over: a night with
nothing new starts no cluster, no Prefect server and no flow. Anything new, changed or damaged,
and it returns None: the run goes through the flow.

>>> run = nothing_new("archive", "out", Config())   # doctest: +SKIP
>>> run is None or run["counts"]["skipped"] == len(run["studies"])  # doctest: +SKIP
True
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple

from .config import Config
from .privacy import PathRedactor, append_log
from .outputs import STATUSES, OutputLayout, OutputLockedError, clean_work, input_fingerprint, new_run_id, now_iso, \
    run_lock, versions
from .publish import published_fingerprint
from .study import StudyEntry, entry_for

log = logging.getLogger("medpipe")


class ToDo(NamedTuple):
    """A study this run processes: its plan and the fingerprint of its inputs."""

    plan: dict[str, Any]
    fingerprint: str


def models_identity(cfg: Config) -> dict[str, Any] | None:
    """Each enabled model's identity (file SHA-256, cached per file), card and domain; the first
    one's fields at the top level, all of them in ``models`` (None with inference off).

    All that deciding whether a study is unchanged needs: no TensorFlow, no load.

    Raises
    ------
    ModelError
        A configured model file is missing or its card unreadable.
    """
    if not cfg.model.enabled:
        return None
    from .inference.model import resolve_model

    return describe_models(cfg, resolve_model)


def describe_models(cfg: Config, describe: Callable[[Any], Any]) -> dict[str, Any] | None:
    """``describe(model config).to_dict()`` of each enabled model: the first one's fields at the
    top level, all of them in ``models`` (None when none is enabled)."""
    found = [describe(m).to_dict() for m in cfg.inference_models() if m.enabled]
    return {**found[0], "models": found} if found else None


def models_fingerprint(model: dict[str, Any] | None) -> str | None:
    """What a study's results depend on of the models: each one's file and domain (its card may
    change what it applies to without a new file)."""
    if not model:
        return None
    parts = [(m.get("sha256"), m.get("domain")) for m in model.get("models") or [model]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def decide(plans: list[dict[str, Any]], layout: OutputLayout, cfg: Config,
           model: dict[str, Any] | None) -> tuple[list[ToDo], list[StudyEntry]]:
    """The studies to process, and the entries of those skipped (no usable series, or unchanged
    and intact since their last successful run unless ``run.force``)."""
    todo: list[ToDo] = []
    skipped: list[StudyEntry] = []
    models = models_fingerprint(model)
    for plan in plans:
        key = plan["study_key"]
        fp = input_fingerprint(plan.get("fingerprint", ""), cfg.fingerprint(), models)
        if plan.get("skip_reason"):
            skipped.append(entry_for(plan, layout.root, "skipped", reason=plan["skip_reason"]))
            continue
        done, damage = published_fingerprint(layout.study(key))
        if not cfg.run.force and done == fp:
            skipped.append(entry_for(plan, layout.root, "skipped", reason="unchanged since its last successful run"))
            continue
        if damage:
            log.warning("study %s: published outputs damaged (%s); redoing it", key, "; ".join(damage))
        todo.append(ToDo(plan, fp))
    return todo, skipped


def run_record(archive: str, out: str, cfg: Config) -> dict[str, Any]:
    """A new run's record as it starts (``running``; the flow adds ``prefect`` and ``dask``)."""
    config = cfg.model_dump(mode="json")
    return {
        "run_id": new_run_id(),
        "started": now_iso(),
        "finished": None,
        "status": "running",
        "versions": versions(),
        "parameters": {"archive": archive, "out": out, "config": config, "config_fingerprint": cfg.fingerprint()},
        "prefect": {},
        "dask": {"dashboard": None},
        "counts": {},
        "studies": [],
        "issues": [],
    }


def count(run: dict[str, Any]) -> None:
    """Sort the run's studies and count them by status."""
    run["studies"].sort(key=lambda e: e["study_key"])
    run["counts"] = {s: sum(1 for st in run["studies"] if st["status"] == s) for s in STATUSES}


def add_file_issues(run: dict[str, Any], private: list[dict[str, Any]], issues: list[dict[str, Any]],
                    redactor: PathRedactor) -> None:
    """Discovery's file problems into the run: their public form (paths as tokens) in
    ``run["issues"]``, the operator's log lines in ``private``."""
    for issue in issues:
        public, secret = redactor.issue(issue)
        run["issues"].append(public)
        private.append(secret)


def write_record(out: str | Path, run: dict[str, Any], private: list[dict[str, Any]]) -> None:
    """Write run.json, run.html and the run's lines of the operator's log; never raise."""
    from .report.run import write_run_record

    for problem in write_run_record(out, run):
        log.error("run record: %s", problem)
    try:  # a file of a processed study is named by discovery and by its study's report: once here
        append_log(out, run["run_id"], list({(e["file_id"], e["reason"]): e for e in private}.values()))
    except OSError as exc:
        log.error("operator's log %s: %s", Path(out) / "private", exc)


def nothing_new(archive: str | Path, out: str | Path, cfg: Config) -> dict[str, Any] | None:
    """The record of a run with nothing to do, written to OUT; None when there is something to do.

    Only a folder archive whose every file the catalogue knows as it is (one ``stat`` each), whose
    every study is skipped (unchanged and intact, or unusable), with no destinations to send to
    and without ``run.force``, ends here. The record is the flow's, with ``prefect`` empty and
    ``dask.dashboard`` null: no flow or cluster ran. Another run writing OUT: None (the flow
    then says so).
    """
    from .ingest import catalogue_path, plan_studies, scan_known

    t0 = time.perf_counter()
    archive, out = Path(archive).resolve(), Path(out).resolve()
    if cfg.run.force or cfg.send.destinations or cfg.source.url:
        return None
    layout = OutputLayout(out)
    try:
        with run_lock(out):
            scan = scan_known(archive, cfg.ingest, catalogue_path(out, archive))
            if scan is None:
                return None
            plans = [p.to_dict() for p in plan_studies(scan, cfg.ingest)]
            model = models_identity(cfg)
            todo, skipped = decide(plans, layout, cfg, model)
            if todo:
                return None
            clean_work(out)
            run = run_record(str(archive), str(out), cfg)
            run["model"] = model
            redactor = PathRedactor.for_output(out, archive)
            private: list[dict[str, Any]] = []
            add_file_issues(run, private, [i.to_dict() for i in scan.issues], redactor)
            run["studies"] = [redactor.deep(e.to_dict()) for e in skipped]
            run["status"], run["finished"] = "completed", now_iso()
            run["seconds"] = round(time.perf_counter() - t0, 2)
            count(run)
            write_record(out, run, private)
            return run
    except OutputLockedError:
        return None
