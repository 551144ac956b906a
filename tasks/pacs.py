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

import datetime as dt
import logging
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
    """A client of ``url`` (default: the configured source) with the configured credentials."""
    from medpipe.pacs import open_client

    return open_client(url or cfg.source.url, cfg.pacs, credentials(cfg))


# --------------------------------------------------------------------------- checks and messages
def watermark_problem(cfg: Config, out: str | Path) -> str | None:
    """Why a run of the configured PACS source into ``out`` must be refused before it starts
    (a first run with no watermark and no ``since``), or None. Reads only."""
    if cfg.source.since is not None or not cfg.source.url:
        return None
    from medpipe.pacs.state import load_state

    if load_state(out, cfg.source.url).watermark is None:
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
def plan_source(cfg: Config, out: str | Path | None, now: dt.datetime | None = None) -> Any:
    """Query the configured PACS for the studies of this run's window (retrieves nothing)."""
    from medpipe.pacs.plan import plan_pacs

    now = now or dt.datetime.now(dt.timezone.utc)
    with _closing(open_source(cfg)) as client:
        return plan_pacs(client, cfg, Path(out) if out is not None else None, now)


@task(name="plan-pacs", cache_policy=NO_CACHE, persist_result=False, retries=0)
def plan(config: dict[str, Any], out: str) -> Any:
    """The run's :class:`medpipe.pacs.plan.PacsPlan` (studies to fetch, deferred ones, the window)."""
    cfg = Config.model_validate(config)
    got = plan_source(cfg, out)
    log.info("PACS %s: %d studies to fetch, %d deferred", _redacted(cfg.source.url), len(got.plans),
             len(got.deferred))
    return got


def format_pacs_plan(plan: Any, cfg: Config, out: str | Path | None) -> str:
    """What ``medpipe plan`` prints for a PACS: the window, each study to fetch, each left for later."""
    window = plan.window or {}
    lines = [f"PACS {_redacted(cfg.source.url)}",
             f"window: {_fmt(window.get('start'))} -> {_fmt(window.get('end'))}",
             f"{len(plan.plans)} studies would be fetched, {len(plan.deferred)} deferred", ""]
    for p in plan.plans:
        series = (p.get("source") or {}).get("series") or []
        n = sum(int(s.get("expected") or 0) for s in series)
        lines.append(f"  fetch    {p['study_key']}  {p.get('modality') or '?':<4} "
                     f"{len(series)} series, {n} instances")
    for d in plan.deferred:
        lines.append(f"  deferred {d['study_key']}  {d.get('reason', '')}")
    for s in getattr(plan, "skipped", None) or []:
        lines.append(f"  skip     {s['study_key']}  {s.get('reason', '')}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "–" if value is None else (value.isoformat() if hasattr(value, "isoformat") else str(value))


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
