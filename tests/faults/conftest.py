"""Fault injection: real ``medpipe run`` processes that are killed, starved and fed hostile files.

Every run is a real ``medpipe run`` subprocess (its own Dask cluster of worker processes) against
one Prefect server shared by these tests. :class:`RunProcess` keeps track of every process the
run starts, so that a test can kill one of them and check afterwards that none is left.
:func:`assert_outputs_true` is the invariant every test ends with: whatever happened, every
published study is complete and readable and ``run.json`` tells the truth about it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults_helpers import RunProcess


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """What a ``medpipe run`` process needs to use a Prefect server of the fault tests' own.

    Not the session server of tests/flows: killed runs leave that server's SQLite busy with
    their late events for a while, which made the UI test there fail to submit a run.
    """
    from flows.server import auth_string, prefect_server

    home = tmp_path_factory.mktemp("prefect-faults")
    auth = auth_string(home)
    with prefect_server(home, auth=auth) as url:
        yield {"PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth}


@pytest.fixture
def medpipe_run(prefect_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """``medpipe_run(archive, out, *args)``: start a run; every run is stopped and checked for leftovers."""
    runs: list[RunProcess] = []

    def start(archive: Path, out: Path, *args: str) -> RunProcess:
        run = RunProcess(archive, out, prefect_env, *args, log=tmp_path / f"run-{len(runs)}.log")
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.stop()
        run.assert_no_process_left()


