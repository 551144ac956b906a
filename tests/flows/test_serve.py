"""`medpipe serve` on a real Prefect server: the nightly deployment, runs triggered through the API.

One `prefect server start` (loopback, SQLite; session fixture) and one `medpipe serve`
subprocess. Runs are triggered the way the UI and `prefect deployment run` do it, through the
server's API with custom parameters, and executed by the serving process. The four runs show
the incremental nights: everything is new, nothing changed, one study changed, force.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Inference and the HTML/DICOM reports are not the point here (TF costs ~5 s a worker, the
# reports ~4 s a study); report.json and run.json are what a run is checked by.
FAST = {"model": {"enabled": False}, "report": {"html": False, "dicom_seg": False, "dicom_sr": False}}


def trigger(deployment: Any, timeout: float = 120.0, **parameters: Any) -> dict[str, Any]:
    """Start a run of ``deployment`` with ``parameters`` through the API and wait for it to finish."""
    from prefect.deployments import run_deployment

    t0 = time.perf_counter()
    flow_run = run_deployment(deployment.id, parameters=parameters, timeout=timeout, poll_interval=1,
                              as_subflow=False)
    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"flow run {flow_run.name} ended {flow_run.state!r} (timeout {timeout:.0f} s)")
    print(f"flow run {flow_run.name}: {time.perf_counter() - t0:.1f} s from trigger to completed")
    return {"id": flow_run.id, "name": flow_run.name, "parameters": flow_run.parameters}


def trigger_refused(deployment: Any, timeout: float = 120.0, **parameters: Any) -> str:
    """Start a run that must fail; return its state message."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(deployment.id, parameters=parameters, timeout=timeout, poll_interval=1,
                              as_subflow=False)
    assert flow_run.state is not None and flow_run.state.is_failed(), f"{flow_run.name}: {flow_run.state!r}"
    return flow_run.state.message or ""


