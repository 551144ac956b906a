"""Peak memory of the process that runs a study, stage by stage.

Runs :func:`medpipe.study.process_study` on the one study of ARCHIVE in this process (as a
run's study task does in its worker), with filter and segment on a ``LocalCluster`` of 2 worker
processes x 1 thread, samples this process's RSS every 20 ms and prints each stage's peak
(infer runs beside filter and segment, so their windows overlap).

Usage::

    .venv/bin/python benchmarks/study_memory.py ARCHIVE OUT   # OUT is removed first
"""
import sys, threading, time, os, shutil
from pathlib import Path
import psutil


def main():
    from distributed import Client, LocalCluster, worker_client
    from medpipe.config import Config
    from medpipe.ingest import plan_studies, scan_archive
    from medpipe.study import StudyContext, process_study
    from medpipe.run_plan import decide, models_identity
    from medpipe.outputs import OutputLayout
    archive, out = Path(sys.argv[1]), Path(sys.argv[2])
    shutil.rmtree(out, ignore_errors=True)
    cfg = Config()
    plans = [p.to_dict() for p in plan_studies(scan_archive(archive, cfg.ingest), cfg.ingest)]
    (todo,), _ = decide(plans, OutputLayout(out), cfg, models_identity(cfg))
    proc = psutil.Process()
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.perf_counter(), proc.memory_info().rss / 2**20))
            time.sleep(0.02)
    events = []

    def hook(stage, event, info):
        events.append((time.perf_counter(), stage, event))
    gate = out / ".work" / "r1"
    gate.mkdir(parents=True)
    ctx = StudyContext(staging=gate / todo.plan["study_key"], out=out, cfg=cfg, archive=str(archive), gate=gate,
                       provenance={"run_id": "r1", "input_fingerprint": todo.fingerprint,
                                   "config": cfg.model_dump(mode="json"), "config_fingerprint": cfg.fingerprint(),
                                   "versions": {}})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, Client(cluster):
        threading.Thread(target=sample, daemon=True).start()
        t0 = time.perf_counter()
        entry = process_study(todo.plan, ctx, progress=hook)
        stop.set()
    print(entry.status, entry.error, entry.timings)
    starts = {}
    for t, stage, ev in events:
        if ev == "start":
            starts[stage] = t
        else:
            win = [r for (ts, r) in samples if starts[stage] <= ts <= t]
            print(f"{stage:35s} {starts[stage]-t0:6.2f}-{t-t0:6.2f}s  peak {max(win) if win else 0:7.0f} MiB")
    print("overall peak", max(r for _, r in samples))


if __name__ == "__main__":
    main()
