"""The discovery catalogue: what each archive file's header said, keyed by what ``stat`` says of it.

A night with nothing new should cost a ``stat`` per file, not a header read. The catalogue maps
each file's path relative to the archive and its stat key (size, mtime_ns, inode, ctime_ns) to the
record discovery made of it: an :class:`~.scan.Instance`, or the :class:`~.scan.FileIssue` of an
unusable file. :func:`~.scan.scan_archive` stats every file, reuses the record of a file whose key
is unchanged and reads only the headers of new or changed files; removed files drop out.

The ctime is part of the key because it cannot be set from user space: content rewritten with
the same size and its mtime put back (``touch -d``, ``cp -p``, ``rsync -t``) still changes it.

Format: one SQLite database per archive, ``OUT/private/catalogue/<archive-key>.sqlite``.
SQLite loads a million rows in seconds with the standard library alone, detects a truncated or
foreign file (``DatabaseError``) instead of returning garbage, and a transaction updates it
atomically in place, so that a night writes only the rows of what changed (a fresh catalogue is
built in a temporary file and renamed). Each row holds the stat key in integer columns and the
record as a compact JSON array (no pickle: nothing in the file can run code).

Validity: a ``meta`` table holds the archive's real path and a fingerprint of everything that
shapes a record (:func:`header_fingerprint`: medpipe's and pydicom's versions, the source of the
header reader, ``ingest.max_series_voxels``, ``ingest.on_nonfinite``, ``ingest.uid_salt``). A catalogue that
is damaged, truncated, foreign, of another archive or of another fingerprint is ignored with a
warning (every header is read again, and the catalogue rebuilt); it is never trusted and never
fatal. Failing to write it only costs the next night time.

Privacy: records hold UIDs and paths (identifying), so the catalogue lives under ``OUT/private``
(0700), its files 0600 (docs/output-contract.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import tempfile
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any

from ..config import IngestConfig
from .scan import FileIssue, Instance

log = logging.getLogger(__name__)

SCHEMA = 2
FOLDER = "catalogue"
StatKey = tuple[int, int, int, int]  # size, mtime_ns, inode, ctime_ns
Record = Instance | FileIssue

_FIELDS = tuple(f.name for f in fields(Instance))
_TUPLES = frozenset(f.name for f in fields(Instance) if "tuple" in str(f.type))
# What differs from file to file of a series (position last); the rest is stored once per series' text.
_OWN = ("size", "mtime_ns", "sop_uid", "instance_number", "position")
_SHARED = tuple(name for name in _FIELDS if name not in _OWN and name != "path")
# Issues that say something about this process's access, not the file's content: never kept.
_TRANSIENT = ("cannot stat file", "cannot open file")
_SOURCES = ("scan.py", "header.py", "checks.py", "catalogue.py", "../keys.py")


def archive_key(archive: str | Path) -> str:
    """16 hex digits naming an archive folder (its real path), so that one OUT can serve several."""
    return hashlib.sha256(os.fsencode(os.path.realpath(archive))).hexdigest()[:16]


def catalogue_path(out: str | Path, archive: str | Path) -> Path:
    """Where the catalogue of ``archive`` lives in the output folder ``out`` (``OUT/private/catalogue/``).

    >>> catalogue_path("/out", "/archive").parent.as_posix()
    '/out/private/catalogue'
    """
    return Path(out) / "private" / FOLDER / f"{archive_key(archive)}.sqlite"


def header_fingerprint(cfg: IngestConfig) -> str:
    """A hash of everything that shapes a file's record: a catalogue made under another is void.

    The source of the header reader is hashed in (not only the version), so that a changed
    check invalidates catalogues even before a release.
    """
    import pydicom

    from .. import __version__

    h = hashlib.sha256(repr((SCHEMA, __version__, pydicom.__version__, _FIELDS, cfg.max_series_voxels,
                             cfg.on_nonfinite, cfg.uid_salt)).encode())
    h.update(_source_digest().encode())
    return h.hexdigest()


@cache
def _source_digest() -> str:
    """The header reader's source, hashed once per process: the code this process runs, even
    when the files are edited while it runs."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in _SOURCES)).hexdigest()


def stat_key(st: os.stat_result) -> StatKey:
    """The part of a stat result that changes whenever a file's content may have."""
    ino = st.st_ino - (1 << 64) if st.st_ino >= 1 << 63 else st.st_ino  # SQLite integers are signed 64-bit
    return (st.st_size, st.st_mtime_ns, ino, st.st_ctime_ns)


def keepable(record: Record) -> bool:
    """Whether a record may be reused while the file's stat key is unchanged."""
    return isinstance(record, Instance) or not record.reason.startswith(_TRANSIENT)


