"""Helpers for the checks of deploy/: file loading, command extraction and CLI help look-ups.

A module of its own (not conftest.py), so that the tests import it by a unique name."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs" / "deploy.md"
BIN = Path(sys.executable).parent

# The programs whose command lines the deploy files and docs may name, and so must exist.
PROGRAMS = ("medpipe", "prefect", "dask")

# medpipe's CLI as agreed for issue 7, used while `medpipe --help` cannot run yet.
MEDPIPE_CLI = {
    "run": {"--out", "--workers", "--config", "--cluster", "--dask-address", "--force"},
    "plan": set(),
    "sample-archive": set(),
    "train": set(),
    "evaluate": {"--labels"},
    "serve": {"--archive", "--out", "--cron", "--timezone", "--config", "--name", "--port", "--allow-out-root"},
    "report-schema": set(),
}

# Options of `dask cuda worker` in dask-cuda 26.10 (dask_cuda/cli.py), used where dask-cuda is not
# installed (the `gpu` extra: the suite runs without it).
DASK_CUDA_WORKER_FLAGS = {
    "--host", "--worker-port", "--listen-address", "--contact-address", "--nthreads", "--name",
    "--memory-limit", "--device-memory-limit", "--rmm-pool-size", "--rmm-maximum-pool-size",
    "--rmm-managed-memory", "--rmm-async", "--set-rmm-allocator-for-libs", "--rmm-release-threshold",
    "--rmm-log-directory", "--rmm-track-allocations", "--pid-file", "--resources", "--dashboard",
    "--no-dashboard", "--dashboard-address", "--local-directory", "--scheduler-file", "--protocol",
    "--interface", "--preload", "--death-timeout", "--dashboard-prefix",
}


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def as_argv(value: str | list[str] | None) -> list[str]:
    """A compose/k8s command field as a list of words (a string is split like a shell would)."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a one-line ``sh -c`` script joined with ``&&``, ``||`` or ``;``."""
    words = shlex.split(script, comments=True)
    commands: list[list[str]] = [[]]
    for word in words:
        if word in {"&&", "||", ";"}:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def program_commands(argv: list[str]) -> list[list[str]]:
    """Commands of medpipe/prefect/dask in an argv, looking inside ``sh -c SCRIPT``."""
    if len(argv) >= 3 and Path(argv[0]).name in {"sh", "bash"} and argv[1] == "-c":
        found = []
        for script in argv[2:]:
            found += [c for c in shell_commands(script) if c[0] in PROGRAMS]
        return found
    return [argv] if argv and argv[0] in PROGRAMS else []


def text_commands(text: str) -> list[list[str]]:
    """Command lines in prose: fenced code, indented comment examples and `inline code`.

    Lines of fenced blocks and lines of ``#   cmd ...`` (a comment with two or more spaces, the
    deploy files' convention for examples) are joined over trailing backslashes. Inline code
    spans count when they start with one of the programs.
    """
    found: list[list[str]] = []
    lines: list[str] = []
    in_fence = False
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            lines.append(raw)
            continue
        m = re.match(r"\s*#\s{2,}(\S.*)$", raw)
        if m:
            lines.append(m.group(1))
        else:
            lines.append("")
        for span in re.findall(r"`([^`]+)`", raw):
            words = span.split()
            if words and words[0] in PROGRAMS and len(words) > 1:
                found.append(_split(span))
    joined: list[str] = []
    buf = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    for line in joined:
        words = _split(line)
        if words and words[0] in PROGRAMS:
            found += shell_commands_from_words(words)
    return [c for c in found if c]


def shell_commands_from_words(words: list[str]) -> list[list[str]]:
    commands: list[list[str]] = [[]]
    for word in words:
        if word in {"&&", "||", ";", "|"}:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c and c[0] in PROGRAMS]


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose: not a command line
        return []


@functools.lru_cache(maxsize=None)
def cli_help(program: str, *path: str) -> tuple[int, str]:
    """``PROGRAM PATH... --help``: its exit status and text (wide, so option names stay whole)."""
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.run(
        [str(BIN / program), *path, "--help"],
        capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
    )
    return proc.returncode, proc.stdout + proc.stderr


def lists_command(help_text: str, word: str) -> bool:
    """Whether a help text lists ``word`` as a subcommand (cyclopts boxes, click, argparse)."""
    pattern = re.compile(rf"^[\s│|]*{re.escape(word)}(?:\s|,|\(|$)", re.MULTILINE)
    choices = re.search(r"\{([\w,-]+)\}", help_text)
    return bool(pattern.search(help_text)) or bool(choices and word in choices.group(1).split(","))


def has_flag(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def medpipe_cli_runs() -> bool:
    code, _ = cli_help("medpipe")
    return code == 0
