"""Fixtures of the end-to-end flow tests: one real Prefect server, small archives, `medpipe serve`.

The server is a real ``prefect server start`` on loopback (SQLite, with the UI, basic auth as
always), started once per test session (tests/conftest.py). Every process of a
test (this one, the ``medpipe serve`` subprocess, the flow runs it starts, Dask workers) gets its
``PREFECT_API_URL`` and ``PREFECT_API_AUTH_STRING``; nothing starts a temporary server of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- small archives
def _write_archive(dest: Path, n_studies: int = 2, seed: int = 0) -> dict[str, Any]:
    """Write ``n_studies`` small chest CT phantom studies (16 x 64 x 64) under ``dest``.

    Returns ``{"root": dest, "studies": {study_key: folder}}``.
    """
    from medpipe.keys import study_key
    from medpipe.phantom import ct_phantom
    from medpipe.sample import stable_uid, write_series

    studies: dict[str, Path] = {}
    for i in range(n_studies):
        ph = ct_phantom(shape=(16, 64, 64), n_lesions=1, seed=seed + i)
        uid = stable_uid("medpipe-test-flows", seed, i)
        folder = dest / f"patient-{seed}-{i}" / "ct"
        write_series(ph.hu, ph.spacing, folder, modality="CT", study_uid=uid,
                     series_uid=stable_uid("medpipe-test-flows-series", seed, i),
                     patient_id=f"TEST-{seed}-{i}", intercept=-1024.0, series_description="CHEST",
                     BodyPartExamined="CHEST")  # the default model's domain: chest CT
        studies[study_key(uid)] = folder
    return {"root": dest, "studies": studies}


@pytest.fixture
def write_archive() -> Callable[..., dict[str, Any]]:
    """``write_archive(dest, n_studies=2, seed=0)``: small phantom CT studies, keyed by study key."""
    return _write_archive


@pytest.fixture
def small_archive(tmp_path: Path) -> dict[str, Any]:
    """Two small phantom CT studies in ``tmp_path/archive``."""
    return _write_archive(tmp_path / "archive", 2, seed=0)


def read_run(out: Path) -> dict[str, Any]:
    return json.loads((Path(out) / "run.json").read_text())


@pytest.fixture
def run_json() -> Callable[[Path], dict[str, Any]]:
    """``run_json(out)``: the parsed ``OUT/run.json``."""
    return read_run


# --------------------------------------------------------------------------- processes
def stop_group(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its group."""
    if proc.poll() is None:
        for s, wait in ((sig, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    try:  # the group may outlive its leader for a moment (worker processes shutting down)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def stop_process_group() -> Callable[..., None]:
    """``stop_process_group(proc, sig=SIGINT)``: stop a ``start_new_session`` subprocess and its group."""
    return stop_group


@pytest.fixture(autouse=True)
def no_stray_processes(prefect_server_url: str) -> Iterator[None]:
    """Fail a test that leaves processes behind (and end them, so the next test starts clean).

    The session's Prefect server (started before the snapshot) and its children are expected;
    anything else this test started must be gone shortly after it ends.
    """
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.monotonic() + 15
    while True:
        stray = [p for p in me.children(recursive=True) if p.pid not in before and _alive(p)]
        if not stray or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if stray:
        names = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in stray if _alive(p)]
        for p in stray:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        pytest.fail(f"processes left behind: {names}")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------------- medpipe serve
@pytest.fixture
def medpipe_serve(prefect_api: str, tmp_path: Path, stop_process_group) -> Callable[..., Any]:
    """``medpipe_serve(archive, out, *args)`` (a context manager): serve the nightly deployment.

    Starts ``medpipe serve --archive A --out O --name nightly --workers 1 *args`` against the
    session server, yields the deployment once the server has it, and stops the process group
    (SIGINT, as Ctrl-C would) on exit.
    """

    @contextmanager
    def serve(archive: Path, out: Path, *args: str, name: str = "nightly") -> Iterator[Any]:
        env = {
            **os.environ,  # with PREFECT_API_AUTH_STRING (the prefect_api fixture)
            "PREFECT_API_URL": prefect_api,
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # default 10 s between looks for runs to start
            "PYTHONUNBUFFERED": "1",
        }
        log = tmp_path / f"serve-{name}.log"
        cmd = [str(BIN / "medpipe"), "serve", "--archive", str(archive), "--out", str(out),
               "--name", name, "--workers", "1", *args]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            expected = {"archive": str(Path(archive).resolve()), "out": str(Path(out).resolve())}
            deployment = wait_for_deployment(f"medpipe-archive/{name}", expected, proc, log)
            yield deployment
        finally:
            stop_process_group(proc)
            print(f"--- medpipe serve log ({log}) ---\n{log.read_text()[-4000:]}")

    return serve


def wait_for_deployment(name: str, parameters: dict[str, Any], proc: subprocess.Popen, log: Path,
                        timeout: float = 90.0) -> Any:
    """Poll the API until deployment ``name`` has a schedule and these ``parameters``.

    The parameters tell this process's deployment from one an earlier test served under the
    same name on the same server. Fails early if ``proc`` exits.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    def read() -> Any:
        # The sync client: no event loop of our own (Playwright's sync API runs one in this thread).
        with get_client(sync_client=True) as client:
            try:
                dep = client.read_deployment_by_name(name)
            except ObjectNotFound:
                return None
            # The runner creates (or updates) the deployment, then polls for its runs.
            mine = all(dep.parameters.get(k) == v for k, v in parameters.items())
            return dep if mine and dep.schedules else None

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"medpipe serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        dep = read()
        if dep is not None:
            return dep
        time.sleep(0.5)
    pytest.fail(f"deployment {name} did not appear within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
