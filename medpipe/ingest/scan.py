"""Discovery: walk an archive folder and read every file's DICOM header, in parallel.

Only headers are read (``stop_before_pixels``); the pixel data element's header is checked
against the file size so that truncated files are caught without decoding anything, and what
the header claims (Rows x Columns x frames x samples x bits, rescale values) is checked against
the pixel data's length and ``ingest.max_series_voxels`` (:mod:`.checks`), so that no later
stage allocates from a lie. Every file that cannot be used, or that the walk cannot open,
becomes a :class:`FileIssue` naming it and the reason.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ..config import IngestConfig
from ..keys import uid_key
from .checks import MAX_VOXELS, header_claim_problem, rescale_problem
from .header import DEFLATED, PIXEL_TAGS, UNDEFINED, PixelElement, pixel_element_at, read_header

log = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
FILES_PER_TASK = 64
_DEFAULTS = IngestConfig()


@dataclass(frozen=True)
class FileIssue:
    """A file that cannot be used, and why. ``study_key`` is set when its study is known."""

    path: str
    reason: str
    study_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"path": self.path, "reason": self.reason}
        if self.study_key:
            d["study_key"] = self.study_key
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FileIssue":
        return cls(d["path"], d["reason"], d.get("study_key"))


@dataclass(frozen=True)
class Instance:
    """The header facts of one DICOM file that planning and conversion need.

    UIDs are kept here in clear because grouping needs them; they never leave the planner
    except as one-way hashes.
    """

    path: str
    size: int
    mtime_ns: int
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    series_description: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    image_type: tuple[str, ...] = ()
    rows: int = 0
    columns: int = 0
    samples_per_pixel: int = 1
    n_frames: int = 1
    has_pixels: bool = False
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (6)
    position: tuple[float, ...] | None = None  # ImagePositionPatient (3)
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    transfer_syntax: str | None = None
    # What conversion needs, so that it does not parse the header again (see ``frame_facts``):
    spacing_between: float | None = None  # SpacingBetweenSlices
    rescale: tuple[float, float] = (1.0, 0.0)  # RescaleSlope, RescaleIntercept
    per_frame_groups: bool = False  # enhanced object: geometry and rescale per frame
    # Native little-endian monochrome pixels: (byte offset of the value, BitsAllocated, BitsStored,
    # PixelRepresentation), read directly with NumPy; None: decode with pydicom.
    raw_pixels: tuple[int, int, int, int] | None = None
    floats: bool = False  # FloatPixelData / DoubleFloatPixelData: voxels may be NaN or Inf
    # ingest.on_nonfinite=warn: why this file's voxels are set to 0 (rescale is then (0, 0))
    value_warning: str | None = None
    # What a model's domain is checked against (medpipe.inference.domain); "" when absent.
    body_part: str = ""  # BodyPartExamined
    photometric: str = ""  # PhotometricInterpretation

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScanResult:
    """What discovery found: one :class:`Instance` per readable file, one issue per bad file."""

    instances: list[Instance] = field(default_factory=list)
    issues: list[FileIssue] = field(default_factory=list)
    n_files: int = 0
    n_read: int = 0  # headers read; fewer than n_files when a catalogue knew the rest


def iter_files(root: str | Path, issues: list[FileIssue] | None = None) -> Iterable[Path]:
    """Every regular file under ``root`` (sorted, hidden files and DICOMDIR indexes excluded).

    What the walk cannot enter is appended to ``issues`` (when given) as a :class:`FileIssue`:
    a folder it cannot list (a path longer than PATH_MAX, no permission, vanished) and a link to
    a folder (not followed, so that links cannot loop or leave the archive).
    """
    return (Path(p) for p in walk_files(root, issues))


def walk_files(root: str | Path, issues: list[FileIssue] | None = None) -> Iterator[str]:
    """:func:`iter_files` as strings, spelled as ``str(Path(...))`` would (no Path per file: a
    million files are walked every night)."""
    top = str(Path(root))

    def unlisted(exc: OSError) -> None:
        if issues is not None:
            where = str(exc.filename or top)
            issues.append(FileIssue(where, os_reason("cannot list folder", exc, where)))

    for folder, dirs, files in os.walk(top, onerror=unlisted):
        listed = sorted(d for d in dirs if not d.startswith("."))
        dirs[:] = [d for d in listed if not os.path.islink(os.path.join(folder, d))]
        if issues is not None and len(dirs) < len(listed):
            issues.extend(FileIssue(os.path.join(folder, d), "link to a folder (not followed)")
                          for d in listed if d not in dirs)
        base = _folder_prefix(folder, top)
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            yield base + name


def _folder_prefix(folder: str, top: str) -> str:
    """What a file name in ``folder`` is appended to: ``str(Path(folder) / name)`` without the Path.

    >>> _folder_prefix("/a/b", "/a"), _folder_prefix("/", "/"), _folder_prefix("./d", "."), _folder_prefix(".", ".")
    ('/a/b/', '/', 'd/', '')
    """
    base = os.path.join(folder, "")
    return base[2:] if top == "." else base  # Path drops a leading "./"


def os_reason(what: str, exc: OSError, path: str) -> str:
    """``what`` and the system's reason, with the path's length when it is too long.

    >>> os_reason("cannot stat file", FileNotFoundError(2, "No such file or directory"), "/a")
    'cannot stat file: No such file or directory'
    """
    reason = f"{what}: {exc.strerror or exc}"
    if exc.errno == errno.ENAMETOOLONG:
        reason += f" (path of {len(path)} characters, more than PATH_MAX={os.pathconf('/', 'PC_PATH_MAX')})"
    return reason


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def pixel_element(fp: Any, size: int, ds: pydicom.Dataset) -> PixelElement:
    """The file's :class:`~.header.PixelElement` facts (is there pixel data, does its declared
    length fit in the file, its length and the offset of native little-endian PixelData).
    ``fp`` must stand just after the header (``dcmread(fp, stop_before_pixels=True)``)."""
    if any(t in ds for t in PIXEL_TAGS):  # read in full (e.g. small files without file meta)
        return pixels_in(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == DEFLATED:
        # The file position is inside the inflated stream: read the (rare) deflated file whole.
        return pixels_in(pydicom.dcmread(fp.name, force=True))
    pos = fp.tell()
    implicit, little = getattr(ds, "original_encoding", (False, True))
    return pixel_element_at(fp.read(12), pos, size, implicit, little)


def pixels_in(ds: pydicom.Dataset) -> PixelElement:
    """The facts of a pixel data element pydicom has read (its value in memory), if any."""
    tag = next((t for t in sorted(PIXEL_TAGS) if t in ds), None)
    if tag is None:
        return PixelElement(False)
    elem = ds.get_item(tag)  # raw (its length says undefined) or converted (it says so itself)
    value = elem.value if isinstance(elem.value, bytes | bytearray) else b""
    encapsulated = getattr(elem, "length", None) == UNDEFINED or bool(getattr(elem, "is_undefined_length", False))
    return PixelElement(True, None, None, len(value), encapsulated, tag != 0x7FE00010)


def _raw_pixels(ds: Mapping[str, Any], offset: int | None) -> tuple[int, int, int, int] | None:
    """Where NumPy can read the pixels directly: one native monochrome frame of 8 or 16 bits."""
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.get("BitsAllocated", 0) or 0)
        stored = int(ds.get("BitsStored", bits) or bits)
        signed = int(ds.get("PixelRepresentation", 0) or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        return None
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if (offset is None or n_frames != 1 or samples != 1 or bits not in (8, 16) or not 0 < stored <= bits
            or signed not in (0, 1) or photometric not in ("MONOCHROME1", "MONOCHROME2")):
        return None
    return (int(offset), bits, stored, signed)


def read_instance(path: str | Path, cfg: IngestConfig | None = None) -> Instance | FileIssue:
    """Read one file's header; return its :class:`Instance` or a :class:`FileIssue` saying why not.

    Never raises: whatever a file holds, it becomes an instance or an issue naming it. Its pixel
    claims are checked against its pixel data and ``cfg.max_series_voxels``, its rescale values
    for being finite (``cfg.on_nonfinite``), by arithmetic on the header alone.
    """
    cfg = cfg or _DEFAULTS
    path = Path(path)
    spath = str(path)
    try:
        st = path.stat()
    except OSError as exc:  # vanished, too long a path, a link loop, no permission on a folder
        return FileIssue(spath, os_reason("cannot stat file", exc, spath))
    if st.st_size == 0:
        return FileIssue(spath, "empty file (0 bytes)")
    try:
        fp = open(path, "rb")
    except OSError as exc:
        return FileIssue(spath, os_reason("cannot open file", exc, spath))
    try:
        with fp:
            header = read_header(fp, st.st_size)  # the common case, several times faster
            if header is None:  # not sure: pydicom reads it, exactly as before the fast path
                fp.seek(0)
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
                pixels = pixel_element(fp, st.st_size, ds)
    except (InvalidDicomError, EOFError) as exc:
        return FileIssue(spath, f"not a DICOM file ({exc})")
    except Exception as exc:  # pydicom raises many types on garbage; each is a bad file
        return FileIssue(spath, f"unreadable DICOM header: {type(exc).__name__}: {exc}")
    try:
        if header is not None:
            return _instance(spath, st, header.dataset, header.meta, PixelElement(*header[2:]), cfg)
        return _instance(spath, st, ds, getattr(ds, "file_meta", None), pixels, cfg)
    except Exception as exc:  # a value pydicom kept unconverted ("abc" as Rows...): a bad file
        return FileIssue(spath, f"unreadable DICOM header: {type(exc).__name__}: {exc}")


def _instance(spath: str, st: os.stat_result, ds: Mapping[str, Any], meta: Mapping[str, Any] | None,
              pixels: PixelElement, cfg: IngestConfig) -> Instance | FileIssue:
    """The one builder of an :class:`Instance` for both readers: ``ds`` and ``meta`` answer
    ``get(keyword, default)`` and ``keyword in`` (a pydicom Dataset, or :func:`read_header`'s
    dicts), so that the fast path cannot drift from pydicom's."""
    if meta is not None and meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS:
        return FileIssue(spath, "DICOMDIR index (ignored)")
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not study_uid or not series_uid or "SOPClassUID" not in ds and "Modality" not in ds:
        if meta is None or "TransferSyntaxUID" not in meta:
            return FileIssue(spath, "not a DICOM file (no DICOM header found)")
        return FileIssue(spath, "DICOM file without StudyInstanceUID/SeriesInstanceUID")
    key = uid_key(study_uid, cfg.uid_salt)
    if pixels.problem:
        return FileIssue(spath, pixels.problem, key)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows and cols and not pixels.present:
        return FileIssue(spath, "image object without pixel data", key)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    rescale = (_float_or(ds.get("RescaleSlope"), 1.0), _float_or(ds.get("RescaleIntercept"), 0.0))
    value_warning = None
    if pixels.present:
        problem = header_claim_problem(ds, pixels, cfg.max_series_voxels)
        if problem:
            return FileIssue(spath, problem, key)
        value_warning = _rescale_problems(ds, _int_or_none(ds.get("BitsAllocated")) or 0)
        if value_warning and cfg.on_nonfinite == "refuse":
            return FileIssue(spath, f"{value_warning} (ingest.on_nonfinite=refuse)", key)
        if value_warning:
            rescale = (0.0, 0.0)  # every voxel would be non-finite: all become 0, as documented
    spacing = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    thickness = ds.get("SliceThickness")
    return Instance(
        path=spath,
        size=int(st.st_size),
        mtime_ns=int(st.st_mtime_ns),
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=str(ds.get("SOPInstanceUID", "") or spath),
        sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
        modality=str(ds.get("Modality", "") or "OT"),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        image_type=_strings(ds.get("ImageType")),
        rows=rows,
        columns=cols,
        samples_per_pixel=samples,
        n_frames=n_frames,
        has_pixels=pixels.present,
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        slice_thickness=_float_or(thickness),
        transfer_syntax=str(meta.get("TransferSyntaxUID")) if meta is not None and "TransferSyntaxUID" in meta else None,
        spacing_between=_float_or(ds.get("SpacingBetweenSlices")),
        rescale=rescale,
        per_frame_groups="PerFrameFunctionalGroupsSequence" in ds,
        raw_pixels=_raw_pixels(ds, pixels.offset),
        floats=pixels.floats,
        value_warning=value_warning,
        body_part=str(ds.get("BodyPartExamined", "") or "").strip().upper(),
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
    )


