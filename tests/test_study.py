"""The study as the unit of work (medpipe.study): no Prefect, no cluster.

Real library stages on a tiny CT phantom (Zarr on disk, SciPy operators). Faults are real too:
the progress hook, told when a stage starts, breaks what that stage needs on disk (the files
it reads, or a path it writes), as a failing disk or a lost file would.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from medpipe.config import Config
from medpipe.ingest import StudyPlan, plan_studies, scan_archive
from medpipe.publish import close_gate
from medpipe.study import StageResult, StudyContext, StudyEntry, process_study, run_window

FAST = {"model": {"enabled": False}, "report": {"html": True, "dicom_seg": False, "dicom_sr": False},
        "run": {"retries": 0}}
RUN_JSON_FIELDS = ["study_key", "status", "error", "output", "previous_output_kept", "modality", "seconds",
                   "timings", "findings", "files"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One small CT phantom study and its plan."""
    from medpipe.phantom import ct_phantom
    from medpipe.sample import stable_uid, write_series

    root = tmp_path_factory.mktemp("study-archive")
    ph = ct_phantom(shape=(12, 48, 48), n_lesions=1, seed=3)
    write_series(ph.hu, ph.spacing, root / "p1" / "ct", modality="CT", study_uid=stable_uid("test-study", 1),
                 series_uid=stable_uid("test-study-series", 1), intercept=-1024.0, series_description="CHEST")
    cfg = Config.model_validate(FAST)
    (plan,) = plan_studies(scan_archive(root, cfg.ingest), cfg.ingest)
    return root, plan.to_dict()


def context(root: Path, plan: dict[str, Any], out: Path, cfg: Config, run_id: str = "r1",
            fingerprint: str = "fp-1") -> StudyContext:
    gate = out / ".work" / run_id
    gate.mkdir(parents=True, exist_ok=True)
    prov = {"run_id": run_id, "input_fingerprint": fingerprint, "config": cfg.model_dump(mode="json"),
            "config_fingerprint": cfg.fingerprint(), "versions": {}}
    return StudyContext(staging=gate / plan["study_key"], out=out, cfg=cfg, provenance=prov, archive=str(root),
                        gate=gate)


def published(out: Path, key: str) -> dict[str, Any]:
    return json.loads((out / "studies" / key / "report.json").read_text())


class Events:
    """A progress hook that records what it is told and runs ``faults[stage]`` when a stage starts."""

    def __init__(self, faults: dict[str, Any] | None = None):
        self.seen: list[tuple[str, str, dict[str, Any]]] = []
        self.faults = faults or {}

    def __call__(self, stage: str, event: str, info: dict[str, Any]) -> None:
        self.seen.append((stage, event, info))
        if event == "start" and stage in self.faults:
            self.faults[stage]()


def test_a_study_runs_every_stage_and_publishes(archive, tmp_path: Path) -> None:
    root, plan = archive
    cfg = Config.model_validate(FAST)
    events = Events()
    ctx = context(root, plan, tmp_path / "out", cfg)
    entry = process_study(StudyPlan.from_dict(plan), ctx, progress=events)

    assert isinstance(entry, StudyEntry) and entry.status == "ok", entry.error
    d = entry.to_dict()
    assert list(d)[:len(RUN_JSON_FIELDS)] == RUN_JSON_FIELDS  # run.json's study entry, as before
    assert "private_issues" not in d and "stages" not in d and "reason" not in d
    assert d["output"] == f"studies/{plan['study_key']}" and d["previous_output_kept"] is False
    model = next(iter(d["models"]))
    assert d["models"][model] == {"applicable": False, "reason": "inference disabled in the configuration"}
    assert {"ingest", "filter", "segment", f"infer:{model}", "report", "infer"} <= set(d["timings"])
    # The study's wall time: infer runs beside filter and segment, so at most the sum of the stages.
    chain = sum(d["timings"][k] for k in ("ingest", "filter", "segment", "report"))
    assert chain - 0.01 <= d["seconds"] <= sum(v for k, v in d["timings"].items() if k != "infer") + 0.5
    # The hook is told of every stage, ingest first and report last, with its seconds at the end;
    # infer runs beside filter -> segment.
    order = ["ingest", "filter", "segment", f"infer:{model}", "report"]
    seen = [(s, e) for s, e, _ in events.seen]
    assert sorted(seen) == sorted((s, e) for s in order for e in ("start", "end"))
    assert seen[:2] == [("ingest", "start"), ("ingest", "end")] and seen[-2:] == [("report", "start"), ("report", "end")]
    assert seen.index(("filter", "end")) < seen.index(("segment", "start"))
    assert all(seen.index((s, "start")) < seen.index((s, "end")) for s in order)
    ends = {s: i for s, e, i in events.seen if e == "end"}
    assert all(ends[s]["error"] is None and ends[s]["seconds"] >= 0 for s in order)
    assert all(i["study_key"] == plan["study_key"] for _, _, i in events.seen)
    assert [s.name for s in entry.stages] == order and all(isinstance(s, StageResult) for s in entry.stages)
    report = published(ctx.out, plan["study_key"])
    assert report["status"] == "ok" and report["provenance"]["input_fingerprint"] == "fp-1"
    assert not ctx.staging.exists()  # swapped into place


