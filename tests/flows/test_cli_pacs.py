"""``medpipe run`` / ``medpipe plan`` with a PACS as SOURCE: usage errors exit 2 before anything starts.

These run the real CLI as its own process, as users run it (in-process, Prefect's log handlers
left by earlier tests could write to streams pytest has closed); none of them reaches Prefect,
Dask or a PACS. The runs against a real Orthanc are in tests/pacs/test_pacs_run.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medpipe.outputs import EXIT_USAGE

URL = "dicomweb+http://127.0.0.1:9/dicom-web"  # port 9 (discard): nothing answers, nothing is reached


@pytest.mark.parametrize("argv, expected", [
    (["run", "http//nowhere:1", "--out", "{out}"], "archive folder not found"),
    (["run", "ftp://pacs:104/x", "--out", "{out}"], "ftp"),
    (["run", "dimse://pacs", "--out", "{out}"], "dimse"),
    (["run", "dicomweb+https://alice:s3cret@pacs:443/dicom-web", "--out", "{out}"], "credentials do not belong"),
    (["run", URL, "--out", "{out}", "--send", "dimse://@host:1"], "dimse"),
    (["run", URL, "--out", "{out}", "--since", "2026-11-02", "--until", "2026-11-01"], "is after"),
    (["run", URL, "--out", "{out}"], "--since"),
    (["plan", URL], "--since"),
    (["run", "{folder}", "--out", "{out}", "--since", "2026-11-01"], "PACS source"),
])
def test_usage_errors_exit_2(tmp_path: Path, argv: list[str], expected: str) -> None:
    folder = tmp_path / "archive"
    folder.mkdir()
    argv = [a.format(out=tmp_path / "out", folder=folder) for a in argv]
    status, err = _medpipe(argv)
    assert status == EXIT_USAGE, err
    assert err.startswith("medpipe: ") and expected.lower() in err.lower(), err
    assert "s3cret" not in err
    assert not (tmp_path / "out").exists(), "a refused run must not create its output folder"


def _medpipe(argv: list[str]) -> tuple[int, str]:
    """The exit status and stderr of ``medpipe ARGV``, run as its own process."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))",
                           *argv], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    return proc.returncode, proc.stderr


def test_bad_date_is_a_usage_error(tmp_path: Path) -> None:
    status, err = _medpipe(["run", URL, "--out", str(tmp_path), "--since", "1 Nov 2026"])
    assert status == EXIT_USAGE
    assert "YYYY-MM-DD" in err


@pytest.mark.parametrize("value, expected", [
    ({"username": "alice", "password": "s3cret-block"}, ("basic", "alice", "s3cret-block")),
    ("bob:pw-in-block", ("basic", "bob", "pw-in-block")),
])
def test_credentials_from_a_prefect_secret_block(prefect_api: str, value: object,
                                                 expected: tuple[str, str, str]) -> None:
    """pacs.auth.secret_block names a real Prefect Secret block; the task layer reads it."""
    import uuid

    from prefect.blocks.system import Secret

    from medpipe.config import Config
    from tasks.pacs import credentials

    name = f"pacs-{uuid.uuid4().hex[:8]}"
    Secret(value=value).save(name)
    creds = credentials(Config.model_validate({"pacs": {"auth": {"kind": "basic", "secret_block": name}}}))
    assert (creds.kind, creds.username, creds.password) == expected
    assert expected[2] not in repr(creds)


def test_a_missing_secret_block_is_a_clear_error(prefect_api: str) -> None:
    from medpipe.config import Config
    from medpipe.errors import ConfigError
    from tasks.pacs import credentials

    cfg = Config.model_validate({"pacs": {"auth": {"kind": "bearer", "secret_block": "no-such-block"}}})
    with pytest.raises(ConfigError, match="no-such-block"):
        credentials(cfg)
