"""The pinned prefect/fastapi pair starts a real server (newer fastapi breaks prefect's server import)."""

from __future__ import annotations

import base64
import json
import urllib.request

import pytest

from flows.server import auth_string, prefect_server

pytestmark = pytest.mark.slow


def test_prefect_server_starts_and_answers(tmp_path) -> None:
    import prefect
    import prefect.server.api.server  # noqa: F401  (fails with fastapi>=0.160 and prefect 3.8)

    with prefect_server(tmp_path / "prefect-home") as api_url:
        assert api_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as resp:
            assert resp.status == 200
        # Basic auth is always on (issue 12): the string is in the server's home.
        token = base64.b64encode(auth_string(tmp_path / "prefect-home").encode()).decode()
        request = urllib.request.Request(f"{api_url}/admin/version", headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert json.loads(resp.read()) == prefect.__version__  # the pinned server answers
    with pytest.raises(OSError):  # stopped with the context: nothing left listening
        urllib.request.urlopen(f"{api_url}/health", timeout=2)
