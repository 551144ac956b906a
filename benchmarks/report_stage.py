"""The report stage of one study alone: ``report_study`` (report.json, HTML with figures, DICOM
SEG and SR, their de-identified copies, verification, publishing) on a staged study.

The study's earlier stages (ingest, filter, segment, infer) run once, through
``medpipe.study.process_study``, whose progress hook copies the staging folder aside when the
report stage starts; each timed repeat then runs ``report_study`` on a fresh copy of it (the
copy is not timed). Printed: wall and CPU seconds of each repeat (the stage runs in this one
process and thread), and the split of the best one by part (functions of ``medpipe.report``
and ``medpipe.publish`` timed in place, CPU seconds; nested parts are inside their parents'
figures).

Usage::

    .venv/bin/python benchmarks/report_stage.py                         # a 300-slice 512x512 CT phantom
    .venv/bin/python benchmarks/report_stage.py --archive /tmp/arch1    # an archive of one study
    .venv/bin/python benchmarks/report_stage.py --staged /tmp/me-staged # keep the staged study for reruns
    .venv/bin/python benchmarks/report_stage.py --profile 30            # cProfile of one repeat, top 30
    .venv/bin/python benchmarks/report_stage.py --cluster               # a LocalCluster the default scheduler

``--cluster`` makes a ``distributed.LocalCluster`` (2 processes x 1 thread, as ``medpipe run``)
the default Dask scheduler while the stage runs, as it is in a study task of a run: Dask work
the stage does not keep in its own thread then goes to the workers (their CPU is not in the
CPU seconds printed, only in the wall time).

Timing on a shared machine is noisy: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (module, function) timed in place for the split; nested ones are inside their parents.
PARTS = [
    ("medpipe.report.study", "write_study_report"),
    ("medpipe.report.dicom", "make_objects"),
    ("medpipe.report.dicom", "_read_sources"),
    ("medpipe.report.dicom", "_prepare"),
    ("medpipe.report.dicom", "build_seg"),
    ("medpipe.report.dicom", "build_sr"),
    ("medpipe.report.dicom", "deidentified_bytes"),
    ("medpipe.report.dicom", "_encode"),
    ("medpipe.report.study", "render_study_html"),
    ("medpipe.report.html", "study_figures"),
    ("medpipe.publish", "verify_study"),
    ("medpipe.study", "publish_study"),
]


def stage(archive: Path, staged: Path) -> None:
    """Run the study's stages before the report; leave ``staged`` with the staging folder
    (``study/``) and what ``report_study`` needs (``inputs.json``)."""
    from medpipe.config import Config
    from medpipe.ingest import StudyPlan, plan_studies, scan_archive
    from medpipe.study import process_study

    cfg = Config()
    (plan,) = plan_studies(scan_archive(archive, cfg.ingest), cfg.ingest)
    work = Path(tempfile.mkdtemp(prefix="report-stage-", dir=staged.parent))
    try:
        ctx = _context(plan.to_dict(), archive, work / "out", cfg)

        def snapshot(name: str, event: str, info: dict[str, Any]) -> None:
            if name == "report" and event == "start":
                shutil.copytree(ctx.staging, staged / "study")

        staged.mkdir(parents=True, exist_ok=True)
        entry = process_study(StudyPlan.from_dict(plan.to_dict()), ctx, progress=snapshot)
        stages = [{"name": s.name, "seconds": s.seconds, "value": s.value, "error": s.error}
                  for s in entry.stages if s.name != "report"]
        (staged / "inputs.json").write_text(json.dumps({"plan": plan.to_dict(), "archive": str(archive),
                                                         "stages": stages}, default=str))
        print(f"staged {plan.study_key}: " + ", ".join(f"{s['name']} {s['seconds']:.1f} s" for s in stages)
              + f"; whole report stage {entry.timings.get('report', 0):.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _context(plan: dict[str, Any], archive: Path, out: Path, cfg: Any) -> Any:
    from medpipe.study import StudyContext

    gate = out / ".work" / "bench"
    gate.mkdir(parents=True, exist_ok=True)
    prov = {"run_id": "bench", "input_fingerprint": "bench-fingerprint", "config": cfg.model_dump(mode="json"),
            "config_fingerprint": cfg.fingerprint(), "versions": {}}
    return StudyContext(staging=gate / plan["study_key"], out=out, cfg=cfg, provenance=prov, archive=str(archive),
                        gate=gate)


class Split:
    """CPU seconds (this process, all threads) spent in each of :data:`PARTS`, by wrapping them
    in their modules: on a shared machine they vary less than wall seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        for module, name in PARTS:
            mod = sys.modules.get(module) or __import__(module, fromlist=[name])
            if hasattr(mod, name):
                setattr(mod, name, self._wrap(f"{module.rsplit('.', 1)[-1]}.{name}", getattr(mod, name)))

    def _wrap(self, label: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.process_time() - t0
                self.calls[label] += 1
        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def run_once(staged: Path, scratch: Path, profile: int = 0) -> tuple[float, float, Any]:
    """One ``report_study`` on a fresh copy of the staged study: (wall s, CPU s, entry)."""
    from medpipe.config import Config
    from medpipe.study import StageResult, report_study

    inputs = json.loads((staged / "inputs.json").read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    cfg = Config()
    ctx = _context(inputs["plan"], Path(inputs["archive"]), scratch / "out", cfg)
    shutil.copytree(staged / "study", ctx.staging)
    stages = [StageResult(**s) for s in inputs["stages"]]
    prof = cProfile.Profile() if profile else None
    w0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    entry = report_study(inputs["plan"], stages, ctx)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if entry.status != "ok":
        raise SystemExit(f"report stage failed: {entry.error}")
    if prof:
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof).sort_stats(key).print_stats(profile)
    return wall, cpu, entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path, help="an archive of one study (default: a CT phantom written here)")
    ap.add_argument("--slices", type=int, default=300, help="slices of the phantom study (default 300)")
    ap.add_argument("--staged", type=Path, help="keep the staged study here (reused when present)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile one more repeat, print top N")
    ap.add_argument("--cluster", action="store_true", help="a LocalCluster as the default Dask scheduler")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="report-stage-"))
    try:
        staged = args.staged or tmp / "staged"
        if not (staged / "inputs.json").is_file():
            archive = args.archive
            if archive is None:
                sys.path.insert(0, str(ROOT / "benchmarks"))
                from e2e import write_studies

                archive = tmp / "archive"
                write_studies(archive, 1, args.slices)
            shutil.rmtree(staged, ignore_errors=True)
            stage(archive, staged)
        client = None
        if args.cluster:
            from distributed import Client, LocalCluster

            client = Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None))
        split = Split()
        runs = []
        for _ in range(args.repeat):
            split.reset()
            wall, cpu, entry = run_once(staged, tmp / "scratch")
            runs.append((wall, cpu, dict(split.seconds), dict(split.calls)))
        print(f"load average {os.getloadavg()[0]:.1f}; report stage (report_study) of study {entry.study_key}, "
              f"files {entry.files}")
        for n, (wall, cpu, _, _) in enumerate(runs, 1):
            print(f"  repeat {n}: {wall:6.2f} s wall, {cpu:6.2f} CPU-s")
        wall, cpu, parts, calls = min(runs, key=lambda r: r[1])
        print(f"best: {wall:.2f} s wall, {cpu:.2f} CPU-s; split (CPU-s, calls):")
        for label, s in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {label:32s} {s:6.2f}  x{calls[label]}")
        if args.profile:
            run_once(staged, tmp / "scratch", profile=args.profile)
        if client is not None:
            client.cluster.close()
            client.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
