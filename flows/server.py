"""An embedded Prefect server on loopback, so that ``medpipe run`` needs nothing started by hand.

Without ``PREFECT_API_URL`` every process that runs a flow or task (each Dask worker too)
would start a temporary server of its own (see shared/FACTS.md). Instead we start one real
``prefect server start`` on 127.0.0.1 with SQLite, export its URL to this process and to every
process it spawns, and stop it at the end. An existing ``PREFECT_API_URL`` is honoured.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("medpipe")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api_url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``/health`` until the server answers; fail early if its process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with status {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"prefect server at {api_url} did not become healthy within {timeout:.0f} s")


@contextmanager
def prefect_server(home: Path | None = None, *, ui: bool = False, port: int | None = None,
                   log_file: Path | None = None) -> Iterator[str]:
    """Start ``prefect server start`` on loopback and yield its API URL; stop it on exit."""
    own_home = home is None
    home = Path(home or tempfile.mkdtemp(prefix="medpipe-prefect-"))
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true" if ui else "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    env.pop("PREFECT_API_URL", None)
    out = open(log_file or home / "server.log", "ab")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    if not ui:
        cmd.append("--no-ui")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(api_url, proc=proc)
        log.info("prefect server on %s (home %s)", api_url, home)
        yield api_url
    finally:
        _stop(proc)
        out.close()
        if own_home:
            shutil.rmtree(home, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


@contextmanager
def prefect_api(home: Path | None = None, *, ui: bool = False) -> Iterator[str]:
    """Yield a Prefect API URL: the configured one, or an embedded server's.

    The URL is set in ``os.environ`` (inherited by Dask worker processes started later) and in
    Prefect's settings context of this process.
    """
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        yield existing
        return
    with prefect_server(home, ui=ui) as url:
        os.environ["PREFECT_API_URL"] = url
        try:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _flush_logs()
        finally:
            os.environ.pop("PREFECT_API_URL", None)


def _flush_logs() -> None:
    """Send queued logs and events while the server still runs.

    Otherwise Prefect's background workers retry them against a closed port at interpreter
    exit, which holds the process for over a minute and prints connection errors.
    """
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for service in (APILogWorker, EventsWorker):
            service.drain_all(timeout=15, at_exit=False)
    except Exception as exc:  # losing a few log lines must not fail a finished run
        log.debug("could not flush Prefect logs: %s", exc)
