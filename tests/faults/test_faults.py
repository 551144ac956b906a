"""Runs that lose workers, are stopped or killed, or run out of disk never lose or strip a result.

Each test does the fault for real (SIGKILL of a Dask worker process, SIGTERM or SIGKILL of the
run, a tmpfs that fills up), then checks the invariant (:func:`assert_outputs_true`) and that a
rerun finishes the work without redoing what was done.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from faults_helpers import assert_kept, assert_outputs_true, read_run, snapshot, write_archive

pytestmark = pytest.mark.slow


def statuses(out: Path) -> dict[str, str]:
    return {s["study_key"]: s["status"] for s in read_run(out)["studies"]}


def test_killed_workers_never_strip_or_lose_a_published_study(medpipe_run, tmp_path: Path) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    studies = write_archive(archive, 6)
    run = medpipe_run(archive, out, "--workers", "2")
    run.wait_for(lambda: run.published(), "a first published study")
    before = snapshot(out)
    rng = random.Random(0)
    for _ in range(3):  # three worker kills, a few seconds apart, while studies are in flight
        victims = run.workers()
        if victims and run.proc.poll() is None:
            rng.choice(victims).kill()
        time.sleep(3)
    rc = run.wait()
    result = assert_outputs_true(out)
    assert_kept(before, out)
    assert set(statuses(out)) == set(studies)
    failed = [s for s in result["studies"] if s["status"] == "failed"]
    assert rc == (1 if failed else 0), (rc, failed, run.tail())  # a study the kills cost is not "ok"

    done = snapshot(out)
    again = medpipe_run(archive, out, "--workers", "2")
    assert again.wait() == 0, again.tail()
    assert_outputs_true(out)
    assert set(statuses(out).values()) <= {"ok", "skipped"}
    for key, status in statuses(out).items():  # what was done is skipped, the rest is done now
        assert (status == "skipped") == (key in done and json.loads(
            (out / "studies" / key / "report.json").read_text())["provenance"]["run_id"] != read_run(out)["run_id"])
    assert_kept(done, out)


def test_sigterm_stops_cleanly_and_a_rerun_finishes(medpipe_run, tmp_path: Path) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    studies = write_archive(archive, 6)
    run = medpipe_run(archive, out, "--workers", "1")
    run.wait_for(lambda: run.published(), "a first published study")
    run.signal(signal.SIGTERM)
    rc = run.wait(timeout=120)
    assert rc == 128 + signal.SIGTERM, (rc, run.tail())
    result = assert_outputs_true(out)
    assert result["status"] == "interrupted"
    assert result["counts"]["ok"] >= 1 and result["counts"]["interrupted"] >= 1, result["counts"]
    assert set(statuses(out)) == set(studies)
    published = {p.name for p in run.published()}
    ok = {k for k, s in statuses(out).items() if s == "ok"}
    assert ok == published, (ok, published)  # true counts: ok is exactly what was published

    before = snapshot(out)
    again = medpipe_run(archive, out, "--workers", "2")
    assert again.wait() == 0, again.tail()
    assert_outputs_true(out)
    assert {k for k, s in statuses(out).items() if s == "skipped"} == ok
    assert {k for k, s in statuses(out).items() if s == "ok"} == set(studies) - ok
    assert_kept(before, out)


def test_a_sigkilled_run_leaves_a_record_of_its_own_and_the_next_run_repairs(medpipe_run, tmp_path: Path) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    studies = write_archive(archive, 2)
    first = medpipe_run(archive, out, "--workers", "2")
    assert first.wait() == 0, first.tail()
    old_id = read_run(out)["run_id"]
    studies.update(write_archive(archive, 4, first=2))
    run = medpipe_run(archive, out, "--workers", "2")
    run.wait_for(lambda: (out / ".work").is_dir() and read_run(out)["run_id"] != old_id, "the run's record")
    run.wait_for(lambda: any((out / ".work").rglob("image.zarr")), "a study in staging")
    run.proc.kill()
    run.wait()
    run.assert_no_process_left()
    record = assert_outputs_true(out, finished=False)
    assert record["run_id"] != old_id and record["status"] == "running"  # never the older run's claim

    before = snapshot(out)
    again = medpipe_run(archive, out, "--workers", "2")
    assert again.wait() == 0, again.tail()
    assert_outputs_true(out)
    assert set(statuses(out)) == set(studies) and set(statuses(out).values()) <= {"ok", "skipped"}
    assert_kept(before, out)


@pytest.fixture
def small_disk(tmp_path: Path):
    """An output folder on a tmpfs whose size the test sets (root only, as in CI)."""
    mnt = tmp_path / "out"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")

    def size(kib: int, remount: bool = True) -> None:
        opts = f"remount,size={kib}k" if remount else f"size={kib}k"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")

    size(8192, remount=False)
    yield mnt, size
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_loses_nothing_and_the_next_run_with_space_finishes(medpipe_run, small_disk, tmp_path: Path) -> None:
    out, size = small_disk
    archive = tmp_path / "archive"
    studies = write_archive(archive, 2)
    first = medpipe_run(archive, out, "--workers", "2")
    assert first.wait() == 0, first.tail()
    old_id = read_run(out)["run_id"]
    before = snapshot(out)
    used = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) // 1024
    size(used + 1024)  # room for about one more study, not four
    studies.update(write_archive(archive, 4, first=2))
    run = medpipe_run(archive, out, "--workers", "2")
    rc = run.wait()
    assert rc in (1, 3), (rc, run.tail())
    record = assert_outputs_true(out, finished=False)
    assert record["run_id"] != old_id, "an older run's record is left claiming to be this run's"
    assert_kept(before, out)
    assert not (out / ".work").exists() or not any((out / ".work").iterdir())  # a full disk stays full

    size(65536)
    again = medpipe_run(archive, out, "--workers", "2")
    assert again.wait() == 0, again.tail()
    assert_outputs_true(out)
    assert set(statuses(out)) == set(studies) and set(statuses(out).values()) <= {"ok", "skipped"}
    assert_kept(before, out)
