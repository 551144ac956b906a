"""``medpipe run`` / ``medpipe plan`` with a PACS as SOURCE: usage errors exit 2 before anything starts.

These run the real CLI in-process (``flows.cli.main``); none of them reaches Prefect, Dask or a
PACS, so each takes milliseconds. The runs against a real Orthanc are in tests/pacs/test_pacs_run.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import main
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
def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                             expected: str) -> None:
    folder = tmp_path / "archive"
    folder.mkdir()
    argv = [a.format(out=tmp_path / "out", folder=folder) for a in argv]
    assert _status(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("medpipe: ") and expected.lower() in err.lower(), err
    assert "s3cret" not in err
    assert not (tmp_path / "out").exists(), "a refused run must not create its output folder"


def _status(argv: list[str]) -> int:
    """The exit status of ``medpipe ARGV`` (a refused configuration exits through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_bad_date_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", URL, "--out", str(tmp_path), "--since", "1 Nov 2026"])
    assert exc.value.code == EXIT_USAGE
    assert "YYYY-MM-DD" in capsys.readouterr().err
