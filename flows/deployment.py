"""The nightly deployment: ``medpipe serve`` serves the archive flow on a cron schedule.

Schedules need a real Prefect server (the temporary one runs no scheduler). With
``PREFECT_API_URL`` set, ``serve`` registers with that server (``PREFECT_API_AUTH_STRING`` if
it needs one); without it, it starts one on loopback with the UI and a persistent home
(``~/.medpipe/prefect``, or ``MEDPIPE_PREFECT_HOME``), so the night's runs and their history
survive restarts. Stopping ``serve`` pauses the schedule.

Access: that server requires basic auth; the string is ``PREFECT_SERVER_API_AUTH_STRING`` if
set, else the one in ``HOME/auth-string`` (made on first start, mode 0600). Runs write only
inside the ``--out`` folder (and any ``--allow-out-root`` or configured root): a run started
from the UI with another ``out`` fails with an error naming the folder (see medpipe.access).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from medpipe.access import ENV_ROOTS, roots_env_value
from medpipe.config import Config

from .archive import process_archive
from .server import EXIT_WITH_PARENT


def deployment_parameters(archive: str | Path, out: str | Path, cfg: Config,
                          config_file: str | Path | None = None,
                          send: list[str] | None = None) -> dict[str, Any]:
    """Default parameters of the deployment; each one is editable in the UI for a custom run.

    ``archive`` is a folder or a PACS address. A custom run can name another ``source`` (a folder
    or a PACS address; it wins over ``archive``), the ``send`` destinations (PACS addresses), and
    ``since``/``until`` (``YYYY-MM-DD``, a backfill that overrides the watermark).
    """
    from medpipe.pacs import PacsAddress

    return {
        "archive": str(archive) if PacsAddress.is_pacs(str(archive)) else str(Path(archive).resolve()),
        "out": str(Path(out).resolve()),
        "config": cfg.model_dump(mode="json", exclude_defaults=True),
        "config_file": str(Path(config_file).resolve()) if config_file else None,
        "force": False,
        "source": None,
        "send": list(send) if send else None,
        "since": None,
        "until": None,
    }


def schedule(cfg: Config, cron: str | None = None, timezone: str | None = None) -> Any:
    from prefect.schedules import Cron

    return Cron(cron or cfg.schedule.cron, timezone=timezone or cfg.schedule.timezone)


def out_roots(out: str | Path, extra: list[Path] | None, cfg: Config) -> list[Path]:
    """Where runs of this deployment may write: ``--out``, ``--allow-out-root``s and configured roots."""
    return [Path(out), *(extra or []), *cfg.run.allowed_out_roots]


def confine_outputs(roots: list[Path]) -> str:
    """Set ``MEDPIPE_ALLOWED_OUT_ROOTS`` for every run this process starts (they inherit it)."""
    value = roots_env_value(roots)
    os.environ[ENV_ROOTS] = value
    return value


def prefect_home() -> Path:
    return Path(os.environ.get("MEDPIPE_PREFECT_HOME", Path.home() / ".medpipe" / "prefect"))


def serve(args: argparse.Namespace, cfg: Config) -> int:
    """Serve ``process_archive`` as deployment ``args.name`` until interrupted."""
    from .server import auth_string, auth_string_file, client_auth, prefect_server, private_dir

    params = deployment_parameters(args.archive, args.out, cfg, args.config, getattr(args, "send", None))
    sched = schedule(cfg, args.cron, args.timezone)
    roots = confine_outputs(out_roots(args.out, getattr(args, "allow_out_root", None), cfg))
    # The flow-run processes the runner starts end with this process, even a SIGKILLed one.
    os.environ[EXIT_WITH_PARENT] = str(os.getpid())
    print(f"Runs may write only under: {roots.replace(os.pathsep, ', ')}", flush=True)
    # One run at a time: a custom run started during the night's run (or the other way round)
    # waits for a slot instead of failing on the output folder's lock.
    if os.environ.get("PREFECT_API_URL"):
        process_archive.serve(name=args.name, schedules=[sched], parameters=params, global_limit=1)
        return 0
    home = private_dir(prefect_home())
    auth = auth_string(home)
    with prefect_server(home, ui=True, port=args.port, auth=auth) as api_url, client_auth(api_url, auth):
        where = ("PREFECT_SERVER_API_AUTH_STRING" if os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
                 else auth_string_file(home))
        print(f"Prefect UI: {api_url.removesuffix('/api')}  (deployment medpipe-archive/{args.name}, "
              f"schedule '{sched.cron}' {sched.timezone})\n"
              f"Log in with the user:password string in {where}", flush=True)
        process_archive.serve(name=args.name, schedules=[sched], parameters=params, global_limit=1)
    return 0
