"""Hostile files: each is named with its reason, the rest of the archive is processed, nothing
is allocated from a header's lie, and ``on_nonfinite`` / ``on_duplicate_conflict`` behave as set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hostile_files as hostile
import numpy as np
import pydicom
import pytest
from ingest_helpers import load, run_ingest

from medpipe.config import IngestConfig
from medpipe.errors import StudyError
from medpipe.ingest import ingest_study, plan_studies, scan, scan_archive
from medpipe.ingest.checks import pixel_claim_problem
from medpipe.keys import study_key

GOOD = "1.2.3.500"


def _reasons(issues) -> dict[str, str]:
    return {(i.path if hasattr(i, "path") else i["path"]): (i.reason if hasattr(i, "reason") else i["reason"])
            for i in issues}


def _both_readers(root: Path, cfg: IngestConfig, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The scan's issues with the fast header reader, asserted equal to pydicom's alone."""
    fast = _reasons(scan_archive(root, cfg).issues)
    with monkeypatch.context() as m:
        m.setattr(scan, "read_header", lambda fp, size: None)
        slow = _reasons(scan_archive(root, cfg).issues)
    assert fast == slow
    return fast


def test_memory_bombs_named_at_scan_and_the_other_study_converted(tmp_path, monkeypatch):
    root = tmp_path / "arch"
    hostile.series(root / "good", GOOD)
    bomb = hostile.huge_dimensions(root / "bomb")
    zbomb = hostile.compressed_huge(root / "zbomb")
    zframes = hostile.compressed_huge(root / "zframes", 4000, 4000, 50, study_uid="1.2.3.501")
    frames = hostile.huge_dimensions(root / "frames", 512, 512, 2**31 - 1, study_uid="1.2.3.502")
    reasons = _both_readers(root, IngestConfig(), monkeypatch)
    assert bomb.stat().st_size < 2048
    assert reasons[str(bomb)] == "header claims 65535 x 65535 x 1 x 16-bit = 8.0 GiB but the pixel data holds 32 B"
    assert reasons[str(zbomb)].startswith("header claims 65535 x 65535 x 1 x 16-bit = 4,294,836,225 voxels, more "
                                          "than ingest.max_series_voxels=1,000,000,000")
    assert reasons[str(zframes)].startswith("header claims 4000 x 4000 x 50 x 16-bit = 1.5 GiB of compressed pixel "
                                            "data in 3.7 KiB (more than 1000:1")
    assert reasons[str(frames)].startswith("header claims 512 x 512 x 2147483647 x 16-bit = ")
    assert reasons[str(frames)].endswith(" but the pixel data holds 32 B")
    plans, results, _ = run_ingest(root, tmp_path / "out")
    assert list(results) == [study_key(GOOD)]
    assert results[study_key(GOOD)]["shape"] == [6, 10, 12]
    skipped = {p.study_key: p for p in plans if not p.files}
    assert {i["path"] for p in skipped.values() for i in p.issues} == {str(bomb), str(zbomb), str(zframes),
                                                                       str(frames)}


_PEAK = """
import json, resource, sys, tracemalloc
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a lie believed fails here, not on the machine
sys.path.insert(0, sys.argv[1])
import dask, pydicom
import hostile_files as hostile
from medpipe.ingest import ingest_study, plan_studies, scan_archive
from medpipe.errors import StudyError

dask.config.set(scheduler="threads", num_workers=2)
root, out = Path(sys.argv[2]), Path(sys.argv[3])
hostile.series(root / "good", "1.2.3.600")
hostile.huge_dimensions(root / "bomb")
hostile.compressed_huge(root / "zbomb")
changed = hostile.series(root / "changed", "1.2.3.601")
enhanced = hostile.enhanced_bad_frame(root / "enh", value="1.0")
tracemalloc.start()
plans = plan_studies(scan_archive(root))
# the files change after the scan: a slice and the enhanced object now claim 65535 x 65535
# (and the slice's pixel data moves, so that the scan's offset no longer holds)
for path in (changed[3], enhanced):
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 65535
    ds.ImageComments = "moved" * 20
    ds.save_as(path)
outcome = {}
for plan in (p for p in plans if p.files):  # the bombs' studies are skipped, named, by planning
    try:
        res = ingest_study(plan, out / plan.study_key)
        outcome[plan.study_key] = {"shape": res["shape"], "issues": res["issues"]}
    except StudyError as exc:
        outcome[plan.study_key] = str(exc)
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"peak": peak, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "outcome": outcome, "changed": str(changed[3]), "enhanced": str(enhanced)}))
"""


