"""What a run does with each study (medpipe.run_plan): no Prefect, no cluster.

A study is processed and published by the library (:func:`medpipe.study.process_study`, as a
run's task does), the archive's catalogue written by a scan; then :func:`nothing_new` must end
a run with nothing new, and hand every other case to the flow (None).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from medpipe.config import Config
from medpipe.ingest import catalogue_path, plan_studies, scan_archive
from medpipe.outputs import OutputLayout, clean_work
from medpipe.run_plan import decide, models_identity, nothing_new
from medpipe.study import StudyContext, process_study

FAST = {"model": {"enabled": False}, "report": {"html": True, "dicom_seg": False, "dicom_sr": False},
        "run": {"retries": 0}}


@pytest.fixture()
def done(tmp_path: Path) -> tuple[Path, Path]:
    """An archive of one CT study and an OUT where it is published as a run would leave it."""
    from medpipe.phantom import ct_phantom
    from medpipe.sample import write_series

    root, out = tmp_path / "archive", tmp_path / "out"
    ph = ct_phantom(shape=(12, 48, 48), n_lesions=1, seed=5)
    write_series(ph.hu, ph.spacing, root / "p1" / "ct", modality="CT", intercept=-1024.0)
    (root / "notes.txt").write_text("not DICOM")  # a file problem: reported every run, never a reason to run
    cfg = Config.model_validate(FAST)
    scan = scan_archive(root, cfg.ingest, catalogue=catalogue_path(out, root))
    (todo,), _ = decide([p.to_dict() for p in plan_studies(scan, cfg.ingest)], OutputLayout(out), cfg,
                        models_identity(cfg))
    gate = out / ".work" / "r1"
    gate.mkdir(parents=True)
    ctx = StudyContext(staging=gate / todo.plan["study_key"], out=out, cfg=cfg, archive=str(root), gate=gate,
                       provenance={"run_id": "r1", "input_fingerprint": todo.fingerprint,
                                   "config": cfg.model_dump(mode="json"), "config_fingerprint": cfg.fingerprint(),
                                   "versions": {}})
    assert process_study(todo.plan, ctx).status == "ok"
    clean_work(out)
    return root, out


def test_nothing_new_writes_the_record_and_needs_no_flow(done: tuple[Path, Path], tmp_path: Path) -> None:
    root, out = done
    published = (out / "studies").iterdir().__next__()
    before = {p: p.stat().st_mtime_ns for p in published.rglob("*")}
    run = nothing_new(root, out, Config.model_validate(FAST))

    assert run is not None and run["status"] == "completed"
    assert run["counts"] == {"ok": 0, "failed": 0, "skipped": 1, "interrupted": 0, "deferred": 0}
    (study,) = run["studies"]
    assert study["status"] == "skipped" and study["reason"] == "unchanged since its last successful run"
    assert run["prefect"] == {} and run["dask"] == {"dashboard": None}
    assert json.loads((out / "run.json").read_text())["run_id"] == run["run_id"]
    assert (out / "run.html").stat().st_size > 0
    # The file problem is reported by its token, its path only in the operator's log.
    (issue,) = run["issues"]
    assert issue["path"].startswith("f-") and "notes.txt" not in json.dumps(run)
    assert "notes.txt" in (out / "private" / "file-issues.jsonl").read_text()
    assert {p: p.stat().st_mtime_ns for p in published.rglob("*")} == before  # nothing published touched
    assert not (out / ".medpipe.lock").exists()


@pytest.mark.parametrize("change", ["touched", "added", "damaged", "force", "config", "send"])
def test_anything_to_do_goes_to_the_flow(done: tuple[Path, Path], tmp_path: Path, change: str) -> None:
    root, out = done
    cfg: dict[str, Any] = json.loads(json.dumps(FAST))
    first = sorted((root / "p1" / "ct").iterdir())[0]
    if change == "touched":  # same bytes, new mtime: its header is read again (by the flow)
        os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    elif change == "added":
        shutil.copy(first, root / "p1" / "new.dcm")
    elif change == "damaged":  # a published file truncated: the study is redone
        report = next((out / "studies").iterdir()) / "report.json"
        report.write_bytes(report.read_bytes()[:10])
    elif change == "force":
        cfg["run"]["force"] = True
    elif change == "config":  # another filter: every study's outputs change
        cfg["filters"] = {"pipelines": {"CT": [{"op": "gaussian", "params": {"sigma": 1.0}}]}}
    else:
        cfg["send"] = {"destinations": ["dicomweb+http://127.0.0.1:1/dicom-web"]}
    assert nothing_new(root, out, Config.model_validate(cfg)) is None
    assert not (out / "run.json").exists()  # the flow's run writes the record


def test_a_run_in_progress_is_left_to_the_flow(done: tuple[Path, Path], tmp_path: Path) -> None:
    from medpipe.outputs import run_lock

    root, out = done
    with run_lock(out):  # another live run writes OUT: the flow reports it as locked
        assert nothing_new(root, out, Config.model_validate(FAST)) is None
