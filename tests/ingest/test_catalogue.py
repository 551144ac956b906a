"""The discovery catalogue: planning is the same with and without it, whatever changed between runs."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat

import pytest
from ingest_helpers import ramp_volume

from medpipe.config import IngestConfig
from medpipe.ingest import catalogue_path, plan_studies, scan_archive
from medpipe.ingest.catalogue import Catalogue
from medpipe.sample import write_series


def _archive(root, n_studies: int = 3):
    for k in range(n_studies):
        write_series(ramp_volume((3, 8, 8), seed=k), (2.0, 1.0, 1.0), root / f"s{k}", study_uid=f"1.2.3.{k}")
    (root / "junk").mkdir()
    (root / "junk" / "notes.txt").write_text("not DICOM\n" * 20)
    (root / "junk" / "empty.dcm").write_bytes(b"")
    return root


def _plans(scan, cfg):
    return [p.to_dict() for p in plan_studies(scan, cfg)]


def _same(root, cat, cfg):
    """Scan with the catalogue; assert it equals a scan without one; return the scan."""
    with_cat = scan_archive(root, cfg, catalogue=cat)
    plain = scan_archive(root, cfg)
    assert with_cat.instances == plain.instances
    assert with_cat.issues == plain.issues
    assert with_cat.n_files == plain.n_files
    assert _plans(with_cat, cfg) == _plans(plain, cfg)
    return with_cat


def _patch(path, old: bytes, new: bytes) -> None:
    """Rewrite the file with ``old`` replaced by ``new`` (same length: same size)."""
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def cfg():
    return IngestConfig()


def test_unchanged_files_are_not_read_again(tmp_path, cfg):
    root, cat = _archive(tmp_path / "a"), catalogue_path(tmp_path / "out", tmp_path / "a")
    _same(root, cat, cfg)
    assert cat.is_file() and stat.S_IMODE(cat.stat().st_mode) == 0o600
    assert stat.S_IMODE(cat.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(cat.parent.parent.stat().st_mode) == 0o700  # OUT/private
    warm = Catalogue.load(cat, root, cfg)
    assert len(warm.rows) == len(_files(root))  # every file, issues included
    again = scan_archive(root, cfg, catalogue=cat)
    assert again.n_read == 0 and again.n_files == len(_files(root))


def test_changed_added_and_removed_files(tmp_path, cfg):
    root, cat = _archive(tmp_path / "a"), catalogue_path(tmp_path / "out", tmp_path / "a")
    _same(root, cat, cfg)
    s0 = sorted((root / "s0").iterdir())
    s1 = sorted((root / "s1").iterdir())
    # same size, new mtime, new content: the file moves to another study
    size = s0[0].stat().st_size
    _patch(s0[0], b"1.2.3.0", b"1.2.3.7")
    assert s0[0].stat().st_size == size
    # rewritten content with the old size and mtime put back (its ctime still changes)
    st = s0[1].stat()
    _patch(s0[1], b"1.2.3.0", b"1.2.3.8")
    os.utime(s0[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (s0[1].stat().st_size, s0[1].stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    # truncated: a good file becomes an issue
    s1[0].write_bytes(s1[0].read_bytes()[:-50])
    # removed, added (a new study and a new file in an old series), a bad file repaired
    s1[1].unlink()
    write_series(ramp_volume((2, 8, 8), seed=9), (2.0, 1.0, 1.0), root / "s9", study_uid="1.2.3.9")
    shutil.copy(s0[2], root / "s0" / "copy.dcm")
    (root / "junk" / "empty.dcm").unlink()
    scan = _same(root, cat, cfg)
    assert scan.n_read == 3 + 2 + 1  # changed (s0[0], s0[1], s1[0]), new study, copy
    by_path = {i.path: i for i in scan.instances}
    assert by_path[str(s0[0])].study_uid == "1.2.3.7" and by_path[str(s0[1])].study_uid == "1.2.3.8"
    assert any(i.path == str(s1[0]) and i.reason.startswith("truncated") for i in scan.issues)
    rows = Catalogue.load(cat, root, cfg).rows
    assert os.path.relpath(s1[1], root) not in rows and "junk/empty.dcm" not in rows
    assert "s0/copy.dcm" in rows and len(rows) == len(_files(root))
    assert _same(root, cat, cfg).n_read == 0  # and once more, warm


def test_catalogue_voided_by_header_configuration(tmp_path):
    root, cat = _archive(tmp_path / "a"), catalogue_path(tmp_path / "out", tmp_path / "a")
    _same(root, cat, IngestConfig())
    small = IngestConfig(max_series_voxels=100)  # every 8x8 file now claims too much
    scan = _same(root, cat, small)
    assert not scan.instances and scan.issues and scan.n_read == scan.n_files
    salted = IngestConfig(uid_salt="other")  # study keys of issues change
    assert _same(root, cat, salted).n_read == len(_files(root))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "bad-row", "foreign-db"])
def test_damaged_catalogue_is_ignored_with_a_warning(tmp_path, cfg, caplog, damage):
    root, cat = _archive(tmp_path / "a"), catalogue_path(tmp_path / "out", tmp_path / "a")
    _same(root, cat, cfg)
    data = cat.read_bytes()
    if damage == "truncate":
        cat.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        cat.write_bytes(b"\x00garbage" * 500)
    elif damage == "empty":
        cat.write_bytes(b"")
    elif damage == "bad-row":
        with sqlite3.connect(cat) as con:
            con.execute("UPDATE files SET record = 'I[1,2' WHERE rel LIKE 's0/%'")
            con.execute("UPDATE files SET record = 'I[1,2]' || char(10) || '[1]' WHERE rel LIKE 's1/%'")
            con.execute("UPDATE files SET record = 'F[1]' WHERE rel LIKE 'junk/%'")
    else:
        cat.unlink()
        with sqlite3.connect(cat) as con:
            con.execute("CREATE TABLE files (x)")
    with caplog.at_level(logging.WARNING, logger="medpipe.ingest.catalogue"):
        _same(root, cat, cfg)
    assert "discovery catalogue" in caplog.text and "ignored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medpipe.ingest.catalogue"):
        assert _same(root, cat, cfg).n_read == 0  # rebuilt: warm again, silent
    assert "ignored" not in caplog.text


def test_catalogue_of_another_archive_is_not_used(tmp_path, cfg, caplog):
    a, b = _archive(tmp_path / "a", 2), tmp_path / "b"
    shutil.copytree(a, b, copy_function=shutil.copy2)
    out = tmp_path / "out"
    assert catalogue_path(out, a) != catalogue_path(out, b)  # one OUT, two archives: one catalogue each
    _same(a, catalogue_path(out, a), cfg)
    shutil.copy(catalogue_path(out, a), catalogue_path(out, b))  # a's catalogue where b's should be
    with caplog.at_level(logging.WARNING, logger="medpipe.ingest.catalogue"):
        scan = _same(b, catalogue_path(out, b), cfg)
    assert "another archive" in caplog.text
    assert all(i.path.startswith(str(b)) for i in scan.instances)


def test_relative_root_and_unreadable_file(tmp_path, cfg, monkeypatch):
    root = _archive(tmp_path / "a", 1)
    monkeypatch.chdir(root)
    cat = catalogue_path(tmp_path / "out", ".")
    _same(".", cat, cfg)
    locked = root / "s0" / sorted(os.listdir(root / "s0"))[0]
    os.chmod(locked, 0)
    try:
        scan = _same(".", cat, cfg)
        if os.geteuid() != 0:
            assert any(i.reason.startswith("cannot open file") for i in scan.issues)
    finally:
        os.chmod(locked, 0o644)
    scan = _same(".", cat, cfg)  # an access problem is not kept: readable again, read again
    assert not any(i.reason.startswith("cannot open file") for i in scan.issues)


def test_names_that_are_not_utf8(tmp_path, cfg):
    """A file whose name is not UTF-8 is read every night (SQLite cannot hold its name); the
    others are remembered, and planning is the same as without a catalogue."""
    root = _archive(tmp_path / "archive", n_studies=2)
    odd = os.fsdecode(bytes(tmp_path / "archive" / "s0") + b"/b\xff\x01.dcm")
    shutil.copy(_files(root / "s0")[0], odd)
    cat = catalogue_path(tmp_path / "out", root)
    _same(root, cat, cfg)
    again = _same(root, cat, cfg)
    assert again.n_read == 1