def _rm(path: Path):
    return lambda: shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("stage", ["ingest", "filter", "segment", "report"])
def test_a_failed_stage_still_yields_a_published_failed_report(archive, tmp_path: Path, stage: str) -> None:
    root, plan = archive
    cfg = Config.model_validate(FAST)
    ctx = context(root, plan, tmp_path / "out", cfg)
    src = tmp_path / "src"  # a copy of the archive whose files the ingest fault deletes
    shutil.copytree(root, src)
    plan = {**plan, "files": [f.replace(str(root), str(src)) for f in plan["files"]]}
    ctx.archive = str(src)
    staging = ctx.staging
    faults = {
        "ingest": lambda: shutil.rmtree(src),                                   # the archive's files are gone
        "filter": _rm(staging / "image.zarr" / "0"),                            # its input is lost
        "segment": _rm(staging / "filtered.zarr"),
        "report": lambda: (staging / "report.html").mkdir(),                    # a path it cannot write
    }
    entry = process_study(plan, ctx, progress=Events({stage: faults[stage]}))

    assert entry.status == "failed"
    assert entry.error and (entry.error.startswith(f"{stage}: ") or f"; {stage}: " in entry.error
                            or f"{stage}: " in entry.error), entry.error
    report = published(ctx.out, plan["study_key"])
    assert report["status"] == "failed" and f"{stage}: " in report["error"]
    assert entry.to_dict()["output"] == f"studies/{plan['study_key']}"
    assert str(src) not in json.dumps(entry.to_dict()) + json.dumps(report)  # paths are tokens
    ran = [s.name for s in entry.stages]
    assert ran[-1] == "report" and stage in ran
    if stage == "filter":  # segment needs the filter; inference does not
        assert "segment" not in ran and any(n.startswith("infer:") for n in ran)


def test_a_failed_model_is_the_infer_stage_s_failure(archive, tmp_path: Path) -> None:
    root, plan = archive
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a keras archive")
    cfg = Config.model_validate({**FAST, "model": {"enabled": True, "path": str(bad), "name": "broken"}})
    ctx = context(root, plan, tmp_path / "out", cfg)
    entry = process_study(plan, ctx)

    assert entry.status == "failed" and "infer:broken: " in entry.error, entry.error
    assert entry.models == {"broken": {"error": next(s.error for s in entry.stages if s.name == "infer:broken")}}
    assert {"ingest", "filter", "segment"} <= set(entry.timings)  # the other stages ran and are reported
    assert published(ctx.out, plan["study_key"])["status"] == "failed"


def test_a_good_published_result_is_kept_when_a_rerun_fails(archive, tmp_path: Path) -> None:
    root, plan = archive
    cfg = Config.model_validate(FAST)
    out = tmp_path / "out"
    first = process_study(plan, context(root, plan, out, cfg, "r1", "fp-1"))
    assert first.status == "ok"
    good = published(out, plan["study_key"])

    ctx = context(root, plan, out, cfg, "r2", "fp-2")
    entry = process_study(plan, ctx, progress=Events({"segment": _rm(ctx.staging / "filtered.zarr")}))
    assert entry.status == "failed" and "segment: " in entry.error
    assert entry.previous_output_kept is True
    assert published(out, plan["study_key"]) == good  # untouched


def test_a_rerun_of_a_study_this_run_published_keeps_it(archive, tmp_path: Path) -> None:
    """A study task run again (its worker was lost after publishing) reports what it published."""
    root, plan = archive
    cfg = Config.model_validate(FAST)
    ctx = context(root, plan, tmp_path / "out", cfg)
    assert process_study(plan, ctx).status == "ok"
    events = Events()
    again = process_study(plan, ctx, progress=events)
    assert again.status == "ok" and again.output == f"studies/{plan['study_key']}" and events.seen == []


