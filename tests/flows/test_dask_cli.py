"""The archive flow on an existing Dask cluster started with Dask's own command-line tools.

`dask scheduler` and two `dask worker` processes on loopback, as on N nodes (docs/deploy.md);
`process_archive(..., dask_address=...)` runs against them, and the scheduler's task stream
shows which worker ran what: the studies' Prefect stages and their chunk work ran on both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
FAST = {"model": {"enabled": False}, "report": {"html": False, "dicom_seg": False, "dicom_sr": False}}
STAGES = {"discover", "process_study"}


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, what: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(log.read_text()[-2000:] for log in logs))


def test_flow_runs_on_both_workers_of_a_dask_cli_cluster(prefect_api, small_archive, tmp_path, stop_process_group):
    from distributed import Client
    from distributed.utils import key_split

    from flows.archive import process_archive

    # Workers run Prefect tasks: they need the same API (else each starts a temporary server).
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "TF_CPP_MIN_LOG_LEVEL": "2"}
    scheduler_file = tmp_path / "scheduler.json"
    logs = [tmp_path / "scheduler.log", tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    procs: list[subprocess.Popen] = []
    client = None
    try:
        # --port 0 picks a free port; the scheduler file tells us which.
        procs.append(start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                            "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
                           logs[0], env))
        info = wait_for(lambda: scheduler_file.is_file() and json.loads(scheduler_file.read_text() or "{}"),
                        "the scheduler file", procs, logs[:1])
        address = info["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for name, log in zip(("worker-a", "worker-b"), logs[1:]):
            procs.append(start([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                "--name", name, "--host", "127.0.0.1", "--no-dashboard"], log, env))
        client = Client(address, timeout=30)
        client.wait_for_workers(2, timeout=60)
        workers = {w["name"]: addr for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        assert set(workers) == {"worker-a", "worker-b"}
        client.get_task_stream(start=time.time())  # switch the scheduler's task stream on

        t0 = time.time()
        out = tmp_path / "out"
        run = process_archive(archive=str(small_archive["root"]), out=str(out), config=FAST,
                              dask_address=address)
        seconds = time.time() - t0

        assert run["status"] == "completed"
        assert {s["study_key"]: s["status"] for s in run["studies"]} == dict.fromkeys(small_archive["studies"], "ok")
        assert run["parameters"]["config"]["cluster"] == {**run["parameters"]["config"]["cluster"],
                                                         "kind": "address", "address": address}
        for key in small_archive["studies"]:
            assert json.loads((out / "studies" / key / "report.json").read_text())["status"] == "ok"

        # Who ran what, from the scheduler's own record of every task.
        stream = client.get_task_stream(start=t0)
        by_worker = {name: Counter(key_split(t["key"]) for t in stream if t["worker"] == addr)
                     for name, addr in workers.items()}
        stages = {name: {k: n for k, n in c.items() if k in STAGES} for name, c in by_worker.items()}
        print(f"run: {seconds:.1f} s; Prefect stages per worker: {stages}")
        print("all tasks per worker:", {name: sum(c.values()) for name, c in by_worker.items()})
        for name in workers:
            assert sum(by_worker[name].values()) > 0, f"{name} ran nothing: {by_worker}"
            assert stages[name], f"{name} ran no Prefect stage: {stages}"
        # Every study ran once (one task running its stages), across the two workers.
        total = Counter()
        for c in stages.values():
            total.update(c)
        n = len(small_archive["studies"])
        assert total["process_study"] == n, total
        # The existing cluster's dashboard is the one the run links to.
        assert run["dask"]["dashboard"] == client.dashboard_link, (run["dask"], client.dashboard_link)
    finally:
        if client is not None:
            client.close()
        for proc in reversed(procs):  # workers first, then the scheduler
            stop_process_group(proc, timeout=15)
