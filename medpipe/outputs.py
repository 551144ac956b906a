"""The output folder: where each study's files go, how they are published, when they are current.

Layout (the output contract, docs/output-contract.md)::

    OUT/run.json                     the last run: parameters, versions, per-study status
    OUT/run.html                     the same for people
    OUT/studies/<study-key>/         one folder per study, replaced whole when redone
        image.zarr  report.json  report.html  seg.dcm  sr.dcm  saliency/
    OUT/.work/<run-id>/<study-key>/  staging while a run works (never read as results)
    OUT/.medpipe.lock                held by the run that is writing OUT

A study folder under ``studies/`` is only ever complete: stages write into the staging folder
and :func:`medpipe.publish.publish_study` verifies it and swaps it into place. A run killed
half-way leaves only ``.work``, which the next run removes.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import MedpipeError

# ``deferred``: a PACS study not complete yet (a series still arriving or short); a later run takes it up.
STATUSES = ("ok", "failed", "skipped", "interrupted", "deferred")
EXIT_OK, EXIT_STUDY_FAILED, EXIT_USAGE, EXIT_RUN_FAILED = 0, 1, 2, 3


@dataclass(frozen=True)
class OutputLayout:
    """Paths under an output folder.

    >>> lay = OutputLayout(Path("/out"))
    >>> lay.study("ab12").as_posix(), lay.staging("r1", "ab12").as_posix()
    ('/out/studies/ab12', '/out/.work/r1/ab12')
    """

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def studies(self) -> Path:
        return self.root / "studies"

    @property
    def work(self) -> Path:
        return self.root / ".work"

    @property
    def lock(self) -> Path:
        return self.root / ".medpipe.lock"

    def study(self, key: str) -> Path:
        return self.studies / key

    def staging(self, run_id: str, key: str) -> Path:
        return self.work / run_id / key


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a random suffix."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class OutputLockedError(MedpipeError):
    """Another live run is writing the same output folder."""


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.medpipe.lock`` for the duration of a run.

    A lock left by a process that no longer runs (a killed run) is taken over.
    """
    layout = OutputLayout(Path(out))
    layout.root.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}
    try:
        fd = os.open(layout.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        holder = _read_lock(layout.lock)
        if holder and holder.get("host") == me["host"] and _alive(int(holder.get("pid", -1))):
            raise OutputLockedError(
                f"{layout.root}: another medpipe run (pid {holder['pid']}, since {holder.get('since')}) "
                "is writing this output folder"
            ) from None
        layout.lock.unlink(missing_ok=True)  # stale: its process is gone
        fd = os.open(layout.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
    except OSError:  # a full disk: the lock is held by the file's existence; an empty one reads as stale
        pass
    try:
        yield
    finally:
        layout.lock.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_work(out: Path, keep_run: str | None = None) -> None:
    """Remove staging folders of earlier (finished or killed) runs.

    Also finishes a folder swap that a killed run left half-done (where the file system cannot
    exchange folders atomically, the old study folder is renamed aside first): an old folder
    whose study folder is missing is put back, any other is removed.
    """
    layout = OutputLayout(Path(out))
    if layout.work.is_dir():
        for entry in layout.work.iterdir():
            if entry.name.split(".")[0] == keep_run:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:  # a run's publishing lock and mark (medpipe.publish)
                entry.unlink(missing_ok=True)
    if layout.studies.is_dir():
        for entry in layout.studies.glob(".*.old-*"):
            study = layout.studies / entry.name[1:].rsplit(".old-", 1)[0]
            if study.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.replace(entry, study)


def input_fingerprint(plan_fingerprint: str, config_fingerprint: str, model_sha256: str | None) -> str:
    """What a study's outputs depend on: its files, the configuration, the model, medpipe's version."""
    parts = [plan_fingerprint, config_fingerprint, model_sha256 or "-", __version__]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def exit_code(studies: list[dict[str, Any]]) -> int:
    """0 when no study failed, 1 when any did (see docs/cli.md); ``deferred`` studies are not failures."""
    return EXIT_STUDY_FAILED if any(s.get("status") == "failed" for s in studies) else EXIT_OK


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"medpipe": __version__}
    for name in ("prefect", "dask", "distributed", "zarr", "numpy", "scipy", "scikit-image",
                 "pydicom", "highdicom", "tensorflow-cpu", "tensorflow", "keras", "cupy-cuda12x", "dask-cuda"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return tuple(out.items())


def versions() -> dict[str, str]:
    """Versions of medpipe and the packages whose behaviour shapes the outputs (read once)."""
    return dict(_versions())
