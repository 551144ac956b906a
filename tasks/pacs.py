"""The PACS side of a run, thin over :mod:`medpipe.pacs`: credentials, the plan, the fetch, the outboxes.

Credentials are resolved here, not in the library, because a Prefect Secret block
(``pacs.auth.secret_block``) needs Prefect; environment variables work the same way. They are
resolved where they are used (the flow process plans and delivers; each study task fetches on
its Dask worker) and never travel as a task parameter, so Prefect never records them.

What the PACS side does lives in :mod:`medpipe.pacs` (planning, retrieval and the plan of the
retrieved files, sending, the checks and messages the CLI uses); this module resolves the
credentials, opens the clients and logs. Names the flows and the CLI import from here
(:func:`watermark_problem`, :func:`failure_message`, :func:`cache_root`, ...) are the library's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from medpipe.config import Config
from medpipe.errors import ConfigError
from medpipe.pacs.client import failure_message
from medpipe.pacs.inputs import InputsOnly, is_own_series
from medpipe.pacs.plan import format_pacs_plan, no_watermark_text, watermark_problem

log = logging.getLogger("medpipe")

__all__ = [
    "InputsOnly", "PacsFetch", "cache_root", "credentials", "deliver_outboxes", "enqueue_results",
    "failure_message", "format_pacs_plan", "is_own_series", "no_watermark_text", "open_source", "plan",
    "plan_source", "secret_block_value", "watermark_problem",
]


# --------------------------------------------------------------------------- credentials
def secret_block_value(name: str) -> Any:
    """The value of the Prefect Secret block ``name``: a string, or the JSON it holds
    (:func:`medpipe.pacs.auth.secret_text` reads both)."""
    from prefect.blocks.system import Secret

    try:
        return Secret.load(name).get()
    except ValueError as exc:  # Prefect's "Unable to find block document named ..."
        raise ConfigError(f"pacs.auth.secret_block {name!r}: no such Prefect Secret block ({exc})") from None


def credentials(cfg: Config) -> Any:
    """The :class:`medpipe.pacs.auth.Credentials` that ``cfg.pacs.auth`` names (env vars or Secret block)."""
    from medpipe.pacs.auth import resolve_credentials

    auth = cfg.pacs.auth
    secret = secret_block_value(auth.secret_block) if auth.kind != "none" and auth.secret_block else None
    return resolve_credentials(auth, secret=secret)


def open_source(cfg: Config, url: str | None = None) -> InputsOnly:
    """A client of ``url`` (default: the configured source) with the configured credentials, which
    does not show the series medpipe itself sent into a study (:class:`~medpipe.pacs.inputs.InputsOnly`;
    ``with`` closes it)."""
    from medpipe.pacs import open_client

    return InputsOnly(open_client(url or cfg.source.url, cfg.pacs, credentials(cfg)))


# --------------------------------------------------------------------------- plan (in the flow)
def plan_source(cfg: Config, out: str | Path | None,
                is_done: Callable[[str, str], bool] | None = None) -> Any:
    """Query the configured PACS for the studies of this run's window (retrieves nothing, writes
    nothing): a :class:`medpipe.pacs.plan.PacsPlan`. Without ``out`` only ``since`` can start it."""
    from medpipe.pacs.plan import plan_pacs

    with open_source(cfg) as client:
        return plan_pacs(client, cfg, None if out is None else Path(out), is_done=is_done)


@task(name="plan-pacs", cache_policy=NO_CACHE, persist_result=False, retries=0)
def plan(config: dict[str, Any], out: str, is_done: Callable[[str, str], bool] | None = None) -> Any:
    """The run's :class:`medpipe.pacs.plan.PacsPlan` (studies to fetch, deferred ones, the window).

    Call it (not ``.submit``): it runs in the flow's process, which holds the credentials."""
    cfg = Config.model_validate(config)
    got = plan_source(cfg, out, is_done)
    log.info("PACS %s: %d studies to fetch, %d deferred, %d skipped", _redacted(cfg.source.url), len(got.plans),
             len(got.deferred), len(got.skipped))
    return got


def _redacted(url: str | None) -> str:
    from medpipe.pacs import PacsAddress

    return PacsAddress.parse(url).redacted() if url else "–"


# --------------------------------------------------------------------------- fetch (on the workers)
def cache_root(cfg: Config, out: str | Path) -> Path:
    """Where studies are retrieved (:func:`medpipe.pacs.retrieve.cache_root`)."""
    from medpipe.pacs.retrieve import cache_root as root

    return root(cfg, out)


class PacsFetch:
    """The ``fetch`` seam of :func:`medpipe.study.process_study` for a study planned from a PACS.

    Opens the source with the credentials and calls :func:`medpipe.pacs.retrieve.fetch_and_plan`:
    the study's planned series (``plan["source"]``) retrieved into ``cache/<study-key>/``, counts
    proven (:class:`~medpipe.pacs.IncompleteStudy` defers the study), and that folder planned as
    discovery plans an archive folder. The folder stays until :meth:`cleanup` (the objects for
    the destinations are written from it after the study is published). Picklable and free of
    secrets: credentials are resolved when it runs, on the worker.
    """

    def __init__(self, config: dict[str, Any], source: dict[str, Any], cache: str | Path):
        self.config, self.source, self.cache = config, dict(source), Path(cache)
        self.fetched: Any = None  # the StudyPlan of the retrieved files, once fetched

    def __call__(self, plan: Any, folder: Path) -> Any:
        from medpipe.pacs.retrieve import fetch_and_plan

        cfg = Config.model_validate(self.config)
        with open_source(cfg, self.source.get("address")) as client:
            self.fetched = fetch_and_plan(plan, self.source, self.cache, client, cfg)
        log.debug("study %s: %d file(s) retrieved to ingest", plan.study_key, len(self.fetched.files))
        return self.fetched

    @property
    def folder(self) -> Path:
        from medpipe.pacs.retrieve import study_folder

        return study_folder(self.cache, self.source)

    def cleanup(self) -> None:
        """Remove the study's retrieved files (identifying; the published study no longer needs them)."""
        from medpipe.pacs.retrieve import drop_study

        drop_study(self.cache, self.source)


def enqueue_results(entry: Any, source_files: list[str], cfg: Config, out: str | Path, fingerprint: str,
                    send_dir: Path) -> list[str]:
    """Make a processed study's objects and put them into each destination's outbox
    (:func:`medpipe.pacs.send.enqueue_results`); return the problems met."""
    from medpipe.pacs.send import enqueue_results as enqueue

    return enqueue(entry, source_files, cfg, out, fingerprint, send_dir)


# --------------------------------------------------------------------------- outboxes (in the flow)
@task(name="deliver-outboxes", cache_policy=NO_CACHE, persist_result=False, retries=0)
def deliver_outboxes(config: dict[str, Any], out: str) -> list[dict[str, Any]]:
    """Send what every configured destination's outbox holds (this run's results and those left
    by earlier runs); return each destination's summary for run.json
    (:func:`medpipe.pacs.send.deliver_all`). Call it (not ``.submit``): it runs in the flow's
    process, which holds the credentials.

    A destination that is down keeps its entries pending (the next run sends them); one that
    refuses the credentials fails the run (:class:`~medpipe.pacs.PacsAuthError`, exit 3) after
    the others were delivered.
    """
    from medpipe.pacs.send import deliver_all

    cfg = Config.model_validate(config)
    if not cfg.send.destinations:
        return []
    return deliver_all(out, cfg, credentials(cfg))
