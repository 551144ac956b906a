"""The nightly deployment: ``medpipe serve`` serves the archive flow on a cron schedule.

Schedules need a real Prefect server (the temporary one runs no scheduler). With
``PREFECT_API_URL`` set, ``serve`` registers with that server; without it, it starts one on
loopback with the UI and a persistent home (``~/.medpipe/prefect``), so the night's runs and
their history survive restarts. Stopping ``serve`` pauses the schedule.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from medpipe.config import Config

from .archive import process_archive


def deployment_parameters(archive: str | Path, out: str | Path, cfg: Config,
                          config_file: str | Path | None = None) -> dict[str, Any]:
    """Default parameters of the deployment; each one is editable in the UI for a custom run."""
    return {
        "archive": str(Path(archive).resolve()),
        "out": str(Path(out).resolve()),
        "config": cfg.model_dump(mode="json", exclude_defaults=True),
        "config_file": str(Path(config_file).resolve()) if config_file else None,
        "force": False,
    }


def schedule(cfg: Config, cron: str | None = None, timezone: str | None = None) -> Any:
    from prefect.schedules import Cron

    return Cron(cron or cfg.schedule.cron, timezone=timezone or cfg.schedule.timezone)


def serve(args: argparse.Namespace, cfg: Config) -> int:
    """Serve ``process_archive`` as deployment ``args.name`` until interrupted."""
    from .server import prefect_server

    params = deployment_parameters(args.archive, args.out, cfg, args.config)
    sched = schedule(cfg, args.cron, args.timezone)
    # One run at a time: a custom run started during the night's run (or the other way round)
    # waits for a slot instead of failing on the output folder's lock.
    if os.environ.get("PREFECT_API_URL"):
        process_archive.serve(name=args.name, schedules=[sched], parameters=params, global_limit=1)
        return 0
    home = Path(os.environ.get("MEDPIPE_PREFECT_HOME", Path.home() / ".medpipe" / "prefect"))
    home.mkdir(parents=True, exist_ok=True)
    with prefect_server(home, ui=True, port=args.port) as api_url:
        os.environ["PREFECT_API_URL"] = api_url
        from prefect.settings import PREFECT_API_URL, temporary_settings

        print(f"Prefect UI: {api_url.removesuffix('/api')}  (deployment medpipe-archive/{args.name}, "
              f"schedule '{sched.cron}' {sched.timezone})", flush=True)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            process_archive.serve(name=args.name, schedules=[sched], parameters=params, global_limit=1)
    return 0