def encode(record: Record) -> str:
    """A record as text without its path (the path is the row's key).

    An instance is ``I`` + a JSON array of the fields that differ from file to file (:data:`_OWN`)
    + a newline + a JSON array of the rest, which a series' files share, so that a load parses
    the shared part once per series (JSON never holds a raw newline). An issue is ``F`` + a JSON
    array of its reason and study key.
    """
    if isinstance(record, Instance):
        own = [getattr(record, name) for name in _OWN]
        shared = [getattr(record, name) for name in _SHARED]
        return "I" + json.dumps(own, separators=(",", ":")) + "\n" + json.dumps(shared, separators=(",", ":"))
    return "F" + json.dumps([record.reason, record.study_key], separators=(",", ":"))


def decode(text: str, path: str, memo: dict[str, dict[str, Any]] | None = None) -> Record:
    """The record of the file at ``path`` from :func:`encode`'s text; ``ValueError`` if it is not one.

    ``memo`` keeps the parsed shared parts between calls (one per series).
    """
    if text[:1] == "F":
        reason, key = json.loads(text[1:])
        return FileIssue(path, str(reason), key)
    own_text, newline, shared_text = text[1:].partition("\n")
    if text[:1] != "I" or not newline:
        raise ValueError("not a record")
    shared = None if memo is None else memo.get(shared_text)
    if shared is None:
        values = json.loads(shared_text)
        if not isinstance(values, list) or len(values) != len(_SHARED):
            raise ValueError("not a record")
        shared = {name: tuple(v) if name in _TUPLES and v is not None else v for name, v in zip(_SHARED, values)}
        if memo is not None:
            memo[shared_text] = shared
    own = json.loads(own_text)
    if not isinstance(own, list) or len(own) != len(_OWN):
        raise ValueError("not a record")
    # The frozen dataclass's __init__ sets each field through object.__setattr__, several times
    # slower than filling its __dict__; a warm night builds every instance of the archive here.
    inst = object.__new__(Instance)
    fields_ = inst.__dict__
    fields_.update(shared)
    fields_["path"] = path
    fields_.update(zip(_OWN, own))
    if own[-1] is not None:
        fields_["position"] = tuple(own[-1])
    return inst


Row = tuple[StatKey, str]  # a file's stat key and its encoded record


