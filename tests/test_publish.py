"""Publishing: only a complete, verified study folder replaces what is published, atomically."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from medpipe import omezarr
from medpipe.atomic import write_json, write_text
from medpipe.outputs import OutputLayout, clean_work
from medpipe.publish import (
    GateClosed,
    PublishError,
    already_published,
    check_published,
    close_gate,
    publish_study,
    published_fingerprint,
    swap_into_place,
    verify_study,
)


def make_study(folder: Path, status: str = "ok", fingerprint: str = "fp1") -> Path:
    """A small but complete study folder: image with labels, report.json/html and a DICOM file."""
    from medpipe.sample import write_series

    folder.mkdir(parents=True, exist_ok=True)
    outputs = {"json": "report.json", "html": "report.html"}
    doc = {"study_key": folder.name, "status": status, "error": None if status == "ok" else "ingest: bad",
           "segmentation": None, "model": None, "provenance": {"input_fingerprint": fingerprint}}
    if status == "ok":
        image = folder / "image.zarr"
        omezarr.write_image(image, np.arange(256, dtype="int16").reshape(4, 8, 8), spacing=(1.0, 1.0, 1.0), levels=2)
        omezarr.write_labels(image, np.ones((4, 8, 8), "uint8"), {1: "tissue"})
        dicom = write_series(np.zeros((1, 8, 8), "int16"), (1.0, 1.0, 1.0), folder / "src")[0]
        shutil.move(dicom, folder / "seg.dcm")
        shutil.rmtree(folder / "src")
        outputs["seg"] = "seg.dcm"
        doc["segmentation"] = {"labels": {"1": "tissue"}}
    doc["outputs"] = outputs
    write_text(folder / "report.html", "<!doctype html><html><body>report</body></html>")
    write_json(folder / "report.json", doc)
    return folder


def test_a_complete_folder_verifies_and_publishes_with_a_manifest(tmp_path: Path) -> None:
    staging, final = make_study(tmp_path / ".work" / "r1" / "k"), tmp_path / "studies" / "k"
    assert verify_study(staging) == []
    publish_study(staging, final)
    assert not staging.exists()
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["input_fingerprint"] == "fp1"
    assert "image.zarr/0/zarr.json" in manifest["files"] and "seg.dcm" in manifest["files"]
    assert check_published(final) == [] and published_fingerprint(final) == ("fp1", [])


@pytest.mark.parametrize("damage", ["image", "labels", "seg", "seg-truncated", "html", "report"])
def test_an_incomplete_folder_is_never_published(tmp_path: Path, damage: str) -> None:
    good = make_study(tmp_path / "studies" / "k", fingerprint="old")
    publish_study(make_study(tmp_path / "s0" / "k", fingerprint="old"), good)
    before = sorted(p.relative_to(good).as_posix() for p in good.rglob("*"))
    staging = make_study(tmp_path / "s1" / "k", fingerprint="new")
    if damage == "image":
        shutil.rmtree(staging / "image.zarr")  # the stripped republish of a lost worker
    elif damage == "labels":
        shutil.rmtree(staging / "image.zarr" / "labels")
    elif damage == "seg":
        (staging / "seg.dcm").unlink()
    elif damage == "seg-truncated":
        data = (staging / "seg.dcm").read_bytes()
        (staging / "seg.dcm").write_bytes(data[: len(data) // 3])
    elif damage == "html":
        (staging / "report.html").write_text("")
    else:
        (staging / "report.json").write_text("{trunc")
    assert verify_study(staging)
    with pytest.raises(PublishError, match="not published"):
        publish_study(staging, good)
    assert sorted(p.relative_to(good).as_posix() for p in good.rglob("*")) == before
    assert published_fingerprint(good) == ("old", [])


def test_a_file_damaged_after_it_was_verified_is_found_again(tmp_path: Path) -> None:
    """A DICOM file found intact is not parsed again while it is the same file; any write to it
    (here: the same size, in place) makes it checked again."""
    staging = make_study(tmp_path / ".work" / "r1" / "k")
    time.sleep(0.2)  # older than the file clock's coarse step: remembered once verified
    assert verify_study(staging) == [] and verify_study(staging) == []
    seg = staging / "seg.dcm"
    seg.write_bytes(b"\0" * seg.stat().st_size)
    assert any("seg.dcm" in p for p in verify_study(staging))
    with pytest.raises(PublishError, match="not published"):
        publish_study(staging, tmp_path / "studies" / "k")


def test_a_failed_result_never_replaces_a_good_one(tmp_path: Path) -> None:
    final = tmp_path / "studies" / "k"
    publish_study(make_study(tmp_path / "a" / "k"), final)
    with pytest.raises(PublishError, match="does not replace"):
        publish_study(make_study(tmp_path / "b" / "k", status="failed"), final)
    assert published_fingerprint(final)[0] == "fp1"
    # Where nothing good was published, the failed report is (it says why).
    other = tmp_path / "studies" / "j"
    publish_study(make_study(tmp_path / "c" / "j", status="failed"), other)
    assert json.loads((other / "report.json").read_text())["status"] == "failed"


def test_damage_after_publishing_is_found_by_stat(tmp_path: Path) -> None:
    final = tmp_path / "studies" / "k"
    publish_study(make_study(tmp_path / "a" / "k"), final)
    chunk = next(p for p in (final / "image.zarr" / "0").iterdir() if p.name.startswith("c"))
    chunk.write_bytes(chunk.read_bytes()[:-1])
    problems = check_published(final)
    assert problems and "bytes" in problems[0]
    assert published_fingerprint(final) == (None, problems)
    assert already_published(final, "fp1") is None
    (final / "seg.dcm").unlink()
    assert any("seg.dcm: missing" in p for p in check_published(final))


def test_a_folder_published_before_manifests_is_verified_in_full(tmp_path: Path) -> None:
    final = make_study(tmp_path / "studies" / "k")
    assert check_published(final) == []
    shutil.rmtree(final / "image.zarr")
    assert check_published(final)


def test_a_closed_gate_publishes_nothing(tmp_path: Path) -> None:
    gate = tmp_path / ".work" / "r1"
    close_gate(gate)
    with pytest.raises(GateClosed):
        publish_study(make_study(gate / "k"), tmp_path / "studies" / "k", gate=gate)
    assert not (tmp_path / "studies" / "k").exists()


def test_swap_is_one_step_and_leaves_no_old_copy(tmp_path: Path) -> None:
    a, b = tmp_path / "new", tmp_path / "studies" / "k"
    (a / "x").mkdir(parents=True)
    (b / "y").mkdir(parents=True)
    swap_into_place(a, b)
    assert [p.name for p in b.iterdir()] == ["x"] and not a.exists()
    assert sorted(p.name for p in (tmp_path / "studies").iterdir()) == ["k"]


def test_clean_work_finishes_a_swap_a_killed_run_left_half_done(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path)
    aside = layout.studies / ".k.old-123"  # renamed aside, the new folder never arrived
    (aside / "report.json").parent.mkdir(parents=True)
    (aside / "report.json").write_text("{}")
    (layout.studies / "j").mkdir()
    (layout.studies / ".j.old-9").mkdir()  # the swap finished; only the old copy is left
    (layout.work / "r0" / "k").mkdir(parents=True)
    clean_work(tmp_path)
    assert sorted(p.name for p in layout.studies.iterdir()) == ["j", "k"]
    assert (layout.study("k") / "report.json").is_file()
    assert not layout.work.exists() or not any(layout.work.iterdir())


def test_manifest_lists_every_file_but_itself(tmp_path: Path) -> None:
    final = tmp_path / "studies" / "k"
    publish_study(make_study(tmp_path / "a" / "k"), final)
    listed = set(json.loads((final / "manifest.json").read_text())["files"])
    on_disk = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
    assert listed == on_disk - {"manifest.json"}
    assert all(os.path.getsize(final / f) > 0 for f in listed)