def test_a_closed_gate_publishes_nothing(archive, tmp_path: Path) -> None:
    from medpipe.publish import GateClosed

    root, plan = archive
    cfg = Config.model_validate(FAST)
    ctx = context(root, plan, tmp_path / "out", cfg)
    with pytest.raises(GateClosed):
        process_study(plan, ctx, progress=Events({"report": lambda: close_gate(ctx.gate)}))
    assert not (ctx.out / "studies" / plan["study_key"]).exists()


def test_fetch_runs_first_and_its_files_are_ingested(archive, tmp_path: Path) -> None:
    root, plan = archive
    cfg = Config.model_validate(FAST)
    ctx = context(root, plan, tmp_path / "out", cfg)
    folders: list[Path] = []

    def fetch(p: StudyPlan, folder: Path) -> StudyPlan:
        """A PACS stand-in: copy the study's files into ``folder``."""
        folders.append(folder)
        files = [str(shutil.copy(f, folder / f"{i}.dcm")) for i, f in enumerate(p.files)]
        return StudyPlan.from_dict({**p.to_dict(), "files": files})

    remote = {**plan, "files": [f + ".not-here" for f in plan["files"]]}  # only fetch can find them
    events = Events()
    entry = process_study(remote, ctx, progress=events, fetch=lambda p, d: fetch(StudyPlan.from_dict(plan), d))
    assert entry.status == "ok", entry.error
    assert [s for s, e, _ in events.seen if e == "start"][:2] == ["fetch", "ingest"]
    assert "fetch" in entry.timings
    assert folders and not folders[0].exists()  # the fetched copies go when the study is done

    def broken(p: StudyPlan, folder: Path) -> StudyPlan:
        raise ConnectionError("PACS not reachable")

    ctx2 = context(root, plan, tmp_path / "out2", cfg)
    failed = process_study(plan, ctx2, fetch=broken)
    assert failed.status == "failed" and failed.error.startswith("fetch: ConnectionError"), failed.error
    assert [s.name for s in failed.stages] == ["fetch", "report"]


def test_the_window_bounds_studies_in_flight() -> None:
    lock, now, peak = threading.Lock(), [0], [0]
    done: list[int] = []

    def work(i: int) -> int:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.02)
        with lock:
            now[0] -= 1
        return i

    with ThreadPoolExecutor(8) as ex:
        left = run_window(range(12), lambda i: ex.submit(work, i), lambda i, f: done.append(f.result()), 3,
                          poll_s=0.01)
    assert sorted(done) == list(range(12)) and peak[0] == 3
    assert (left.in_flight, left.waiting) == ([], [])
    with pytest.raises(ValueError):
        run_window([1], lambda i: ex.submit(work, i), lambda i, f: None, 0)


def test_a_stopped_window_starts_nothing_more_and_says_what_is_left() -> None:
    gate = threading.Event()
    stop = threading.Event()
    done: list[int] = []

    def on_done(i: int, f: Any) -> None:
        done.append(i)
        stop.set()  # the stop comes while the others are in flight

    def work(i: int) -> int:
        if i:
            gate.wait(5)
        return i

    with ThreadPoolExecutor(4) as ex:
        left = run_window(range(6), lambda i: ex.submit(work, i), on_done, 2, stopped=stop.is_set, poll_s=0.01)
        gate.set()
    assert done == [0]
    assert left.in_flight == [1] and left.waiting == [2, 3, 4, 5]


def test_the_skip_decision_reads_the_models_without_tensorflow() -> None:
    """A night with nothing new decides from the model files' hashes and domains (tasks.model):
    TensorFlow is not imported, and the description is what the full check returns."""
    import subprocess
    import sys

    code = ("import sys; from tasks.model import describe_models; from medpipe.config import Config; "
            "d = describe_models(Config().model_dump(mode='json')); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow imported'; "
            "assert d['sha256'] and d['domain'] and d['models'][0]['sha256'] == d['sha256'], d; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_window_is_configured_and_validated() -> None:
    from medpipe.errors import ConfigError

    assert Config().run.max_studies_in_flight is None  # two per worker (flows.archive.window_size)
    assert Config.model_validate({"run": {"max_studies_in_flight": 3}}).run.max_studies_in_flight == 3
    with pytest.raises((ConfigError, ValueError)):
        Config.model_validate({"run": {"max_studies_in_flight": -1}})
