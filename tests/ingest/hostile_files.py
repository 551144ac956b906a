"""Hostile DICOM files, written with pydicom into a folder, for ingest and fault tests.

Plain functions (no pytest fixtures) so that any suite can import them: pytest puts
``tests/ingest`` on ``sys.path`` only for tests in this folder, so another suite adds it first::

    sys.path.insert(0, str(Path(__file__).parents[1] / "ingest"))
    import hostile_files

Each writes its files under ``folder`` (created), in a study of its own unless a ``study_uid``
is given, and returns what it wrote, so that a test can assert that exactly those files are
named. :func:`hostile_archive` writes one of each beside a good study.

>>> import tempfile, pathlib
>>> bomb = huge_dimensions(pathlib.Path(tempfile.mkdtemp()))
>>> bomb.stat().st_size < 2048
True
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import RLELossless

from medpipe.sample import write_series

from ingest_helpers import enhanced_mr

SLOPE, INTERCEPT = 0x00281053, 0x00281052
BAD_RESCALE_VALUES = ("abc", "1e400", "-inf", "nan")


def volume(shape: tuple[int, int, int] = (6, 10, 12), seed: int = 0) -> np.ndarray:
    """A small CT-like volume (int16 HU) whose voxels all differ, so a lost or zeroed slice shows."""
    z, y, x = np.indices(shape)
    return (z * 100 + y * 7 + x + seed - 500).astype(np.int16)


def series(folder: Path, study_uid: str, n: int = 6, **kwargs) -> list[Path]:
    """A good series of ``n`` slices of 10 x 12 (a neighbour for the hostile files)."""
    return write_series(volume((n, 10, 12)), (2.0, 1.0, 1.0), Path(folder), study_uid=study_uid, **kwargs)


def _rewrite(path: Path, ds: Dataset) -> Path:
    with warnings.catch_warnings():  # the values are invalid on purpose
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


def _raw_text(ds: Dataset, tag: int, vr: str, text: str) -> None:
    """Set ``tag`` to ``text`` exactly as written bytes, bypassing pydicom's value checks."""
    value = text.encode() + (b" " if len(text) % 2 else b"")
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def huge_dimensions(folder: Path, rows: int = 65535, columns: int = 65535, frames: int = 1,
                    study_uid: str = "1.2.826.0.1.3680043.99.1") -> Path:
    """A 1.3 KB file claiming ``rows x columns x frames`` 16-bit voxels (8 GiB by default) over
    a 4 x 4 image's pixel data: the memory bomb."""
    path = series(Path(folder), study_uid, n=1, file_names=["bomb.dcm"])[0]
    ds = pydicom.dcmread(path)
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    ds.Rows, ds.Columns = rows, columns
    if frames != 1:
        ds.NumberOfFrames = frames
    return _rewrite(path, ds)


def compressed_huge(folder: Path, rows: int = 65535, columns: int = 65535, frames: int = 1,
                    study_uid: str = "1.2.826.0.1.3680043.99.2") -> Path:
    """An RLE-compressed file claiming ``rows x columns x frames`` over a few bytes of
    encapsulated data: a decoder would allocate the claim before finding out."""
    path = series(Path(folder), study_uid, n=1, file_names=["zbomb.dcm"])[0]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x00" * 64] * frames)
    ds["PixelData"].VR = "OB"
    ds.Rows, ds.Columns = rows, columns
    if frames != 1:
        ds.NumberOfFrames = frames
    return _rewrite(path, ds)


def bad_rescale(folder: Path, value: str = "nan", keyword: str = "RescaleSlope", slice_index: int = 2,
                study_uid: str = "1.2.826.0.1.3680043.99.3") -> tuple[list[Path], Path]:
    """A 6-slice series whose slice ``slice_index`` has ``keyword`` written as ``value`` ('abc',
    '1e400', '-inf', 'nan'...). Returns (all files, the bad one)."""
    files = series(Path(folder), study_uid)
    bad = files[slice_index]
    ds = pydicom.dcmread(bad)
    _raw_text(ds, SLOPE if keyword == "RescaleSlope" else INTERCEPT, "DS", value)
    _rewrite(bad, ds)
    return files, bad


def enhanced_bad_frame(folder: Path, value: str = "abc", frame: int = 1, n: int = 4,
                       study_uid: str = "1.2.826.0.1.3680043.99.4") -> Path:
    """An enhanced multi-frame MR of ``n`` frames whose frame ``frame`` has RescaleSlope
    ``value`` in its functional groups (where pydicom's top-level rescale does not look)."""
    src = enhanced_mr(volume((n, 8, 6)) + 600, [(0.0, 0.0, 1.5 * i) for i in range(n)], [1.0] * n, [0.0] * n)
    pvt = src.PerFrameFunctionalGroupsSequence[frame].PixelValueTransformationSequence[0]
    _raw_text(pvt, SLOPE, "DS", value)
    src.StudyInstanceUID = study_uid
    src.SeriesInstanceUID = study_uid + ".1"
    src.SOPInstanceUID = study_uid + ".1.1"
    src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
    path = Path(folder) / "enhanced.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    return _rewrite(path, src)


