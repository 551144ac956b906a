"""run.json and run.html are written whatever happens; on a full disk, what fits, never an old record."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from medpipe.report.run import write_run_record


def run_record(run_id: str, n: int) -> dict:
    studies = [{"study_key": f"{i:016x}", "status": "ok", "error": None, "output": f"studies/{i:016x}",
                "modality": "CT", "seconds": 1.0, "findings": "x" * 200} for i in range(n)]
    return {"run_id": run_id, "started": "s", "finished": "f", "seconds": 1.0, "status": "completed",
            "counts": {"ok": n}, "studies": studies, "issues": [], "versions": {}, "parameters": {}}


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (a disk that fills up); needs root, as CI has."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> None:
    fd = os.open(folder / "ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while os.write(fd, b"\0" * 1024):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_disk_gets_a_short_true_record_and_the_next_run_repairs_it(tiny_tmpfs: Path) -> None:
    assert write_run_record(tiny_tmpfs, run_record("old-run", 10)) == []
    fill(tiny_tmpfs)
    problems = write_run_record(tiny_tmpfs, run_record("new-run", 200))
    assert problems and "No space left" in problems[0]
    doc = json.loads((tiny_tmpfs / "run.json").read_text())
    assert doc["run_id"] == "new-run" and doc["record_incomplete"]  # never the old run's record
    html = (tiny_tmpfs / "run.html").read_text() if (tiny_tmpfs / "run.html").exists() else "new-run"
    assert "old-run" not in html
    (tiny_tmpfs / "ballast").unlink()
    assert write_run_record(tiny_tmpfs, run_record("next-run", 10)) == []
    assert json.loads((tiny_tmpfs / "run.json").read_text())["counts"] == {"ok": 10}


def test_no_room_at_all_removes_the_old_record(tiny_tmpfs: Path) -> None:
    fill(tiny_tmpfs)
    write_run_record(tiny_tmpfs, run_record("new-run", 5))  # nothing fits, there was nothing
    assert not (tiny_tmpfs / "run.json").exists() or json.loads((tiny_tmpfs / "run.json").read_text())["run_id"] == "new-run"


def test_names_with_any_bytes_are_written(tmp_path: Path) -> None:
    run = run_record("r", 1)
    run["issues"] = [{"path": os.fsdecode(b"bad\xffname\x07"), "reason": "not a DICOM file"}]
    assert write_run_record(tmp_path, run) == []
    assert "not a DICOM file" in (tmp_path / "run.html").read_text()
