"""A whole run over an archive of hostile files: each is named with its reason, nothing else suffers.

The archive holds memory bombs (huge Rows x Columns over a few bytes, native and compressed),
non-finite and unparseable rescale values, conflicting duplicates, a path longer than PATH_MAX,
names that are not UTF-8 or hold control characters, and folders named after a patient, beside
good studies. Workers run under a memory limit that any real allocation of a bomb would break.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from faults_helpers import assert_outputs_true, read_run, snapshot, write_archive

sys.path.insert(0, str(Path(__file__).parents[1] / "ingest"))
import hostile_files  # noqa: E402

pytestmark = pytest.mark.slow
PATIENT_FOLDER = "Doe^Jane_MRN4711X"  # no secret made of digits alone: UIDs are digits


def test_a_hostile_archive_is_named_file_by_file_and_good_studies_are_done(medpipe_run, tmp_path: Path) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    hostile = hostile_files.hostile_archive(archive / "hostile")
    good = write_archive(archive / PATIENT_FOLDER, 2)  # a patient's name in the folder, good files in it
    junk = [archive / os.fsdecode(b"not-utf8-\xff\xfe.dcm"), archive / "control\x07\x1bchars.dcm",
            archive / PATIENT_FOLDER / "notes.txt"]
    for p in junk:
        p.write_bytes(b"not a DICOM file")
    config = tmp_path / "config.yaml"
    config.write_text("cluster: {memory_limit: 1.5GiB}\n")

    run = medpipe_run(archive, out, "--workers", "2", "--config", str(config))
    rc = run.wait()
    result = assert_outputs_true(out)
    assert rc in (0, 1), (rc, run.tail())
    assert (rc == 1) == any(s["status"] == "failed" for s in result["studies"])
    statuses = {s["study_key"]: s["status"] for s in result["studies"]}
    for key in good:
        assert statuses[key] == "ok", (key, result["studies"])
    text = json.dumps(result)
    assert "KilledWorker" not in text and "MemoryError" not in text, text[:2000]

    # Every hostile file is named with a reason in the operator's log, by path relative to the archive.
    log_lines = [json.loads(line) for line in (out / "private" / "file-issues.jsonl").read_text().splitlines()]
    named = {e["path"]: e for e in log_lines}
    for kind, files in hostile.items():
        if kind == "good":
            continue
        for f in files:
            rel = os.path.relpath(f, archive)
            hits = [p for p in named if p == rel or rel.startswith(p)]  # a too-long path: its deepest folder
            assert hits, f"{kind}: {rel} not named; named: {sorted(named)[:20]}"
            assert named[hits[0]]["reason"]
    for p in junk:
        assert any(e["path"] == hostile_files_printable(p, archive) for e in log_lines), p
    # ... and by token only in the de-identified outputs: no path, no name from the folders.
    tokens = {e["file_id"] for e in log_lines}
    assert {i["file_id"] for i in result["issues"]} <= tokens
    for f in out.rglob("*"):
        if f.is_file() and "private" not in f.relative_to(out).parts:
            data = f.read_bytes()
            for secret in (b"Doe^Jane", b"MRN4711X", b"hostile/"):
                assert secret not in data, f"{secret!r} in {f.relative_to(out)}"
    assert "Doe" not in (out / "run.html").read_text()

    done = snapshot(out)
    again = medpipe_run(archive, out, "--workers", "2", "--config", str(config))
    assert again.wait() == rc, again.tail()
    second = {s["study_key"]: s["status"] for s in read_run(out)["studies"]}
    assert all(second[k] == "skipped" for k in done if statuses.get(k) == "ok"), second


def hostile_files_printable(path: Path, archive: Path) -> str:
    from medpipe.privacy import printable

    return printable(os.path.relpath(path, archive))