def float_with_nan(folder: Path, slice_index: int = 2, study_uid: str = "1.2.826.0.1.3680043.99.5"
                   ) -> tuple[list[Path], Path]:
    """A 6-slice series stored as FloatPixelData (32-bit), slice ``slice_index`` holding NaN,
    +Inf and -Inf voxels. Returns (all files, the bad one)."""
    files = series(Path(folder), study_uid, modality="MR")
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        values = ds.pixel_array.astype(np.float32) + np.float32(0.25)
        if k == slice_index:
            values[0, :3] = (np.nan, np.inf, -np.inf)
        del ds.PixelData
        for keyword in ("PixelRepresentation", "BitsStored", "HighBit", "RescaleSlope", "RescaleIntercept",
                        "RescaleType"):
            delattr(ds, keyword)
        ds.BitsAllocated = 32
        ds.FloatPixelData = values.tobytes()
        _rewrite(path, ds)
    return files, files[slice_index]


def conflicting_duplicate(folder: Path, slice_index: int = 2, study_uid: str = "1.2.826.0.1.3680043.99.6"
                          ) -> tuple[list[Path], Path, Path]:
    """A 6-slice series plus a copy of slice ``slice_index`` with the same SOPInstanceUID but other
    pixel values, named to sort after it. Returns (series files, the original, the impostor)."""
    files = series(Path(folder), study_uid)
    original = files[slice_index]
    ds = pydicom.dcmread(original)
    ds.PixelData = (ds.pixel_array + 1).astype(ds.pixel_array.dtype).tobytes()
    impostor = original.with_name(original.name + ".copy")
    return files, original, _rewrite(impostor, ds)


def identical_duplicate(folder: Path, slice_index: int = 2, study_uid: str = "1.2.826.0.1.3680043.99.7"
                        ) -> tuple[list[Path], Path]:
    """A 6-slice series plus a byte-identical copy of one slice. Returns (series files, the copy)."""
    files = series(Path(folder), study_uid)
    copy = files[slice_index].with_name(files[slice_index].name + ".copy")
    copy.write_bytes(files[slice_index].read_bytes())
    return files, copy


def too_long_path(folder: Path, study_uid: str = "1.2.826.0.1.3680043.99.8") -> str:
    """A valid DICOM file at a path longer than PATH_MAX (4096 on Linux), made through folder
    descriptors since no path-based call can reach it. Returns its (unusable) path as a string.
    Remove it with ``shutil.rmtree`` (descriptor-based on Linux), as pytest's tmp_path does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / ".scratch"
    good = series(scratch, study_uid, n=1)[0]
    data = good.read_bytes()
    good.unlink()
    scratch.rmdir()
    limit = os.pathconf(str(folder), "PC_PATH_MAX")
    name = "d" * 200
    depth = (limit - len(str(folder))) // (len(name) + 1) + 2
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open("deep.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        with io.FileIO(out, "wb") as fp:
            fp.write(data)
    finally:
        os.close(fd)
    return os.path.join(str(folder), *[name] * depth, "deep.dcm")


def link_loop(folder: Path) -> Path:
    """A symbolic link that points at itself (ELOOP when opened)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "loop.dcm"
    link.symlink_to(link.name)
    return link


def hostile_archive(folder: Path, good_study_uid: str = "1.2.826.0.1.3680043.99.100") -> dict[str, list[str]]:
    """One of each hostile file under ``folder``, beside a good 6-slice CT study.

    Returns the paths by kind: ``good`` (the good study's files, all of which must be converted),
    and for each hostile kind the file(s) that must be named (with the default configuration:
    ``on_nonfinite=refuse``, ``on_duplicate_conflict=refuse``). ``too_long_path`` is the file
    the walk cannot reach; the issue names its deepest listable folder, a prefix of it.
    """
    folder = Path(folder)
    good = series(folder / "good", good_study_uid)
    _, nan_slope = bad_rescale(folder / "nan_slope", "nan", study_uid="1.2.826.0.1.3680043.99.101")
    _, abc_slope = bad_rescale(folder / "abc_slope", "abc", study_uid="1.2.826.0.1.3680043.99.102")
    _, inf_slope = bad_rescale(folder / "inf_slope", "1e400", study_uid="1.2.826.0.1.3680043.99.103")
    _, neg_intercept = bad_rescale(folder / "neginf_intercept", "-inf", keyword="RescaleIntercept",
                                   study_uid="1.2.826.0.1.3680043.99.104")
    _, original, impostor = conflicting_duplicate(folder / "duplicate")
    return {
        "good": [str(p) for p in good],
        "huge_dimensions": [str(huge_dimensions(folder / "bomb"))],
        "compressed_huge": [str(compressed_huge(folder / "zbomb"))],
        "nan_slope": [str(nan_slope)],
        "abc_slope": [str(abc_slope)],
        "inf_slope": [str(inf_slope)],
        "neginf_intercept": [str(neg_intercept)],
        "conflicting_duplicate": [str(original), str(impostor)],
        "too_long_path": [too_long_path(folder / "long")],
    }
