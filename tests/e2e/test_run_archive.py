"""End to end: ``medpipe run`` on the sample archive plus a broken study, through the real CLI.

Real components throughout: the console script, an embedded ``prefect server start`` on
loopback, a Dask LocalCluster of two worker processes, Zarr stores on disk, TensorFlow with
the committed default model. The first run is shared by the checks of the output contract;
the reruns check incremental behaviour.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zarr
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medpipe.keys import study_key

pytestmark = pytest.mark.slow

MEDPIPE = str(Path(sys.executable).with_name("medpipe"))


def write_undecodable_study(folder: Path) -> str:
    """A JPEG 2000 image whose codestream header is wiped: scans fine, cannot be decoded."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    data = bytearray(ds.PixelData)
    soc = data.find(b"\xff\x4f\xff\x51")  # start of codestream + SIZ marker
    data[soc + 4: soc + 40] = b"\x00" * 36
    ds.PixelData = bytes(data)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    ds.save_as(folder / "broken.dcm")
    return ds.StudyInstanceUID


def medpipe(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the embedded server
    return subprocess.run([MEDPIPE, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("archive")
    done = medpipe("sample-archive", str(root))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    broken_uid = write_undecodable_study(root / "incoming" / "broken")
    (root / "notes.txt").write_text("not a DICOM file")
    return {"root": root, "summary": summary, "broken_key": study_key(broken_uid)}


@pytest.fixture(scope="module")
def first_run(archive: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("out")
    done = medpipe("run", str(archive["root"]), "--out", str(out), "--workers", "2")
    return {"out": out, "proc": done, "run": json.loads((out / "run.json").read_text())}


def test_exit_status_and_failures_listed(first_run: dict, archive: dict) -> None:
    proc = first_run["proc"]
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one study failed: documented status 1
    assert f"{archive['broken_key']}:" in proc.stderr
    assert "decode" in proc.stderr.lower()


def test_run_json_contract(first_run: dict, archive: dict) -> None:
    run = first_run["run"]
    for field in ("run_id", "started", "finished", "versions", "parameters", "studies", "issues"):
        assert field in run
    assert {"medpipe", "prefect", "dask", "zarr", "pydicom"} <= set(run["versions"])
    statuses = {s["study_key"]: s for s in run["studies"]}
    expected = {s["study_key"] for s in archive["summary"]["studies"]} | {archive["broken_key"]}
    assert set(statuses) == expected
    assert statuses[archive["broken_key"]]["status"] == "failed"
    assert "decode" in statuses[archive["broken_key"]]["error"].lower()
    ok = [s for s in run["studies"] if s["study_key"] != archive["broken_key"]]
    assert all(s["status"] == "ok" and s["output"] == f"studies/{s['study_key']}" for s in ok), ok
    # A non-DICOM file is explained; run.json names it by a token, the operator's log by its path.
    (issue,) = [i for i in run["issues"] if i["reason"].startswith("not a DICOM file")]
    log = [json.loads(line) for line in (first_run["out"] / "private" / "file-issues.jsonl").read_text().splitlines()]
    assert any(e["file_id"] == issue["file_id"] and e["path"] == "notes.txt" for e in log)
    assert (first_run["out"] / "run.html").is_file()
    assert not (first_run["out"] / ".work").exists() or not any((first_run["out"] / ".work").iterdir())


def test_study_folders(first_run: dict, archive: dict) -> None:
    out = first_run["out"]
    for study in archive["summary"]["studies"]:
        folder = out / "studies" / study["study_key"]
        assert re.fullmatch(r"[0-9a-f]{16}", folder.name)  # a hash, never a UID or a name
        report = json.loads((folder / "report.json").read_text())
        assert report["study_key"] == study["study_key"] and report["status"] == "ok"
        assert report["modality"] == study["modality"]
        for key in ("shape", "spacing", "series", "timings", "segmentation", "model", "warnings"):
            assert key in report, key
        assert {"ingest", "filter", "segment"} <= set(report["timings"])
        for m in report["segmentation"]["measurements"]:
            assert {"name", "voxels", "volume_ml"} <= set(m)
        html = (folder / "report.html").read_text()
        assert "<img" in html and study["study_key"] in html

        image = zarr.open_group(str(folder / "image.zarr"), mode="r")
        assert image.metadata.zarr_format == 3
        ome = image.attrs["ome"]
        assert ome["version"] == "0.5"
        axes = ome["multiscales"][0]["axes"]
        assert [a["name"] for a in axes] == ["z", "y", "x"] and {a["unit"] for a in axes} == {"millimeter"}
        scale = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
        assert np.allclose(scale, report["spacing"])
        assert np.asarray(image.attrs["medpipe"]["affine_lps"]).shape == (4, 4)
        assert list(image["0"].shape) == report["shape"]
        assert "segmentation" in image["labels"].attrs["ome"]["labels"]


def test_ct_phantom_in_hounsfield_units_and_lesions_found(first_run: dict, archive: dict) -> None:
    ct = next(s for s in archive["summary"]["studies"] if s["name"] == "phantom_ct")
    folder = first_run["out"] / "studies" / ct["study_key"]
    volume = zarr.open_array(str(folder / "image.zarr" / "0"), mode="r")[:]
    assert -1100 < float(np.percentile(volume, 1)) < -900  # air
    assert 650 < float(volume.max()) < 800  # bone at 700 HU plus noise
    report = json.loads((folder / "report.json").read_text())
    found = sorted(c["volume_ml"] for c in report["segmentation"]["lesion_candidates"])
    assert np.allclose(found, sorted(ct["truth_lesion_volumes_ml"]), rtol=0.05)
    assert report["model"]["outputs"]["study_label"] == "lesion"


def test_rerun_skips_unchanged_and_keeps_outputs(first_run: dict, archive: dict) -> None:
    out = first_run["out"]
    ct = next(s for s in archive["summary"]["studies"] if s["name"] == "phantom_ct")
    before = (out / "studies" / ct["study_key"] / "report.json").read_bytes()
    # Change one MR slice: that study alone must be redone.
    mr = next(s for s in archive["summary"]["studies"] if s["name"] == "brain_mr")
    mr_file = next(p for p in sorted((archive["root"] / mr["folder"]).iterdir()) if p.is_file())
    ds = pydicom.dcmread(mr_file)
    arr = ds.pixel_array.copy()
    arr[0, 0] += 1
    ds.PixelData = arr.tobytes()
    ds.save_as(mr_file)

    done = medpipe("run", str(archive["root"]), "--out", str(out), "--workers", "2")
    assert done.returncode == 1, done.stderr  # the broken study is retried and fails again
    run = json.loads((out / "run.json").read_text())
    status = {s["study_key"]: s["status"] for s in run["studies"]}
    assert status[mr["study_key"]] == "ok"
    assert status[archive["broken_key"]] == "failed"
    unchanged = [s["study_key"] for s in archive["summary"]["studies"] if s["study_key"] != mr["study_key"]]
    assert all(status[k] == "skipped" for k in unchanged), status
    assert (out / "studies" / ct["study_key"] / "report.json").read_bytes() == before


def test_model_skips_slices_outside_its_domain(first_run: dict, archive: dict) -> None:
    """pydicom's CT_small is one slice, a 85 mm crop without BodyPartExamined: the chest-CT
    phantom model must not score it, and says why, in report.json and run.json."""
    small = next(s for s in archive["summary"]["studies"] if s["name"] == "CT_small")
    report = json.loads((first_run["out"] / "studies" / small["study_key"] / "report.json").read_text())
    reason = report["model"]["skipped"]
    assert reason.startswith("outside model medpipe-lesion-slice-cnn's domain: ")
    assert "no BodyPartExamined" in reason and "1 slice(s), fewer than 16" in reason
    assert not report["model"].get("outputs", {}).get("study_label")
    (model,) = report["models"]
    assert model["applicable"] is False and model["outputs"] is None and model["reason"] == reason
    entry = next(s for s in first_run["run"]["studies"] if s["study_key"] == small["study_key"])
    assert entry["models"] == {"medpipe-lesion-slice-cnn": {"applicable": False, "reason": reason}}


def test_each_study_says_which_model_ran(first_run: dict, archive: dict) -> None:
    """The chest CT phantom runs the default model; the brain MR and the radiograph do not."""
    by_name = {s["name"]: s["study_key"] for s in archive["summary"]["studies"]}
    entries = {s["study_key"]: s for s in first_run["run"]["studies"]}
    chest = entries[by_name["phantom_ct"]]["models"]["medpipe-lesion-slice-cnn"]
    assert chest["applicable"] is True and chest["label"] == "lesion" and chest["score"] >= 0.5
    for name in ("brain_mr", "RG3_J2KR", "emri_small"):
        outcome = entries[by_name[name]]["models"]["medpipe-lesion-slice-cnn"]
        assert outcome["applicable"] is False and "is not covered (covers CT)" in outcome["reason"], name
    report = json.loads((first_run["out"] / "studies" / by_name["phantom_ct"] / "report.json").read_text())
    assert report["models"][0]["applicable"] is True and "body part CHEST" in report["models"][0]["reason"]
    assert "infer" in report["timings"] and "infer:medpipe-lesion-slice-cnn" in report["timings"]


def _tiny_keras(path: Path) -> None:
    """A small untrained slice classifier (32x32x1 -> 1): a second model that covers CT and MR."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(1)
    inp = keras.Input((32, 32, 1))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3, padding="same")(inp))
    keras.Model(inp, layers.Dense(1, activation="sigmoid")(x)).save(path)


def test_two_models_run_side_by_side(archive: dict, tmp_path: Path) -> None:
    """`models:` with two entries through the real CLI: one infer task per (study, matching
    model), one result per model in run.json, report.json and the SR; `medpipe plan` agrees."""
    import highdicom as hd

    by_name = {s["name"]: s for s in archive["summary"]["studies"]}
    root = tmp_path / "archive"
    for name in ("phantom_ct", "brain_mr"):
        shutil.copytree(archive["root"] / by_name[name]["folder"], root / name)
    _tiny_keras(tmp_path / "tiny.keras")
    config = tmp_path / "two.yaml"
    config.write_text(f"""
models:
  - name: chest
  - name: tiny
    path: {tmp_path / "tiny.keras"}
    input_size: 32
    saliency_slices: 1
    domain: {{modalities: [CT, MR], min_slices: 4}}
report: {{html: false, dicom_seg: false}}
""")
    plan = medpipe("plan", str(root), "--config", str(config))
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.count("model chest: RUN") == 1 and plan.stdout.count("model tiny: RUN") == 2
    assert "model chest: NOT APPLICABLE (modality MR is not covered (covers CT); body part HEAD" in plan.stdout

    out = tmp_path / "out"
    done = medpipe("run", str(root), "--out", str(out), "--workers", "2", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads((out / "run.json").read_text())
    assert [m["name"] for m in run["model"]["models"]] == ["chest", "tiny"]
    entries = {s["study_key"]: s for s in run["studies"]}
    ct, mr = (entries[by_name[n]["study_key"]] for n in ("phantom_ct", "brain_mr"))
    assert ct["models"]["chest"]["label"] == "lesion" and ct["models"]["tiny"]["applicable"] is True
    assert mr["models"]["chest"]["applicable"] is False and mr["models"]["tiny"]["applicable"] is True
    assert "chest: not applicable" in mr["findings"] and "tiny: " in mr["findings"]

    report = json.loads((out / "studies" / ct["study_key"] / "report.json").read_text())
    assert [(m["name"], m["applicable"]) for m in report["models"]] == [("chest", True), ("tiny", True)]
    assert {"infer", "infer:chest", "infer:tiny"} <= set(report["timings"])
    assert report["models"][1]["saliency"][0]["png"].startswith("saliency/tiny/")
    assert (out / "studies" / ct["study_key"] / report["models"][1]["saliency"][0]["png"]).is_file()
    sr = hd.sr.srread(out / "studies" / mr["study_key"] / "sr.dcm")
    # Without a SEG the label volumes are image measurement groups too ("label N: name").
    groups = [g for g in sr.content.get_image_measurement_groups() if not g.tracking_identifier.startswith("label ")]
    assert sorted(g.tracking_identifier.split(":")[0] for g in groups) == ["chest", "tiny"]
    assert all(len(g.get_qualitative_evaluations()) == 1 for g in groups)