def dashboard_links() -> dict[str, str]:
    """Flow run id -> URL of the server's "Dask dashboard" link artifacts (markdown ``[text](url)``)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    prefix = "[Dask dashboard]("
    return {str(a.flow_run_id): a.data[len(prefix):-1] for a in artifacts
            if isinstance(a.data, str) and a.data.startswith(prefix)}


def statuses(run: dict[str, Any]) -> dict[str, str]:
    return {s["study_key"]: s["status"] for s in run["studies"]}


def report_run_id(out: Path, key: str) -> str:
    doc = json.loads((out / "studies" / key / "report.json").read_text())
    return doc["provenance"]["run_id"]


def change_one_pixel(folder: Path) -> Path:
    """Rewrite one slice of a series with one pixel changed (as a re-sent, corrected image would)."""
    path = sorted(folder.glob("*.dcm"))[len(list(folder.glob("*.dcm"))) // 2]
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] = pixels[0, 0] + np.asarray(7, dtype=pixels.dtype)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path)
    return path


def test_serve_schedule_and_incremental_runs_through_the_api(medpipe_serve, small_archive, tmp_path, run_json):
    archive: Path = small_archive["root"]
    keys = sorted(small_archive["studies"])
    nightly_out, out = tmp_path / "nightly-out", tmp_path / "custom-out"

    # Runs may write under tmp_path (the custom runs' folder); by default only under nightly_out.
    with medpipe_serve(archive, nightly_out, "--timezone", "Europe/Berlin", "--allow-out-root", str(tmp_path)) as dep:
        # The nightly schedule (default 02:00) in the configured time zone, active.
        [schedule] = dep.schedules
        assert schedule.active
        assert schedule.schedule.cron == "0 2 * * *"
        assert schedule.schedule.timezone == "Europe/Berlin"
        # One run at a time: a run started while another works waits for its slot (it would
        # otherwise fail on the output folder's lock).
        assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
        # Default parameters, each editable for a custom run.
        assert dep.parameters["archive"] == str(archive.resolve())
        assert dep.parameters["out"] == str(nightly_out.resolve())
        assert dep.parameters["force"] is False
        assert {"archive", "out", "config", "config_file", "force", "dask_address", "workers"} <= set(
            dep.parameter_openapi_schema["properties"])

        # 1. A custom run: another output folder, inference off, one worker.
        custom = dict(out=str(out), config=FAST, workers=1)
        trigger(dep, **custom)
        first = run_json(out)
        assert first["status"] == "completed"
        assert first["parameters"]["archive"] == str(archive.resolve())
        assert first["parameters"]["out"] == str(out.resolve())
        assert first["parameters"]["config"]["model"]["enabled"] is False
        assert statuses(first) == {k: "ok" for k in keys}
        for key in keys:
            report = json.loads((out / "studies" / key / "report.json").read_text())
            assert report["status"] == "ok" and report["provenance"]["run_id"] == first["run_id"]
        assert (out / "run.html").is_file()
        assert not nightly_out.exists()  # the deployment's own output folder was not touched

        # 2. The next night: nothing changed, nothing redone.
        trigger(dep, **custom)
        second = run_json(out)
        assert statuses(second) == {k: "skipped" for k in keys}
        assert all(s["reason"] == "unchanged since its last successful run" for s in second["studies"])

        # 3. One study's file changes: only that study is redone.
        changed, same = keys
        change_one_pixel(small_archive["studies"][changed])
        trigger(dep, **custom)
        third = run_json(out)
        assert statuses(third) == {changed: "ok", same: "skipped"}
        assert report_run_id(out, changed) == third["run_id"]
        assert report_run_id(out, same) == first["run_id"]

        # 4. force (backfill) redoes every study.
        trigger(dep, **custom, force=True)
        fourth = run_json(out)
        assert statuses(fourth) == {k: "ok" for k in keys}
        assert {report_run_id(out, k) for k in keys} == {fourth["run_id"]}
        assert not (out / ".work").exists() or not any((out / ".work").iterdir())
        assert not (out / ".medpipe.lock").exists()

        # 5. An output folder outside the allowed roots is refused, even when the run's own
        #    configuration claims to allow it: the serving process's bound holds.
        outside = tmp_path.parent / f"{tmp_path.name}-outside"
        refused = trigger_refused(dep, out=str(outside), config={"run": {"allowed_out_roots": ["/"]}})
        assert f"{outside}: output folder outside the allowed roots" in refused, refused
        assert not outside.exists()

    # Observability: each run's Dask dashboard is in run.json and linked from its flow run.
    links = dashboard_links()
    for run in (first, second, third, fourth):
        dashboard = run["dask"]["dashboard"]
        assert dashboard and dashboard.startswith("http://127.0.0.1:"), dashboard
        assert links.get(run["prefect"]["flow_run_id"]) == dashboard, (run["prefect"], links)


def test_the_session_server_refuses_anonymous_calls(prefect_api, prefect_auth):
    """The server `flows.server.prefect_server` starts (what `medpipe run` and `serve` use) needs auth."""
    assert api_status(f"{prefect_api}/admin/version") == 401
    assert api_status(f"{prefect_api}/admin/version", "medpipe:wrong") == 401
    assert api_status(f"{prefect_api}/admin/version", prefect_auth) == 200
    assert api_status(f"{prefect_api}/health") == 200  # probes stay open


def test_serve_with_its_own_server_requires_auth(tmp_path, monkeypatch, stop_process_group):
    """`medpipe serve` without PREFECT_API_URL: its server and UI need the string it keeps in its home."""
    from flows.server import free_port

    home, port = tmp_path / "prefect-home", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MEDPIPE_ALLOWED_OUT_ROOTS"}
    env.update(MEDPIPE_PREFECT_HOME=str(home), PYTHONUNBUFFERED="1")
    log = tmp_path / "serve.log"
    cmd = [str(BIN / "medpipe"), "serve", "--archive", str(tmp_path), "--out", str(tmp_path / "out"),
           "--port", str(port), "--workers", "1"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Log in with" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        secret = home / "auth-string"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(home.stat().st_mode) == 0o700
        auth = secret.read_text().strip()
        text = log.read_text()
        assert f"Log in with the user:password string in {secret}" in text and auth not in text
        api = f"http://127.0.0.1:{port}/api"
        assert api_status(f"{api}/deployments/filter", method="POST") == 401
        assert api_status(f"{api}/deployments/filter", auth, method="POST") == 200
    finally:
        stop_process_group(proc)
    # The next start reuses the string (the operator's browser stays logged in).
    from flows.server import auth_string

    assert auth_string(home) == auth


def api_status(url: str, auth: str | None = None, method: str = "GET") -> int:
    """HTTP status of a call to ``url`` with basic ``auth`` (``user:password``) or none."""
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    data = b"{}" if method == "POST" else None
    if data:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
