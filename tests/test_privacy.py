"""Paths of archive files: keyed tokens in de-identified outputs, the paths in the operator's log only."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from medpipe.privacy import PathRedactor, append_log, load_key, printable


def test_tokens_are_keyed_stable_and_relative_to_the_archive(tmp_path: Path) -> None:
    key = load_key(tmp_path)
    assert load_key(tmp_path) == key  # kept, not remade
    a = PathRedactor(key, "/data/archive")
    b = PathRedactor(key, "/mnt/copy/archive")
    c = PathRedactor(os.urandom(32), "/data/archive")
    path = "/data/archive/Doe^Jane_123/1.dcm"
    assert a.token(path) == b.token("/mnt/copy/archive/Doe^Jane_123/1.dcm")  # the archive may move
    assert a.token(path) != c.token(path)  # without the key, no dictionary attack on names
    assert a.token(path) != a.token("/data/archive/Doe^Jane_123/2.dcm")


def test_key_and_log_are_owner_only(tmp_path: Path) -> None:
    load_key(tmp_path)
    log = append_log(tmp_path, "r1", [{"file_id": "f-1", "path": "a", "reason": "x"}])
    for p in (tmp_path / "private", tmp_path / "private" / "path-key", log):
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p


def test_issues_and_texts_lose_their_paths(tmp_path: Path) -> None:
    r = PathRedactor.for_output(tmp_path, "/archive")
    path = "/archive/Doe^Jane_123/scan 1.dcm"
    public, private = r.issue({"path": path, "reason": f"{path}: truncated pixel data", "study_key": "k"})
    assert "Doe" not in json.dumps(public)
    assert public["path"] == public["file_id"] == private["file_id"] == r.token(path)
    assert private["path"] == "Doe^Jane_123/scan 1.dcm" and private["study_key"] == "k"
    record = {"error": f"ingest: InputError: {path}: bad", "issues": [{"path": path, "reason": "x"}],
              "warnings": ["dropped slice /archive/Doe^Jane_123/other.dcm: duplicate position"]}
    clean = r.deep(record, known=[path])
    assert "Doe" not in json.dumps(clean), clean
    assert clean["issues"][0]["file_id"] == r.token(path)


def test_any_file_name_can_be_written(tmp_path: Path) -> None:
    name = os.fsdecode(b"/archive/bad\xff\x07name\n.dcm")
    text = printable(name)
    assert text.isprintable() and "\\xff" in text and "\\x07" in text and "\\n" in text
    r = PathRedactor(b"k" * 32, "/archive")
    public, private = r.issue({"path": name, "reason": "not a DICOM file"})
    log = append_log(tmp_path, "r1", [private])
    assert json.loads(log.read_text().splitlines()[-1])["path"] == "bad\\xff\\x07name\\n.dcm"
    json.dumps(public).encode("utf-8")  # no surrogate survives into the de-identified form
