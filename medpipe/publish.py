"""Publishing a study: only a complete, verified folder ever replaces what is under ``studies/``.

A study is worked on in a staging folder (``OUT/.work/<run>/<key>``). :func:`publish_study`
checks that every file its ``report.json`` lists is there and reads, writes a manifest of the
folder (each file's size), and swaps the folder into ``OUT/studies/<key>`` in one atomic
rename. :func:`check_published` answers, from the manifest and a ``stat`` per file, whether a
published study is still intact, so that a rerun skips only what is done *and* undamaged.

What can go wrong and what happens (see tests/faults/):

- a stage or a worker dies half-way: the staging folder is incomplete, verification fails, the
  published folder stays as it was;
- a task that already published is run again (Dask re-runs the tasks of a lost worker): its
  staging folder is gone, and the published folder, if it holds this very result, is returned
  as it is (:func:`already_published`), never republished from a half-empty staging folder;
- a failed result never replaces an intact successful one.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = atomic.write_json(d / "report.json", {"status": "failed", "outputs": {"json": "report.json"}})
>>> verify_study(d)
[]
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import atomic

MANIFEST = "manifest.json"
# Folders of the staging area that are never published (intermediates).
INTERMEDIATES = ("filtered.zarr",)


class PublishError(Exception):
    """A staging folder is not complete enough to publish; the message says what is missing."""


# --------------------------------------------------------------------------- verification
def read_report(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``report.json`` as a dict, or None when missing or unreadable."""
    try:
        doc = json.loads((Path(folder) / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def verify_study(folder: str | Path) -> list[str]:
    """What is wrong with a study folder (empty list: nothing).

    Every file ``report.json`` lists in ``outputs`` must exist and read (JSON parses, DICOM
    parses, HTML is not empty); a successful study must have its image (``image.zarr`` with
    every pyramid level), its label image when it reports a segmentation, and every saliency
    map its model section names.
    """
    folder = Path(folder)
    doc = read_report(folder)
    if doc is None:
        return ["report.json is missing or unreadable"]
    problems = [p for kind, name in sorted((doc.get("outputs") or {}).items())
                if (p := _check_file(folder / str(name), kind))]
    if doc.get("status") == "ok":
        problems += _check_image(folder / "image.zarr", labels=bool((doc.get("segmentation") or {}).get("labels")))
        for s in (doc.get("model") or {}).get("saliency") or []:
            if not (folder / str(s.get("png", ""))).is_file():
                problems.append(f"{s.get('png')}: listed in report.json but missing")
    return problems


def _check_file(path: Path, kind: str) -> str | None:
    name = path.name
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return f"{name}: listed in report.json but missing or empty"
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".dcm":
            return _check_dicom(path, kind)
        elif path.suffix == ".html" and b"<html" not in path.read_bytes()[:512].lower():
            return f"{name}: not an HTML page"
    except Exception as exc:  # any reader's complaint means the file is damaged
        return f"{name} ({kind}): unreadable: {type(exc).__name__}: {exc}"
    return None


# The element a DICOM output cannot be without, by kind: a file cut short lacks it.
_ESSENTIAL = {"seg": "PixelData", "sr": "ContentSequence"}
# Files found intact, by path: the (device, inode, size, mtime, ctime) they had then. A file
# with the same is the same file, unchanged (any write changes its ctime): verifying a staging
# folder again before publishing (write_report, then prepare) does not parse it again.
_VERIFIED: OrderedDict[str, tuple[int, ...]] = OrderedDict()
_VERIFIED_MAX = 256
_RACY_NS = 100_000_000


def _signature(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_dicom(path: Path, kind: str) -> str | None:
    """A DICOM object whose every element parses, with its essential content, pixel data as long
    as declared.

    Objects in explicit VR little endian (medpipe's own) are checked by
    :func:`medpipe.report.dicom_structure.structure`, which walks every element, item and
    delimiter of the bytes without building datasets; others are parsed by pydicom. A file
    found intact is not read again while it stays the same file (:data:`_VERIFIED`).
    """
    from .report.dicom_structure import structure

    key, signature = str(path.resolve()), _signature(path)
    if _VERIFIED.get(key) == signature:
        return None
    if signature[2] == 0:
        return f"{path.name}: empty"
    started = time.time_ns()
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        found = structure(data)  # mapped: only the headers are read, not the pixel data
    if found is None:  # a transfer syntax the walker leaves to pydicom
        problem = _check_dicom_pydicom(path, kind)
    elif found.problem is not None:
        return f"{path.name}: damaged DICOM object ({found.problem})"
    else:
        problem = _missing(path.name, kind, found.top) or _short_pixels(path.name, found.top, found.pixel_bytes)
    # Remembered only when its last change is older than the clock's coarse step (file times
    # advance in steps of a few ms): a write after this check then changes its times.
    if problem is None and _signature(path) == signature and started - max(signature[3:]) > _RACY_NS:
        _VERIFIED[key] = signature
        _VERIFIED.move_to_end(key)
        while len(_VERIFIED) > _VERIFIED_MAX:
            _VERIFIED.popitem(last=False)
    return problem


def _missing(name: str, kind: str, top: dict[str, Any]) -> str | None:
    for keyword in ("SOPInstanceUID", _ESSENTIAL.get(kind, "SOPInstanceUID")):
        if keyword not in top:
            return f"{name}: incomplete DICOM object (no {keyword})"
    return None


def _short_pixels(name: str, top: dict[str, Any], have: int | None) -> str | None:
    """Uncompressed pixel data shorter than its header declares (``have`` None: encapsulated)."""
    if "PixelData" not in top or have is None:
        return None
    bits = int(top["BitsAllocated"]) * int(top["Rows"]) * int(top["Columns"]) * int(top.get("SamplesPerPixel") or 1)
    need = (bits * int(top.get("NumberOfFrames") or 1) + 7) // 8
    return f"{name}: pixel data holds {have} of {need} bytes" if have < need else None


def _check_dicom_pydicom(path: Path, kind: str) -> str | None:
    """:func:`_check_dicom` by pydicom: every element of the file parsed and converted."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.walk(lambda _ds, _elem: None)  # parse every element: a cut-off value or sequence raises
    for keyword in ("SOPInstanceUID", _ESSENTIAL.get(kind, "SOPInstanceUID")):
        if keyword not in ds:
            return f"{path.name}: incomplete DICOM object (no {keyword})"
    if "PixelData" in ds:
        bits = int(ds.BitsAllocated) * int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        need = (bits * int(ds.get("NumberOfFrames", 1) or 1) + 7) // 8
        if not ds.file_meta.TransferSyntaxUID.is_compressed and len(ds.PixelData) < need:
            return f"{path.name}: pixel data holds {len(ds.PixelData)} of {need} bytes"
    return None


def _check_image(image: Path, *, labels: bool) -> list[str]:
    """An OME-Zarr image with all its levels (and its label image): metadata of each array reads."""
    groups = [image] + ([image / "labels" / "segmentation"] if labels else [])
    problems = []
    for group in groups:
        rel = group.relative_to(image.parent).as_posix()
        try:
            meta = json.loads((group / "zarr.json").read_text())
            datasets = meta["attributes"]["ome"]["multiscales"][0]["datasets"]
            for ds in datasets:
                arr = json.loads((group / ds["path"] / "zarr.json").read_text())
                if arr.get("node_type") != "array":
                    problems.append(f"{rel}/{ds['path']}: not an array")
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            problems.append(f"{rel}: missing or unreadable OME-Zarr image ({type(exc).__name__}: {exc})")
    return problems


# --------------------------------------------------------------------------- the manifest
def write_manifest(folder: str | Path, input_fingerprint: str | None) -> dict[str, Any]:
    """Record every file of ``folder`` with its size in ``manifest.json`` (written last)."""
    folder = Path(folder)
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            if rel != MANIFEST:
                files[rel] = p.stat().st_size
    manifest = {"input_fingerprint": input_fingerprint, "files": dict(sorted(files.items()))}
    atomic.write_json(folder / MANIFEST, manifest)
    return manifest


def check_published(folder: str | Path) -> list[str]:
    """What is wrong with a published study folder, from its manifest and one ``stat`` per file.

    A folder without a manifest (published before manifests existed) is verified in full.
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return verify_study(folder) if (folder / "report.json").is_file() else ["no published study"]
    problems = []
    for rel, size in files.items():
        try:
            actual = (folder / rel).stat().st_size
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if actual != size:
            problems.append(f"{rel}: {actual} bytes, {size} when published")
        if len(problems) >= 5:
            problems.append("…")
            break
    return problems


def published_fingerprint(folder: str | Path) -> tuple[str | None, list[str]]:
    """``(input fingerprint, problems)`` of a published successful study.

    The fingerprint is None when there is no intact successful study in ``folder``; problems
    then says why when there was one but it is damaged.
    """
    doc = read_report(folder)
    if doc is None or doc.get("status") != "ok":
        return None, []
    problems = check_published(folder)
    if problems:
        return None, problems
    return (doc.get("provenance") or {}).get("input_fingerprint"), []


def already_published(folder: str | Path, input_fingerprint: str) -> dict[str, Any] | None:
    """The report of ``folder`` when it is an intact publication of exactly this result, else None."""
    doc = read_report(folder)
    if doc is None or (doc.get("provenance") or {}).get("input_fingerprint") != input_fingerprint:
        return None
    return doc if not check_published(folder) else None


# --------------------------------------------------------------------------- publishing
def prepare(staging: str | Path, final: str | Path, *, keep: tuple[str, ...] = ()) -> None:
    """Verify ``staging``, drop intermediates not in ``keep`` and write its manifest.

    Raises
    ------
    PublishError
        When the staging folder is incomplete, or when it holds a failed result and ``final``
        an intact successful one.
    """
    staging, final = Path(staging), Path(final)
    problems = verify_study(staging)
    if problems:
        raise PublishError(f"{staging.name}: not published, the study folder is incomplete: "
                           + "; ".join(problems))
    new = read_report(staging) or {}
    if new.get("status") != "ok" and published_fingerprint(final)[0] is not None:
        raise PublishError(f"{staging.name}: a failed result does not replace the intact published one")
    for name in INTERMEDIATES:
        if name not in keep:
            shutil.rmtree(staging / name, ignore_errors=True)
    write_manifest(staging, (new.get("provenance") or {}).get("input_fingerprint"))


def publish_study(staging: str | Path, final: str | Path, *, keep: tuple[str, ...] = (),
                  gate: str | Path | None = None) -> Path:
    """Verify ``staging`` and swap it into ``final`` (see :func:`prepare`).

    ``gate`` is the run's work folder (the parent of its staging folders). Publishing holds its
    lock from verification to the swap, so a stopping run that closes it (:func:`close_gate`)
    knows that nothing of the run is published after that, and that no staging folder is
    removed under a publish.

    Raises
    ------
    PublishError
        When the folder is incomplete or a failed result would replace a good one (``final``
        is then untouched).
    GateClosed
        When the run is stopping or over.
    """
    if gate is None:
        prepare(staging, final, keep=keep)
        return swap_into_place(staging, final)
    with _gate_lock(gate) as is_open:
        if not is_open:
            raise GateClosed(f"{Path(staging).name}: not published, the run is stopping")
        prepare(staging, final, keep=keep)
        return swap_into_place(staging, final)


class GateClosed(PublishError):
    """The run is stopping: nothing more is published."""


@contextmanager
def _gate_lock(gate: str | Path) -> Iterator[bool]:
    """Hold the gate's lock; yield whether publishing is open.

    The lock and the closed mark are files beside the work folder, not in it: removing the
    folder (or a late task that recreates part of it) never reopens the gate.
    """
    gate = Path(gate)
    try:
        fd = os.open(gate.with_name(gate.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:  # no work folder at all: the run is over
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield not gate.with_name(gate.name + ".closed").exists()
    finally:
        os.close(fd)  # releases the lock


def close_gate(gate: str | Path, *, remove: bool = False) -> None:
    """Stop publishing for the run whose work folder is ``gate`` (waits for a publish under way);
    with ``remove``, also delete the folder (the run's staging) while no publish can use it."""
    gate = Path(gate)
    gate.parent.mkdir(parents=True, exist_ok=True)
    with _gate_lock(gate):
        gate.with_name(gate.name + ".closed").touch()
        if remove:
            shutil.rmtree(gate, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(src: str | Path, dst: str | Path) -> Path:
    """Put folder ``src`` at ``dst`` in one atomic step; the old ``dst`` (if any) is deleted after.

    Where the kernel or file system cannot exchange two paths, the old folder is renamed aside
    first (``dst`` is then absent for a moment, never half-written).
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and _renameat2_exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # now holds the old folder
        return dst
    return atomic.replace_dir(src, dst)
