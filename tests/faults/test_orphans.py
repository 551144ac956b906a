"""No orphans: a killed ``medpipe run`` takes its Prefect server and Dask workers with it.

``medpipe run`` starts a Prefect server (its own process group, so a terminal's Ctrl-C does not
reach it first) and a local Dask cluster of worker processes. A SIGKILLed run never runs its
``finally``; the server ends through its parent-death signal, the workers through their parent
pipe (distributed). The test starts a real run, waits until the server answers and the
workers are up, kills the run and checks that every process it started is gone and the
server's port is closed. On the way it checks that the embedded server refuses anonymous calls.

The same for ``medpipe serve`` killed during a run: its server, the flow-run process its runner
started (which watches its parent: flows.server.exit_with_parent) and that run's workers.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from faults_helpers import alive, cmdline, write_archive

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UP_TIMEOUT_S = 150.0
GONE_TIMEOUT_S = 20.0
# Settings that would point the run at another server or bound its output: not this test's.
FOREIGN_ENV = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING",
               "MEDPIPE_ALLOWED_OUT_ROOTS")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def api_status(url: str, auth: str | None = None) -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def spawned(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes started by multiprocessing's spawn (Dask workers, a runner's flow runs)."""
    return [p for p in processes if "multiprocessing" in cmdline(p) and "spawn_main" in cmdline(p)]


def assert_all_gone(family: list[psutil.Process], port: int, what: str) -> None:
    """Every process of ``family`` ends and ``port`` closes within GONE_TIMEOUT_S."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while time.monotonic() < deadline and (any(alive(p) for p in family) or port_open(port)):
        time.sleep(0.2)
    survivors = [f"{p.pid} {cmdline(p)[:120]}" for p in family if alive(p)]
    assert not survivors, f"processes outlived the {what}: {survivors}"
    assert not port_open(port), f"the Prefect server's port {port} is still open after the {what}"


def kill_all(processes: list[psutil.Process]) -> None:
    """The safety net of a failed test: nothing it started may outlive it."""
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass


def wait_until_up(proc: subprocess.Popen, log: Path, workers: int) -> tuple[psutil.Process, int]:
    """Wait for the run's Prefect server to answer and ``workers`` Dask worker processes to exist."""
    deadline = time.monotonic() + UP_TIMEOUT_S
    me = psutil.Process(proc.pid)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"medpipe run ended ({proc.returncode}) before its workers were seen:\n"
                        f"{log.read_text()[-3000:]}")
        kids = [p for p in me.children(recursive=True) if alive(p)]
        servers = [p for p in kids if "prefect server start" in cmdline(p)]
        if servers and len(spawned(kids)) >= workers:
            port = int(servers[0].cmdline()[servers[0].cmdline().index("--port") + 1])
            if port_open(port):
                return servers[0], port
        time.sleep(0.2)
    pytest.fail(f"the run's server and {workers} workers did not come up within {UP_TIMEOUT_S:.0f} s:\n"
                f"{log.read_text()[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_run_leaves_no_process_and_no_open_port(tmp_path: Path, sig: int) -> None:
    archive = tmp_path / "archive"
    write_archive(archive, 4)
    log = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp_path))
    cmd = [str(BIN / "medpipe"), "run", str(archive), "--out", str(tmp_path / "out"), "--workers", "2"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    family: list[psutil.Process] = []
    try:
        server, port = wait_until_up(proc, log, workers=2)
        api = f"http://127.0.0.1:{port}/api"
        # The embedded server: anonymous calls are refused, the run's own auth string works.
        auth = server.environ()["PREFECT_SERVER_API_AUTH_STRING"]
        assert api_status(f"{api}/admin/version") == 401
        assert api_status(f"{api}/admin/version", "medpipe:wrong") == 401
        assert api_status(f"{api}/admin/version", auth) == 200

        family = [p for p in psutil.Process(proc.pid).children(recursive=True) if alive(p)]
        os.kill(proc.pid, sig)  # the run alone, as the OOM killer or `kill -9 PID` would
        proc.wait(timeout=GONE_TIMEOUT_S)
        assert_all_gone(family, port, f"{signal.Signals(sig).name}ed run")
    finally:
        kill_all(family)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_killed_serve_takes_its_server_and_running_flow_run_along(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from flows.server import free_port

    archive = tmp_path / "archive"
    write_archive(archive, 4)
    home, port, log = tmp_path / "prefect-home", free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", MEDPIPE_PREFECT_HOME=str(home),
               PREFECT_RUNNER_POLL_FREQUENCY="1")
    cmd = [str(BIN / "medpipe"), "serve", "--archive", str(archive), "--out", str(tmp_path / "out"),
           "--name", "orphans", "--port", str(port), "--workers", "2"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while "Log in with" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        api, auth = f"http://127.0.0.1:{port}/api", (home / "auth-string").read_text().strip()
        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}):
            with get_client(sync_client=True) as client:
                while True:  # the runner registers the deployment after the server is up
                    try:
                        deployment = client.read_deployment_by_name("medpipe-archive/orphans")
                        break
                    except Exception:
                        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                        time.sleep(0.5)
                client.create_flow_run_from_deployment(deployment.id)
        # serve -> server, flow-run process -> its 2 Dask workers (+ spawn's resource trackers).
        serve = psutil.Process(proc.pid)
        while True:
            kids = [p for p in serve.children(recursive=True) if alive(p)]
            runs = spawned(serve.children())
            if runs and len(spawned(runs[0].children(recursive=True))) >= 2:
                break
            assert proc.poll() is None and time.monotonic() < deadline, (
                f"no flow run with workers under serve:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        family = kids
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=GONE_TIMEOUT_S)
        assert_all_gone(family, port, "SIGKILLed medpipe serve")
    finally:
        kill_all(family)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