def test_nothing_allocated_from_a_lie_even_when_files_change_after_the_scan(tmp_path):
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(Path(__file__).parent), str(tmp_path / "arch"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["peak"] < 64 * 2**20, report["peak"]  # the bombs claim 8 GiB each
    outcome = report["outcome"]
    assert outcome[study_key("1.2.3.600")]["shape"] == [6, 10, 12]
    changed = outcome[study_key("1.2.3.601")]
    assert changed["shape"] == [5, 10, 12]  # the changed slice is dropped, named, as a gap
    assert [i["path"] for i in changed["issues"]] == [report["changed"]]
    assert "header claims 65535 x 65535 x 1 x 16-bit = 8.0 GiB but the pixel data holds 240 B" in \
        changed["issues"][0]["reason"]
    failed = [v for v in outcome.values() if isinstance(v, str)]
    assert len(failed) == 1 and report["enhanced"] in failed[0] and "header claims 65535 x 65535 x 4" in failed[0]


@pytest.mark.parametrize("value", hostile.BAD_RESCALE_VALUES)
def test_bad_rescale_refused_by_default_file_named_rest_converted(tmp_path, monkeypatch, value):
    files, bad = hostile.bad_rescale(tmp_path / "arch", value, study_uid="1.2.3.510")
    hostile.series(tmp_path / "arch" / "good", GOOD)
    reasons = _both_readers(tmp_path / "arch", IngestConfig(), monkeypatch)
    why = "is not a number" if value == "abc" else "is not finite"
    assert reasons == {str(bad): f"RescaleSlope {value!r} {why} (ingest.on_nonfinite=refuse)"}
    plans, results, _ = run_ingest(tmp_path / "arch", tmp_path / "out")
    assert results[study_key(GOOD)]["shape"] == [6, 10, 12]
    res = results[study_key("1.2.3.510")]
    assert res["shape"] == [5, 10, 12]
    assert [i["path"] for i in res["issues"]] == [str(bad)]
    assert any("missing slice" in w for w in res["warnings"])
    data, _ = load(tmp_path / "out", res["study_key"])
    assert np.isfinite(data).all()


def test_bad_intercept_warned_its_voxels_zero_and_named(tmp_path, monkeypatch):
    cfg = IngestConfig(on_nonfinite="warn")
    files, bad = hostile.bad_rescale(tmp_path / "arch", "-inf", keyword="RescaleIntercept")
    assert _both_readers(tmp_path / "arch", cfg, monkeypatch) == {}
    _, results, _ = run_ingest(tmp_path / "arch", tmp_path / "out", cfg)
    (key, res), = results.items()
    assert res["shape"] == [6, 10, 12] and res["dtype"] == "int16" and res["issues"] == []
    assert f"{bad}: RescaleIntercept '-inf' is not finite; its voxels set to 0 (ingest.on_nonfinite=warn)" \
        in res["warnings"]
    data, _ = load(tmp_path / "out", key)
    assert (data[2] == 0).all()
    np.testing.assert_array_equal(np.delete(data, 2, 0), np.delete(hostile.volume(), 2, 0))


def test_rescale_overflowing_float32_is_non_finite(tmp_path):
    files, bad = hostile.bad_rescale(tmp_path, "1e36")
    reasons = _reasons(scan_archive(tmp_path).issues)
    assert reasons == {str(bad): "RescaleSlope 1e+36 makes voxels beyond float32 (non-finite) "
                                 "(ingest.on_nonfinite=refuse)"}


def test_per_frame_rescale_of_enhanced_objects(tmp_path):
    path = hostile.enhanced_bad_frame(tmp_path / "arch", "nan", frame=1)
    plan = plan_studies(scan_archive(tmp_path / "arch"))[0]
    assert plan.files == [str(path)]  # the scan does not parse functional groups: conversion checks them
    with pytest.raises(StudyError) as err:
        ingest_study(plan, tmp_path / "refuse")
    assert f"{path}: frame 1: RescaleSlope 'nan' is not finite (ingest.on_nonfinite=refuse)" in str(err.value)
    res = ingest_study(plan, tmp_path / "warn", IngestConfig(on_nonfinite="warn"))
    assert f"{path}: frame 1: RescaleSlope 'nan' is not finite; voxels of those frames set to 0 " \
           "(ingest.on_nonfinite=warn)" in res["warnings"]
    data, _ = load(tmp_path, "warn")
    assert (data[1] == 0).all() and (data[0] != 0).any() and np.isfinite(data).all()


def test_nan_voxels_in_float_pixel_data(tmp_path):
    files, bad = hostile.float_with_nan(tmp_path / "arch")
    plan = plan_studies(scan_archive(tmp_path / "arch"))[0]
    res = ingest_study(plan, tmp_path / "refuse")
    assert res["shape"] == [5, 10, 12] and res["dtype"] == "float32"
    assert res["issues"] == [{"path": str(bad), "study_key": plan.study_key, "reason": "slice dropped: 3 NaN/Inf "
                              "voxel(s) in float pixel data (ingest.on_nonfinite=refuse)"}]
    data, _ = load(tmp_path, "refuse")
    assert np.isfinite(data).all() and data[0, 0, 0] == pytest.approx(-499.75)  # 0.25: not truncated to int16
    with pytest.raises(StudyError, match=str(bad)):
        ingest_study(plan, tmp_path / "strict", IngestConfig(on_inconsistency="refuse"))
    res = ingest_study(plan, tmp_path / "warn", IngestConfig(on_nonfinite="warn"))
    assert res["shape"] == [6, 10, 12] and res["issues"] == []
    assert f"{bad}: 3 NaN/Inf voxel(s) in float pixel data set to 0 (ingest.on_nonfinite=warn)" in res["warnings"]
    data, _ = load(tmp_path, "warn")
    assert np.isfinite(data).all() and (data[2, 0, :3] == 0).all()


def test_conflicting_duplicates_refused_by_default_both_named(tmp_path):
    files, original, impostor = hostile.conflicting_duplicate(tmp_path / "arch")
    plans, results, _ = run_ingest(tmp_path / "arch", tmp_path / "out")
    (res,) = results.values()
    assert str(original) not in plans[0].files and str(impostor) not in plans[0].files
    assert _reasons(res["issues"]) == {
        str(original): f"SOPInstanceUID shared with different pixel data by {impostor}; all 2 dropped "
                       "(ingest.on_duplicate_conflict=refuse)",
        str(impostor): f"SOPInstanceUID shared with different pixel data by {original}; all 2 dropped "
                       "(ingest.on_duplicate_conflict=refuse)"}
    assert res["shape"] == [5, 10, 12]


def test_conflicting_duplicates_warned_first_by_path_kept(tmp_path):
    files, original, impostor = hostile.conflicting_duplicate(tmp_path / "arch")
    cfg = IngestConfig(on_duplicate_conflict="warn")
    plans, results, _ = run_ingest(tmp_path / "arch", tmp_path / "out", cfg)
    (key, res), = results.items()
    assert res["issues"] == [] and res["shape"] == [6, 10, 12]
    assert (f"2 files share a SOPInstanceUID with different pixel data: kept {original} (first by path), dropped "
            f"{impostor} (ingest.on_duplicate_conflict=warn)") in res["warnings"]
    data, _ = load(tmp_path / "out", key)
    np.testing.assert_array_equal(data, hostile.volume())


def test_identical_duplicate_kept_once_quietly(tmp_path):
    files, copy = hostile.identical_duplicate(tmp_path / "arch")
    plans, results, _ = run_ingest(tmp_path / "arch", tmp_path / "out")
    (res,) = results.values()
    assert res["issues"] == [] and res["shape"] == [6, 10, 12]
    assert res["warnings"] == ["dropped 1 duplicate instance(s) with the same SOPInstanceUID"]


def test_paths_the_walk_cannot_open_are_named(tmp_path):
    root = tmp_path / "arch"
    hostile.series(root / "good", GOOD)
    deep = hostile.too_long_path(root / "long")
    loop = hostile.link_loop(root / "loop")
    (root / "linked").symlink_to(root / "good", target_is_directory=True)
    scanned = scan_archive(root)
    reasons = _reasons(scanned.issues)
    (folder, why), = [(p, r) for p, r in reasons.items() if deep.startswith(p + "/")]
    assert why.startswith("cannot list folder: File name too long (path of ")
    assert reasons[str(loop)] == "cannot stat file: Too many levels of symbolic links"
    assert reasons[str(root / "linked")] == "link to a folder (not followed)"
    assert len(reasons) == 3
    plans = plan_studies(scanned)
    assert [p.n_slices for p in plans] == [6]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_and_folder_named(tmp_path):
    files = hostile.series(tmp_path / "a", GOOD)
    files[0].chmod(0)
    (tmp_path / "closed").mkdir()
    (tmp_path / "closed").chmod(0)
    try:
        reasons = _reasons(scan_archive(tmp_path).issues)
    finally:
        (tmp_path / "closed").chmod(0o755)
    assert reasons[str(files[0])] == "cannot open file: Permission denied"
    assert reasons[str(tmp_path / "closed")] == "cannot list folder: Permission denied"


def test_series_over_the_voxel_cap_skipped_with_reason(tmp_path):
    hostile.series(tmp_path, GOOD, n=20)  # 20 x 10 x 12 = 2400 voxels
    cfg = IngestConfig(max_series_voxels=2000)
    plans = plan_studies(scan_archive(tmp_path, cfg), cfg)
    assert plans[0].files == []
    assert plans[0].skip_reason == "no usable series: 2,400 voxels, more than ingest.max_series_voxels=2,000"


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom's, about the values written on purpose
def test_unparseable_header_values_are_issues_not_crashes(tmp_path, monkeypatch):
    files = hostile.series(tmp_path, GOOD)
    ds = pydicom.dcmread(files[1])
    hostile._raw_text(ds, 0x00280008, "IS", "many")  # NumberOfFrames
    hostile._raw_text(ds, 0x00180050, "DS", "thick")  # SliceThickness
    hostile._rewrite(files[1], ds)
    ds = pydicom.dcmread(files[2])
    hostile._raw_text(ds, 0x00280002, "US", "xy")  # SamplesPerPixel, two bytes of garbage
    hostile._rewrite(files[2], ds)
    reasons = _both_readers(tmp_path, IngestConfig(), monkeypatch)
    assert set(reasons) <= {str(files[1]), str(files[2])}
    assert all(r for r in reasons.values())


def test_pixel_claims_arithmetic():
    cap = 10**9
    # YBR_FULL_422 native data is subsampled (2/3), 1-bit data packed (as pydicom computes them)
    assert pixel_claim_problem(10, 10, 1, 3, 8, "YBR_FULL_422", 200, False, cap) is None
    assert pixel_claim_problem(10, 10, 1, 1, 1, "MONOCHROME2", 13, False, cap) is None
    assert pixel_claim_problem(10, 10, 1, 1, 1, "MONOCHROME2", 12, False, cap).endswith("holds 12 B")
    assert "per pixel" in pixel_claim_problem(10, 10, 0, 1, 16, "MONOCHROME2", 200, False, cap)
    # a frame of more than 1/16 of the series cap
    assert "voxels a frame" in pixel_claim_problem(9000, 9000, 1, 1, 16, "MONOCHROME2", 162 * 10**6, False, cap)
    # compressed: small claims pass whatever the ratio (blank frames compress well), big ones need bytes
    assert pixel_claim_problem(512, 512, 1, 1, 16, "MONOCHROME2", 10, True, cap) is None
    assert pixel_claim_problem(512, 512, 3000, 1, 16, "MONOCHROME2", 400 * 2**20, True, cap) is None
    assert "1000:1" in pixel_claim_problem(512, 512, 3000, 1, 16, "MONOCHROME2", 2**20, True, cap)


def test_hostile_archive_every_file_named_good_study_whole(tmp_path):
    made = hostile.hostile_archive(tmp_path / "arch")
    plans, results, scanned = run_ingest(tmp_path / "arch", tmp_path / "out")
    named = set(_reasons(scanned.issues)) | {i["path"] for p in plans for i in p.issues}
    for kind, paths in made.items():
        if kind == "good":
            continue
        for path in paths:
            assert path in named or kind == "too_long_path" and any(path.startswith(n + "/") for n in named), kind
    assert results[study_key("1.2.826.0.1.3680043.99.100")]["shape"] == [6, 10, 12]


def test_same_pixels_in_another_transfer_syntax_are_not_a_conflict(tmp_path):
    from pydicom.uid import RLELossless

    files, copy = hostile.identical_duplicate(tmp_path / "arch")
    ds = pydicom.dcmread(copy)
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(copy)
    plans, results, _ = run_ingest(tmp_path / "arch", tmp_path / "out")
    (res,) = results.values()
    assert res["issues"] == [] and res["warnings"] == ["dropped 1 duplicate instance(s) with the same SOPInstanceUID"]


def test_vanished_file_is_named(tmp_path):
    from medpipe.ingest import read_instance

    issue = read_instance(tmp_path / "gone.dcm")
    assert (issue.path, issue.reason) == (str(tmp_path / "gone.dcm"), "cannot stat file: No such file or directory")
