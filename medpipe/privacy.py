"""Paths of archive files stay with the operator; de-identified outputs name files by a keyed hash.

Archive folders are often named after patients (``Name^Surname_ID/``), so a file's path is
identifying. ``run.json``, ``run.html`` and the study reports name an unusable file by a token,
``f-`` and 16 hex digits of HMAC-SHA256 over its path relative to the archive, with a key kept in
``OUT/private/path-key``. The operator's log ``OUT/private/file-issues.jsonl`` maps each token
back to the path and the reason; both files are owner-only (0600, folder 0700) and documented as
identifying (docs/output-contract.md).

>>> r = PathRedactor(b"k" * 32, "/archive")
>>> t = r.token("/archive/Doe^Jane/1.dcm")
>>> t.startswith("f-") and len(t) == 18
True
>>> r.text("/archive/Doe^Jane/1.dcm: truncated pixel data") == t + ": truncated pixel data"
True
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PRIVATE_DIR = "private"
KEY_FILE = "path-key"
LOG_FILE = "file-issues.jsonl"


def private_dir(out: str | Path) -> Path:
    """``OUT/private``, created owner-only."""
    d = Path(out) / PRIVATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def load_key(out: str | Path) -> bytes:
    """The output folder's path key, made (random, 32 bytes, mode 0600) on first use."""
    return private_key(out, KEY_FILE)


def private_key(out: str | Path, name: str) -> bytes:
    """The key ``OUT/private/<name>``, made (random, 32 bytes, mode 0600) on first use.

    Several workers may need it at once on a first run: the first link wins and every process
    uses that key (tokens or UIDs made with two keys could not be linked to each other).
    """
    path = private_dir(out) / name
    key = _read_key(path)
    if len(key) >= 16:
        return key
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_bytes(32).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process made it first; a broken one is replaced
            if len(_read_key(path)) < 16:
                os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        return b""


def printable(path: str) -> str:
    """A path as text that any writer accepts: undecodable bytes and control characters escaped.

    >>> printable("a/\\udcff\\x07b")
    'a/\\\\xff\\\\x07b'
    """
    raw = os.fsencode(path) if isinstance(path, str) else bytes(path)
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class PathRedactor:
    """Replace archive paths by tokens. ``archive`` is the archive root paths are relative to."""

    def __init__(self, key: bytes, archive: str | Path):
        self.key = key
        self.root = os.path.normpath(os.fspath(archive))
        self._prefix = re.compile(re.escape(self.root) + r"/[^\n\r\t'\"]*?(?=: |'|\"|\n|, |; |\)|$)")

    @classmethod
    def for_output(cls, out: str | Path, archive: str | Path) -> "PathRedactor":
        return cls(load_key(out), archive)

    def relative(self, path: str) -> str:
        p = os.path.normpath(os.fspath(path))
        return os.path.relpath(p, self.root) if p == self.root or p.startswith(self.root + os.sep) else p

    def token(self, path: str) -> str:
        """``f-`` + 16 hex digits of HMAC-SHA256(key, path relative to the archive)."""
        rel = os.fsencode(self.relative(path))
        return "f-" + hmac.new(self.key, rel, hashlib.sha256).hexdigest()[:16]

    def text(self, s: str, known: Iterable[str] = ()) -> str:
        """``s`` with every known path, then any path under the archive root, replaced by its token."""
        if not isinstance(s, str) or self.root not in s:  # archive paths are absolute, under the root
            return s
        for p in sorted({str(k) for k in known if k and str(k) in s}, key=len, reverse=True):
            s = s.replace(p, self.token(p))
        return self._prefix.sub(lambda m: self.token(m.group(0)), s)

    def issue(self, issue: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(public, private)`` forms of a file issue ``{"path", "reason", ...}``.

        The public one keeps ``path`` (now the token: scripts reading the field keep working)
        and adds ``file_id``; the private one is the operator's log line.
        """
        path = str(issue.get("path") or "")
        token = self.token(path) if path else ""
        reason = self.text(str(issue.get("reason", "")), [path])
        public = {**issue, "path": token, "file_id": token, "reason": reason}
        private = {"file_id": token, "path": printable(self.relative(path)) if path else "", "reason": reason}
        if issue.get("study_key"):
            private["study_key"] = issue["study_key"]
        return public, private

    def deep(self, obj: Any, known: Iterable[str] = ()) -> Any:
        """A copy of ``obj`` (JSON-like) with paths in every string replaced (``path`` fields too)."""
        known = list(known)
        if isinstance(obj, str):
            return self.text(obj, known)
        if isinstance(obj, list | tuple):
            return [self.deep(v, known) for v in obj]
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if k == "path" and isinstance(v, str) and v and not v.startswith("f-"):
                    out[k] = out["file_id"] = self.token(v)
                else:
                    out[k] = self.deep(v, known)
            return out
        return obj


def append_log(out: str | Path, run_id: str, entries: Iterable[dict[str, Any]]) -> Path:
    """Append the operator's log lines of a run to ``OUT/private/file-issues.jsonl`` (0600)."""
    path = private_dir(out) / LOG_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace") as f:
        for e in entries:
            f.write(json.dumps({"run_id": run_id, **e}) + "\n")
    os.chmod(path, 0o600)
    return path
