"""Helpers of the fault-injection tests: a tracked ``medpipe run`` process and the outputs' invariant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 420.0


def write_archive(dest: Path, n_studies: int, first: int = 0) -> dict[str, Path]:
    """Small CT phantom studies (16 x 64 x 64) numbered from ``first``; returns {study_key: folder}."""
    from medpipe.keys import study_key
    from medpipe.phantom import ct_phantom
    from medpipe.sample import stable_uid, write_series

    studies = {}
    for i in range(first, first + n_studies):
        ph = ct_phantom(shape=(16, 64, 64), n_lesions=1, seed=i)
        uid = stable_uid("medpipe-test-faults", i)
        folder = dest / f"patient-{i}" / "ct"
        write_series(ph.hu, ph.spacing, folder, modality="CT", study_uid=uid,
                     series_uid=stable_uid("medpipe-test-faults-series", i), patient_id=f"FAULT-{i}",
                     intercept=-1024.0, series_description="CHEST")
        studies[study_key(uid)] = folder
    return studies


class RunProcess:
    """``medpipe run ARCHIVE --out OUT`` as a subprocess, with a record of every process it starts."""

    def __init__(self, archive: Path, out: Path, env: dict[str, str], *args: str, log: Path):
        self.out, self.log = out, log
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        cmd = [str(BIN / "medpipe"), "run", str(archive), "--out", str(out), *args]
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.family: dict[int, psutil.Process] = {}
        self._watch = threading.Thread(target=self._follow, daemon=True)
        self._watch.start()

    def _follow(self) -> None:
        """Note every descendant as it appears (a killed parent's children are re-parented)."""
        try:
            me = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return
        while self.proc.poll() is None:
            try:
                for p in me.children(recursive=True):
                    self.family.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.1)

    def workers(self) -> list[psutil.Process]:
        """The Dask worker processes alive now."""
        return [p for p in self.family.values() if alive(p) and "spawn_main" in cmdline(p)]

    def wait_for(self, predicate, what: str, timeout: float = RUN_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended ({self.proc.returncode}) before {what}:\n{self.tail()}")
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")

    def published(self) -> list[Path]:
        return sorted(p.parent for p in (self.out / "studies").glob("*/manifest.json"))

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the run did not end within {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        """Kill whatever is left (the test failed already)."""
        for p in [psutil.Process(self.proc.pid), *self.family.values()] if self.proc.poll() is None else self.family.values():
            try:
                p.kill()
            except psutil.Error:
                pass

    def assert_no_process_left(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = [p for p in self.family.values() if alive(p)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        if left:
            names = [f"{p.pid} {cmdline(p)[:80]}" for p in left]
            self.stop()
            pytest.fail(f"processes left behind by the run: {names}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return "?"


# --------------------------------------------------------------------------- the invariant
def read_run(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text())


def snapshot(out: Path) -> dict[str, dict[str, int]]:
    """Each published study's manifest (file -> size): what a later run must not lose."""
    return {p.parent.name: json.loads(p.read_text())["files"] for p in (out / "studies").glob("*/manifest.json")}


def assert_outputs_true(out: Path, *, finished: bool = True) -> dict[str, Any]:
    """Every published study is complete and readable; run.json is this run's and tells the truth."""
    from medpipe.outputs import STATUSES
    from medpipe.publish import check_published, read_report, verify_study

    run = read_run(out)
    for folder in sorted((out / "studies").glob("*")):
        assert not folder.name.startswith("."), f"left over from a swap: {folder}"
        assert verify_study(folder) == [], (folder.name, verify_study(folder))
        assert check_published(folder) == [], (folder.name, check_published(folder))
    if not finished:
        return run
    counts = Counter(s["status"] for s in run["studies"])
    assert run["counts"] == {s: counts.get(s, 0) for s in STATUSES}, run["counts"]
    for s in run["studies"]:
        doc = read_report(out / "studies" / s["study_key"])
        if s["status"] == "ok":
            assert doc is not None and doc["status"] == "ok", s
        if s["status"] == "interrupted" and doc is not None:  # an earlier run's result, never this run's
            assert doc["provenance"]["run_id"] != run["run_id"], s
    assert not (out / ".medpipe.lock").exists()
    assert not (out / ".work").exists() or not any((out / ".work").iterdir()), list((out / ".work").iterdir())
    return run


def assert_kept(before: dict[str, dict[str, int]], out: Path) -> None:
    """Every study published before is still published, file for file (nothing lost or stripped)."""
    after = snapshot(out)
    for key, files in before.items():
        assert key in after, f"study {key} was lost"
        missing = set(files) - set(after[key])
        assert not missing, f"study {key} was stripped of {sorted(missing)[:5]}"
