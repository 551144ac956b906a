"""The PACS side of a run, thin over :mod:`medpipe.pacs`: credentials, the plan, the fetch, the outboxes.

Credentials are resolved here, not in the library, because a Prefect Secret block
(``pacs.auth.secret_block``) needs Prefect; environment variables work the same way. They are
resolved where they are used (the flow process plans and delivers; each study task fetches on
its Dask worker) and never travel as a task parameter, so Prefect never records them.

Exit statuses (docs/cli.md): :func:`failure_message` tells the CLI which failures are usage
errors (exit 2: no watermark and no ``--since``) and words the others (exit 3: credentials
refused, PACS unavailable) without any secret in them.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from medpipe.config import Config
from medpipe.errors import ConfigError

log = logging.getLogger("medpipe")


# --------------------------------------------------------------------------- credentials
def secret_block_value(name: str) -> str:
    """The value of the Prefect Secret block ``name`` as medpipe's credentials string.

    A block may hold ``user:password`` (basic), the token (bearer), or JSON:
    ``{"username": ..., "password": ...}`` or ``{"token": ...}``.
    """
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as exc:  # Prefect's "Unable to find block document named ..."
        raise ConfigError(f"pacs.auth.secret_block {name!r}: no such Prefect Secret block ({exc})") from None
    if isinstance(value, dict):
        if "token" in value:
            return str(value["token"])
        if "username" in value and "password" in value:
            return f"{value['username']}:{value['password']}"
        raise ConfigError(f"Secret block {name!r}: a JSON value needs 'username' and 'password', or 'token'")
    return str(value)


def credentials(cfg: Config) -> Any:
    """The :class:`medpipe.pacs.auth.Credentials` that ``cfg.pacs.auth`` names (env vars or Secret block)."""
    from medpipe.pacs.auth import resolve_credentials

    auth = cfg.pacs.auth
    secret = secret_block_value(auth.secret_block) if auth.kind != "none" and auth.secret_block else None
    return resolve_credentials(auth, secret=secret)


def open_source(cfg: Config, url: str | None = None) -> Any:
    """A client of ``url`` (default: the configured source) with the configured credentials, which
    does not show the series medpipe itself sent into a study (:class:`InputsOnly`)."""
    from medpipe.pacs import open_client

    return InputsOnly(open_client(url or cfg.source.url, cfg.pacs, credentials(cfg)))


def is_own_series(series: Any) -> bool:
    """Whether a series of the PACS is one medpipe sent (SEG, SR, the report image): a result, not
    an input. Counting it would change the study's fingerprint, so the study would be redone and
    its results sent again every night."""
    from medpipe.report.dicom import SERIES_NUMBERS

    made = series.number in SERIES_NUMBERS.values() and (series.modality or "").upper() in ("SEG", "SR", "OT", "SC")
    return made or (series.description or "").lower().startswith("medpipe")


class InputsOnly:
    """A :class:`~medpipe.pacs.PacsClient` whose ``find_series`` leaves out :func:`is_own_series`
    (everything else is the wrapped client's)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def find_series(self, study_uid: str) -> list[Any]:
        return [s for s in self._client.find_series(study_uid) if not is_own_series(s)]

    def __enter__(self) -> "InputsOnly":
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()


# --------------------------------------------------------------------------- checks and messages
def watermark_problem(cfg: Config, out: str | Path) -> str | None:
    """Why a run of the configured PACS source into ``out`` must be refused before it starts
    (a first run with no watermark and no ``since``), or None. Reads only."""
    if cfg.source.since is not None or not cfg.source.url:
        return None
    from medpipe.pacs import PacsAddress
    from medpipe.pacs.state import load_state

    if load_state(Path(out), PacsAddress.parse(cfg.source.url)).watermark is None:
        return no_watermark_text(cfg.source.url, out)
    return None


def no_watermark_text(url: str, out: str | Path) -> str:
    from medpipe.pacs import PacsAddress

    return (f"{PacsAddress.parse(url).redacted()}: no watermark in {out} yet (a first run); give --since "
            "YYYY-MM-DD (or source.since) to say where to start instead of pulling the whole PACS")


def failure_message(exc: BaseException) -> tuple[bool, str]:
    """``(usage_error, text)`` of an exception that ended a run or a plan (no secret in the text)."""
    from medpipe.pacs import NoWatermark, PacsAuthError, PacsUnavailable

    if isinstance(exc, NoWatermark):
        return True, str(exc)
    if isinstance(exc, PacsAuthError):
        return False, (f"the PACS refused medpipe's credentials: {exc} (check pacs.auth: the environment "
                       "variables or Secret block it names)")
    if isinstance(exc, PacsUnavailable):
        return False, f"the PACS cannot be reached: {exc}"
    if isinstance(exc, ConfigError):
        return True, str(exc)
    return False, f"run failed: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- plan
def plan_source(cfg: Config, out: str | Path | None,
                is_done: Callable[[str, str], bool] | None = None) -> Any:
    """Query the configured PACS for the studies of this run's window (retrieves nothing, writes
    nothing): a :class:`medpipe.pacs.plan.PacsPlan`. Without ``out`` only ``since`` can start it."""
    from medpipe.pacs.plan import plan_pacs

    with _closing(open_source(cfg)) as client:
        if out is not None:
            return plan_pacs(client, cfg, Path(out), is_done=is_done)
        with tempfile.TemporaryDirectory(prefix="medpipe-plan-") as empty:  # no state: since decides
            return plan_pacs(client, cfg, Path(empty), is_done=is_done)


def format_pacs_plan(plan: Any) -> str:
    """What ``medpipe plan`` prints for a PACS: the window, each study to fetch, each left for later."""
    from medpipe.pacs.plan import format_pacs_plan as text

    return text(plan)


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


class _closing:
    """``with _closing(client)``: close the client however the block ends."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __enter__(self) -> Any:
        return self.client

    def __exit__(self, *exc: object) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------- fetch (on the workers)
class PacsFetch:
    """The ``fetch`` seam of :func:`medpipe.study.process_study` for a study planned from a PACS.

    Retrieves the study's planned series (``plan["source"]``) into ``cache/<study-key>/``
    (:func:`medpipe.pacs.retrieve.fetch_study`: counts proven, :class:`~medpipe.pacs.IncompleteStudy`
    when short or still growing, which defers the study), then scans and plans that folder as
    discovery does for an archive folder. The folder stays until :meth:`cleanup` (the objects for
    the destinations are written from it after the study is published). Picklable and free of
    secrets: credentials are resolved when it runs, on the worker.
    """

    def __init__(self, config: dict[str, Any], source: dict[str, Any], cache: str | Path):
        self.config, self.source, self.cache = config, dict(source), Path(cache)
        self.fetched: Any = None  # the StudyPlan of the retrieved files, once fetched

    def __call__(self, plan: Any, folder: Path) -> Any:
        from medpipe.ingest import plan_studies, scan_archive
        from medpipe.pacs.retrieve import fetch_study

        cfg = Config.model_validate(self.config)
        with _closing(open_source(cfg, self.source.get("address"))) as client:
            root = fetch_study(self.source, self.cache, client, max_bytes=int(cfg.source.cache_max_gb * 1e9))
        scan = scan_archive(Path(root), cfg.ingest)
        found = [p for p in plan_studies(scan, cfg.ingest) if p.study_key == plan.study_key]
        if not found or not found[0].files:
            from medpipe.errors import StudyError

            why = found[0].skip_reason if found else "no series of this study"
            raise StudyError(plan.study_key, f"the retrieved files hold nothing to process: {why}")
        got = found[0]
        # The study's identity for skipping and for the sent objects' UIDs is what the PACS
        # listed (series and instances), not the cache's paths and times.
        got.fingerprint = plan.fingerprint or got.fingerprint
        self.fetched = got
        return got

    @property
    def folder(self) -> Path:
        return self.cache / str(self.source.get("study_key"))

    def cleanup(self) -> None:
        """Remove the study's retrieved files (identifying; the published study no longer needs them)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def cache_root(cfg: Config, out: str | Path) -> Path:
    """Where studies are retrieved: ``source.cache_dir``, else ``OUT/.work/pacs-cache`` (one
    folder per study, removed when the study is done; ``source.cache_max_gb`` bounds it)."""
    return Path(cfg.source.cache_dir) if cfg.source.cache_dir else Path(out) / ".work" / "pacs-cache"


def enqueue_results(entry: Any, source_files: list[str], cfg: Config, out: str | Path, fingerprint: str,
                    send_dir: Path) -> list[str]:
    """Write the identified objects of a study processed in this run (from its published folder
    and its source files) and put them into each destination's outbox
    (:func:`medpipe.pacs.send.enqueue_study`). Returns the problems met making them; nothing is
    done for a study that is not ``ok``, or when no destination is configured."""
    from medpipe.pacs.send import enqueue_study
    from medpipe.report.dicom import write_send_objects

    if not cfg.send.destinations or entry.status != "ok" or not source_files:
        return []
    study_dir = Path(out) / "studies" / entry.study_key
    record = json.loads((study_dir / "report.json").read_text())
    try:
        made = write_send_objects(study_dir, record, cfg, source_files, send_dir)
        if made.files:
            enqueue_study(out, cfg, entry.study_key, fingerprint, made.files)
    finally:
        shutil.rmtree(send_dir, ignore_errors=True)  # identifying: the outbox holds the copies
    return [*made.problems, *(f"{k} not sent: {v}" for k, v in made.reasons.items() if k in cfg.send.objects)]


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
