"""Shared fixtures. Tests mirror the package layout and build small real inputs in tmp dirs.

The Prefect server of the end-to-end tests is one real ``prefect server start`` per test
session, started only when a test asks for it (tests/faults starts one of its own).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Quiet TensorFlow's C++ logging and keep it from grabbing every core in each test process.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# --------------------------------------------------------------------------- the Prefect server
@pytest.fixture(scope="session")
def prefect_server_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PREFECT_HOME of the session's server (its generated ``auth-string`` lives there)."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="session")
def prefect_auth(prefect_server_home: Path) -> str:
    """The ``user:password`` string the session's server requires (made in its home, 0600)."""
    from flows.server import auth_string

    return auth_string(prefect_server_home)


@pytest.fixture(scope="session")
def prefect_server_url(prefect_server_home: Path, prefect_auth: str) -> Iterator[str]:
    """API URL of a `prefect server start` (loopback, SQLite, UI on, basic auth) shared by the session."""
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    from flows.server import flush_prefect_logs, prefect_server

    with prefect_server(prefect_server_home, ui=True, auth=prefect_auth) as url:
        try:
            yield url
        finally:
            # Send this process's queued logs while the server still answers (with the auth string).
            with temporary_settings(updates={PREFECT_API_AUTH_STRING: prefect_auth}):
                flush_prefect_logs()


@pytest.fixture
def prefect_api(prefect_server_url: str, prefect_auth: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The session server's API URL and auth string, set for this process and every process it starts."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server_url)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", prefect_auth)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server_url, PREFECT_API_AUTH_STRING: prefect_auth}):
        yield prefect_server_url