class Catalogue:
    """The catalogue of one archive, loaded; :meth:`lookup` during the walk, :meth:`save` after it.

    >>> cat = Catalogue.load("/out/private/catalogue/x.sqlite", "/archive", IngestConfig())  # doctest: +SKIP
    >>> cat.lookup("a/1.dcm", key, "/archive/a/1.dcm")  # the record, or None: read the header  # doctest: +SKIP
    """

    def __init__(self, path: Path, root: str, fingerprint: str, rows: dict[str, Row] | None):
        self.path = path
        self.root = root
        self.fingerprint = fingerprint
        self.valid = rows is not None  # False: missing or ignored, rebuilt whole by save()
        self.rows = rows or {}
        self.hits = 0
        self._shared: dict[str, dict[str, Any]] = {}  # parsed shared parts of records (one per series)

    @classmethod
    def load(cls, path: str | Path, archive: str | Path, cfg: IngestConfig) -> "Catalogue":
        """Load the catalogue at ``path``; an unusable one is ignored with a warning (never raises)."""
        path = Path(path)
        root = os.path.realpath(archive)
        fingerprint = header_fingerprint(cfg)
        if not path.exists():
            return cls(path, root, fingerprint, None)
        try:
            rows = _read(path, root, fingerprint)
        except (sqlite3.Error, ValueError, TypeError, OSError) as exc:
            log.warning("discovery catalogue %s ignored (every header is read again): %s", path, exc)
            rows = None
        return cls(path, root, fingerprint, rows)

    def lookup(self, rel: str, key: StatKey, path: str) -> Record | None:
        """The record of the file ``rel`` (relative to the archive) at ``path``, if its stat key is unchanged."""
        row = self.rows.get(rel)
        if row is None or row[0] != key:
            return None
        try:
            record = decode(row[1], path, self._shared)
        except (ValueError, TypeError) as exc:  # a damaged row: read the file again, and rewrite the row
            log.warning("discovery catalogue %s: row of %r ignored: %s", self.path, rel, exc)
            self.rows[rel] = ((-1, -1, -1, -1), row[1])
            return None
        self.hits += 1
        self.rows[rel] = (key, "")  # only the key is needed from now on (save); free the text
        return record

    def save(self, present: list[str], fresh: dict[str, tuple[StatKey, Record]]) -> None:
        """Make the catalogue hold the files ``present`` (relative paths): the rows it has of those
        it returned from :meth:`lookup`, and ``fresh``, the records read this time (relative path
        -> stat key and record). Atomic; rows of unchanged files are not rewritten; only keepable
        records are stored. Never raises: a catalogue that cannot be written costs the next night
        time, not this night its results.
        """
        keep = {rel: entry for rel, entry in fresh.items() if keepable(entry[1]) and _storable(rel)}
        try:
            if self.valid:
                self._update(present, fresh, keep)
            else:
                self._rebuild(keep)
        except (sqlite3.Error, OSError, ValueError) as exc:  # ValueError: an archive path SQLite cannot hold
            log.warning("discovery catalogue %s not written: %s", self.path, exc)

    def _update(self, present: list[str], fresh: dict[str, tuple[StatKey, Record]],
                keep: dict[str, tuple[StatKey, Record]]) -> None:
        # removed files, and files read again whose record is not kept (their old row is stale)
        stale = (self.rows.keys() - set(present)) | (self.rows.keys() & (fresh.keys() - keep.keys()))
        gone = [(rel,) for rel in stale]
        changed = [(rel, *key, encode(rec)) for rel, (key, rec) in keep.items()]
        if not gone and not changed:
            return
        con = sqlite3.connect(self.path, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.executemany("DELETE FROM files WHERE rel = ?", gone)
            con.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", changed)
            con.execute("COMMIT")
        finally:
            con.close()
        for (rel,) in gone:
            self.rows.pop(rel, None)
        self.rows.update((rel, ((size, mtime, ino, ctime), text)) for rel, size, mtime, ino, ctime, text in changed)
        log.info("discovery catalogue %s: %d rows written, %d removed", self.path, len(changed), len(gone))

    def _rebuild(self, keep: dict[str, tuple[StatKey, Record]]) -> None:
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        for d in (folder, folder.parent) if folder.parent.name == "private" else (folder,):
            os.chmod(d, 0o700)  # identifying records: owner-only, like the rest of OUT/private
        rows = [(rel, *key, encode(rec)) for rel, (key, rec) in keep.items()]
        fd, tmp = tempfile.mkstemp(prefix=".catalogue-", suffix=".tmp", dir=folder)  # mode 0600
        os.close(fd)
        try:
            con = sqlite3.connect(tmp, isolation_level=None)
            try:
                con.execute("PRAGMA journal_mode = OFF")  # a temporary file: atomic by the rename below
                con.execute("BEGIN")
                con.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
                con.execute("CREATE TABLE files (rel TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                            "ino INTEGER, ctime_ns INTEGER, record TEXT NOT NULL) WITHOUT ROWID")
                con.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("schema", str(SCHEMA)), ("archive", self.root), ("fingerprint", self.fingerprint)])
                con.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)", rows)
                con.execute("COMMIT")
                con.execute("PRAGMA journal_mode = DELETE")  # later updates are journalled transactions
            finally:
                con.close()
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.valid = True
        self.rows = {rel: ((size, mtime, ino, ctime), text) for rel, size, mtime, ino, ctime, text in rows}
        log.info("discovery catalogue %s: built with %d rows", self.path, len(rows))


def _storable(rel: str) -> bool:
    """Whether SQLite can hold the name: a name that is not UTF-8 (kept by ``os.fsdecode`` as
    surrogate escapes) is not stored, so that file's header is read every night."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read(path: Path, root: str, fingerprint: str) -> dict[str, Row]:
    """The rows of a valid catalogue; raises (``sqlite3.Error``, ``ValueError``) on any other."""
    con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)
    try:
        meta = dict(con.execute("SELECT name, value FROM meta").fetchall())
        if meta.get("schema") != str(SCHEMA):
            raise ValueError(f"schema {meta.get('schema')!r}, this medpipe writes {SCHEMA}")
        if meta.get("archive") != root:
            raise ValueError(f"catalogue of another archive ({meta.get('archive')!r})")
        if meta.get("fingerprint") != fingerprint:
            raise ValueError("made by another medpipe version or header configuration")
        rows = {rel: ((size, mtime, ino, ctime), text)
                for rel, size, mtime, ino, ctime, text in con.execute("SELECT * FROM files")}
        if any(not isinstance(rel, str) for rel in rows):  # a text the JSON decoder refuses is caught per row
            raise ValueError("damaged row keys")
        return rows
    finally:
        con.close()


def describe(cat: Catalogue) -> dict[str, Any]:
    """What the catalogue did this scan, for logs and benchmarks."""
    return {"path": str(cat.path), "valid": cat.valid, "rows": len(cat.rows), "hits": cat.hits}
