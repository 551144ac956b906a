"""The filter and segment stages of one CT study on a local Dask cluster, as ``medpipe run`` has it.

Makes a staging folder with the ingest stage (``medpipe.study.ingest_stage``) from an archive
(default: a 300-slice 512x512 CT phantom written by ``benchmarks/e2e.py::write_studies``), then
times ``filter_study`` and ``segment_study`` on a ``LocalCluster`` of 2 worker processes x 1
thread (``distributed.Client`` active, as in a run) and samples the RSS of every worker with
psutil every 50 ms. Prints wall seconds and each worker's peak RSS per stage.

Usage::

    .venv/bin/python benchmarks/segment_stage.py --archive /tmp/arch1 --work /tmp/seg-work300
    .venv/bin/python benchmarks/segment_stage.py --slices 1000 --work /tmp/seg-work1000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def staging_folder(archive: Path, work: Path) -> Path:
    """``work/staging`` ingested from the first study of ``archive`` (made once, then reused)."""
    from medpipe.config import Config
    from medpipe.ingest import plan_studies, scan_archive
    from medpipe.study import ingest_stage

    staging = work / "staging"
    if (staging / "image.zarr").exists():
        return staging
    cfg = Config()
    plans = [p for p in plan_studies(scan_archive(archive, cfg.ingest), cfg.ingest) if p.files]
    work.mkdir(parents=True, exist_ok=True)
    ingest_stage(plans[0], staging, cfg)
    return staging


def in_worker(func, *args):
    """``func(*args)`` as a study task runs it on a worker: seceded, the cluster the default
    scheduler of its computations (``tasks/dask_client.py``)."""
    import distributed

    with distributed.worker_client() as client, client.as_current():
        return func(*args)


class RssSampler:
    """Peak RSS (bytes) of each of ``pids``, sampled every ``period`` seconds in a thread."""

    def __init__(self, pids: list[int], period: float = 0.05):
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.peak = {p: 0 for p in pids}
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in self.procs:
                try:
                    self.peak[proc.pid] = max(self.peak[proc.pid], proc.memory_info().rss)
                except Exception:
                    pass
            time.sleep(self.period)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cpu(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of the processes ``pids`` so far."""
    import psutil

    times = [psutil.Process(p).cpu_times() for p in pids]
    return sum(t.user for t in times), sum(t.system for t in times)


def _task_seconds(stream: list[dict]) -> str:
    """Seconds of compute per task-name prefix, largest first."""
    import re
    from collections import Counter

    total: Counter = Counter()
    for task in stream:
        name = re.sub(r"-[0-9a-f]{8,}.*$", "", str(task["key"]).strip("(')").split("'")[0])
        for part in task.get("startstops", ()):
            if part["action"] == "compute":
                total[name] += part["stop"] - part["start"]
    return ", ".join(f"{k} {v:.2f}" for k, v in total.most_common(12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="DICOM archive (default: write a phantom study)")
    parser.add_argument("--slices", type=int, default=300, help="slices of the phantom study written")
    parser.add_argument("--work", type=Path, default=Path("/tmp/segment-stage"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tasks", action="store_true", help="print task seconds by task name")
    parser.add_argument("--profile", action="store_true", help="save a Dask performance report per stage")
    args = parser.parse_args()

    from distributed import Client, LocalCluster, performance_report

    from medpipe.config import Config
    from medpipe.ops.stage import filter_study, segment_study

    archive = args.archive
    if archive is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from e2e import write_studies

        archive = args.work / "archive"
        if not archive.exists():
            write_studies(archive, 1, args.slices)
    staging = staging_folder(archive, args.work)
    cfg = Config()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        print(f"{staging}: load average {os.getloadavg()[0]:.1f}")
        for rep in range(args.repeat):
            for name, func in (("filter", filter_study), ("segment", segment_study)):
                client.run(lambda: __import__("gc").collect())
                cpu0 = _cpu(pids)
                with RssSampler(pids) as rss:
                    t0 = time.perf_counter()
                    client.get_task_stream()  # start recording (cleared per stage below)
                    if args.profile:
                        with performance_report(filename=str(args.work / f"{name}-{rep}.html")):
                            out = client.submit(in_worker, func, staging, "CT", cfg, pure=False).result()
                    else:
                        out = client.submit(in_worker, func, staging, "CT", cfg, pure=False).result()
                    wall = time.perf_counter() - t0
                user, system = (b - a for a, b in zip(cpu0, _cpu(pids)))
                peaks = " ".join(f"{v / 2**20:.0f}" for v in rss.peak.values())
                extra = f" labels {len(out['measurements'])}, candidates {len(out['lesion_candidates'])}" \
                    if name == "segment" else ""
                print(f"run {rep + 1} {name:8s} {wall:6.2f} s wall, "
                      f"workers' CPU {user:5.2f} user + {system:5.2f} system s, "
                      f"worker peak RSS {peaks} MiB{extra}", flush=True)
                if args.tasks:
                    print("   task seconds: " + _task_seconds(client.get_task_stream(start=t0)))
    shutil.rmtree(args.work / "dask-worker-space", ignore_errors=True)


if __name__ == "__main__":
    main()
