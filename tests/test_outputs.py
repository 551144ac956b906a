"""The output folder's bookkeeping: locks, fingerprints, publishing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from medpipe.atomic import staging_dir, write_json
from medpipe.outputs import (
    OutputLayout,
    OutputLockedError,
    clean_work,
    exit_code,
    input_fingerprint,
    run_lock,
)
from medpipe.publish import published_fingerprint, publish_study


def test_run_lock_excludes_a_live_run_and_takes_over_a_dead_one(tmp_path) -> None:
    with run_lock(tmp_path):
        with pytest.raises(OutputLockedError, match="another medpipe run"):
            with run_lock(tmp_path):
                pass
    assert not OutputLayout(tmp_path).lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    OutputLayout(tmp_path).lock.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    with run_lock(tmp_path):  # the killed run's lock is stale
        pass


def test_fingerprint_changes_with_each_input() -> None:
    base = input_fingerprint("files", "config", "model")
    assert base == input_fingerprint("files", "config", "model")
    assert len({base, input_fingerprint("files2", "config", "model"),
                input_fingerprint("files", "config2", "model"), input_fingerprint("files", "config", None)}) == 4


def test_only_successful_studies_count_as_done(tmp_path) -> None:
    folder = OutputLayout(tmp_path).study("abc")
    write_json(folder / "report.json", {"status": "failed", "outputs": {"json": "report.json"},
                                        "provenance": {"input_fingerprint": "f"}})
    assert published_fingerprint(folder)[0] is None
    write_json(folder / "report.json", {"status": "ok", "outputs": {"json": "report.json"},
                                        "provenance": {"input_fingerprint": "f"}})
    assert published_fingerprint(folder)[0] is None  # "ok" without its image is not done
    (folder / "report.json").write_text("{truncated")
    assert published_fingerprint(folder)[0] is None


def test_publish_replaces_whole_folder_and_drops_intermediates(tmp_path) -> None:
    final = tmp_path / "studies" / "k"
    (final / "old.txt").parent.mkdir(parents=True)
    (final / "old.txt").write_text("old")
    staging = tmp_path / ".work" / "r1" / "k"
    (staging / "filtered.zarr").mkdir(parents=True)
    write_json(staging / "report.json", {"status": "failed", "outputs": {"json": "report.json"}})
    publish_study(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json", "report.json"]
    assert not staging.exists()


def test_failed_staging_leaves_nothing(tmp_path) -> None:
    with pytest.raises(RuntimeError):
        with staging_dir(tmp_path / "study") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_clean_work_keeps_current_run(tmp_path) -> None:
    layout = OutputLayout(tmp_path)
    for run in ("old", "current"):
        (layout.work / run / "k").mkdir(parents=True)
    clean_work(tmp_path, keep_run="current")
    assert [p.name for p in layout.work.iterdir()] == ["current"]


def test_exit_code() -> None:
    assert exit_code([{"status": "ok"}, {"status": "skipped"}]) == 0
    assert exit_code([{"status": "ok"}, {"status": "failed"}]) == 1
