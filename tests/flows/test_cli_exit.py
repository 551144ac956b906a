"""The ``medpipe`` command's exit status, as the console script gives it (``flows.cli.console``).

The command ends with ``os._exit`` once every exit handler has run (skipping the interpreter's
teardown); the status must still be the one ``main`` or argparse chose.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medpipe import __version__
from medpipe.outputs import EXIT_OK, EXIT_USAGE


def _command(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[2])


def test_version_and_help_exit_0() -> None:
    proc = _command(["--version"])
    assert proc.returncode == EXIT_OK and __version__ in proc.stdout
    assert _command(["run", "--help"]).returncode == EXIT_OK


@pytest.mark.parametrize("argv", [["run", "--no-such-option"], ["no-such-command"]])
def test_argparse_usage_errors_exit_2(argv: list[str]) -> None:
    proc = _command(argv)
    assert proc.returncode == EXIT_USAGE and "usage:" in proc.stderr


def test_a_refused_configuration_exits_2(tmp_path: Path) -> None:
    (tmp_path / "archive").mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text("filters: {pipelines: {CT: [{op: medain}]}}\n")
    proc = _command(["run", str(tmp_path / "archive"), "--out", str(tmp_path / "out"), "--config", str(bad)])
    assert proc.returncode == EXIT_USAGE and "medain" in proc.stderr