def _rescale_problems(ds: Mapping[str, Any], bits: int) -> str | None:
    """Why RescaleSlope/RescaleIntercept would make non-finite voxels (both reasons), or None."""
    stored = _int_or_none(ds.get("BitsStored")) or bits or 16
    problems = [rescale_problem(ds.get("RescaleSlope"), "RescaleSlope", stored, 1.0),
                rescale_problem(ds.get("RescaleIntercept"), "RescaleIntercept", 0, 0.0)]
    return "; ".join(p for p in problems if p) or None


def pixel_digest(inst: Instance, max_series_voxels: int = MAX_VOXELS) -> str:
    """A hash of what makes the instance's physical voxels: its shape, rescale and stored pixel
    values, to tell identical duplicates from conflicting ones. Reads the pixel data (within the
    bounds the scan checked, and checked again before decoding: the file may have changed); a
    file that cannot be read gets a digest of its own (never equal to another).
    """
    h = hashlib.sha256(repr((inst.rows, inst.columns, inst.n_frames, inst.samples_per_pixel,
                             inst.rescale)).encode())
    try:
        if inst.raw_pixels is not None:  # native: the stored bytes, where the scan found them
            offset, bits = inst.raw_pixels[:2]
            with open(inst.path, "rb") as fp:
                fp.seek(offset)
                h.update(fp.read(inst.rows * inst.columns * bits // 8))
        else:
            ds = pydicom.dcmread(inst.path, force=True)
            problem = header_claim_problem(ds, pixels_in(ds), max_series_voxels)
            if problem:
                raise ValueError(problem)
            try:  # decoded, so that copies in different transfer syntaxes compare equal
                h.update(np.ascontiguousarray(ds.pixel_array).tobytes())
            except Exception:  # no decoder here: compare the encoded bytes
                h.update(next(ds[t].value for t in sorted(PIXEL_TAGS) if t in ds))
    except Exception as exc:
        return f"unreadable {inst.path}: {exc}"
    return h.hexdigest()


def _strings(value: Any) -> tuple[str, ...]:
    """A multi-valued text attribute as upper-case strings; one value is one string, not its letters.

    >>> _strings("LOCALIZER"), _strings(["ORIGINAL", "primary"]), _strings(None)
    (('LOCALIZER',), ('ORIGINAL', 'PRIMARY'), ())
    """
    if not value:
        return ()
    return (str(value).upper(),) if isinstance(value, str) else tuple(str(v).upper() for v in value)


def _float_or(value: Any, default: Any = None) -> Any:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _read_batch(paths: list[str], cfg: IngestConfig) -> list[Instance | FileIssue]:
    return [read_instance(p, cfg) for p in paths]


def scan_archive(root: str | Path, cfg: IngestConfig | None = None,
                 catalogue: str | Path | None = None) -> ScanResult:
    """Read the header of every file under ``root`` in parallel with ``dask.bag``.

    The bag runs on the active Dask scheduler (a distributed ``Client`` when one is the
    default); without one, on threads. Files that cannot be used, and folders the walk cannot
    enter, become :class:`FileIssue` records; DICOMDIR index files are skipped silently.

    Parameters
    ----------
    root : path
        Archive folder (nested folders, files with or without ``.dcm``).
    cfg : IngestConfig, optional
    catalogue : path, optional
        The archive's discovery catalogue (:func:`.catalogue.catalogue_path`: ``OUT/private/catalogue/``).
        Every file is still ``stat``ed; a file whose stat is unchanged since the catalogue was
        written keeps its record, only new or changed files have their header read, and the
        catalogue is then updated. The result is the same as without it.

    Returns
    -------
    ScanResult

    Examples
    --------
    >>> scan = scan_archive("archive", catalogue=catalogue_path("out", "archive"))  # doctest: +SKIP
    """
    cfg = cfg or IngestConfig()
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: archive folder not found")
    walk_issues: list[FileIssue] = []
    if catalogue is None:
        paths = list(walk_files(root, walk_issues))
        records, n_read = _read_all(paths, cfg), len(paths)
    else:
        paths, records, n_read = _scan_with_catalogue(root, cfg, Path(catalogue), walk_issues)
    result = _result(paths, records, walk_issues, n_read)
    log.info("scanned %d files: %d instances, %d issues", len(paths), len(result.instances), len(result.issues))
    return result


def _read_all(paths: list[str], cfg: IngestConfig) -> list[Instance | FileIssue]:
    """Every file's record, in order, read in batches on the active Dask scheduler."""
    import dask
    import dask.bag as db

    if not paths:
        return []
    batches = [paths[i : i + FILES_PER_TASK] for i in range(0, len(paths), FILES_PER_TASK)]
    bag = db.from_sequence(batches, npartitions=len(batches)).map(_read_batch, cfg).flatten()
    # Honour an active scheduler (the flow's distributed client); bags default to processes otherwise.
    scheduler = None if dask.config.get("scheduler", None) else "threads"
    return bag.compute(scheduler=scheduler) if scheduler else bag.compute()


def scan_known(root: str | Path, cfg: IngestConfig, catalogue: str | Path) -> ScanResult | None:
    """The scan of ``root`` from its catalogue alone, or None when a header must be read.

    Every file is ``stat``ed as in :func:`scan_archive`; when every one is known to the catalogue
    as it is (files may have gone), the result is the one :func:`scan_archive` would return.
    A new or changed file gives None at once: this night has work, and discovery then runs on
    the cluster.

    >>> scan_known("archive", IngestConfig(), catalogue_path("out", "archive")) is None  # doctest: +SKIP
    False
    """
    root = Path(root)
    if not root.is_dir():
        return None
    walk_issues: list[FileIssue] = []
    scanned = _scan_with_catalogue(root, cfg, Path(catalogue), walk_issues, read=False)
    if scanned is None:
        return None
    paths, records, _ = scanned
    return _result(paths, records, walk_issues, 0)


def _result(paths: list[str], records: list[Instance | FileIssue], walk_issues: list[FileIssue],
            n_read: int) -> ScanResult:
    result = ScanResult(issues=walk_issues, n_files=len(paths), n_read=n_read)
    for rec in records:
        if isinstance(rec, Instance):
            result.instances.append(rec)
        elif rec.reason != "DICOMDIR index (ignored)":
            result.issues.append(rec)
    return result


def _scan_with_catalogue(root: Path, cfg: IngestConfig, path: Path, walk_issues: list[FileIssue],
                         read: bool = True) -> tuple[list[str], list[Instance | FileIssue], int] | None:
    """Walk and ``stat`` every file; read the headers of those the catalogue does not know as they are
    (without ``read``: None as soon as there is one)."""
    from .catalogue import Catalogue, stat_key

    cat = Catalogue.load(path, root, cfg)
    if not read and not cat.valid:
        return None
    prefix = _folder_prefix(str(root), str(root))
    paths: list[str] = []
    records: list[Instance | FileIssue | None] = []
    keys: list[tuple[int, int, int, int] | None] = []
    for p in walk_files(root, walk_issues):
        try:
            key = stat_key(os.stat(p))
        except OSError:  # read_instance names the reason
            key = None
        paths.append(p)
        keys.append(key)
        records.append(cat.lookup(p[len(prefix):], key, p) if key is not None else None)
        if not read and records[-1] is None:
            return None
    todo = [i for i, rec in enumerate(records) if rec is None]
    for i, rec in zip(todo, _read_all([paths[i] for i in todo], cfg)):
        records[i] = rec
    present = [p[len(prefix):] for p, key in zip(paths, keys) if key is not None]
    cat.save(present, {paths[i][len(prefix):]: (keys[i], records[i]) for i in todo if keys[i] is not None})
    log.info("discovery catalogue: %d of %d files unchanged, %d headers read", len(paths) - len(todo),
             len(paths), len(todo))
    return paths, records, len(todo)  # type: ignore[return-value]  (every slot is filled)
