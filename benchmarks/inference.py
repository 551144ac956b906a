"""Inference throughput: medpipe's stage (Zarr -> preprocess -> batched predict on Dask workers)
beside a bare ``model.predict`` over the same preprocessed batches held in memory.

    .venv/bin/python benchmarks/inference.py [--slices 192] [--pixels 256] [--batch 32] [--workers 2]

Prints one table from one run: slices/s of each path, the ratio (goal >= 0.9), and the peak
resident memory of each process (VmHWM). The stage is timed on its second call, after
every worker has loaded the model once (that is what a night of many studies sees).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from medpipe import omezarr  # noqa: E402
from medpipe.config import Config  # noqa: E402
from medpipe.phantom import ct_phantom  # noqa: E402


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss would include a spawning parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=192)
    ap.add_argument("--pixels", type=int, default=256, help="in-plane size of the synthetic CT")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    args = ap.parse_args()

    import distributed

    from medpipe.inference.model import load_model, resolve_model
    from medpipe.inference.preprocess import preprocess_slices
    from medpipe.inference.stage import infer_study

    cfg = Config.model_validate({"model": {"batch_size": args.batch, "saliency_slices": 0}})
    info = resolve_model(cfg.model)
    spacing = (2.5, 256 / args.pixels, 256 / args.pixels)  # 256 mm field of view, model grid 2 mm
    with tempfile.TemporaryDirectory(prefix="medpipe-bench-") as tmp:
        ph = ct_phantom((args.slices, args.pixels, args.pixels), spacing, n_lesions=4, seed=3)
        study = Path(tmp) / "study"
        omezarr.write_image(study / "image.zarr", ph.hu, spacing, levels=1)

        # Bare: the same preprocessed batches in memory, one model.predict over them.
        model = load_model(info).keras
        t = time.perf_counter()
        x = preprocess_slices(ph.hu, spacing[1:], size=info.size, window=info.window, spacing_mm=info.spacing_mm)
        t_pre = time.perf_counter() - t
        model.predict(x[: args.batch], batch_size=args.batch, verbose=0)  # warm-up (graph build)
        bare = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            model.predict(x, batch_size=args.batch, verbose=0)
            bare.append(time.perf_counter() - t)
        floor = []  # TensorFlow alone: predict_on_batch per batch, no input pipeline
        for _ in range(args.repeats):
            t = time.perf_counter()
            for i in range(0, len(x), args.batch):
                model.predict_on_batch(x[i: i + args.batch])
            floor.append(time.perf_counter() - t)
        bare_rss = peak_rss_mib()

        # Stage: infer_study's batch path over a process LocalCluster (as in the flow).
        with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                      dashboard_address=":0", worker_dashboard_address=":0") as cluster, \
                distributed.Client(cluster) as client:
            infer_study(study, "CT", cfg)  # warm-up: each worker loads the model once
            stage = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                res = infer_study(study, "CT", cfg)
                stage.append(time.perf_counter() - t)
            worker_rss = client.run(peak_rss_mib)
            loads = client.run(lambda: sum(__import__("medpipe.inference.model", fromlist=["x"]).load_count().values()))

    n = args.slices
    b, s = min(bare), min(stage)
    print(f"study: {n} slices of {args.pixels}x{args.pixels} int16, batch {args.batch}, model {info.name} "
          f"{info.version} ({info.input_shape}), {os.cpu_count()} CPUs, {args.workers} workers x 1 thread")
    print(f"{'path':<52}{'seconds':>9}{'slices/s':>10}")
    print(f"{'bare model.predict (preprocessed, in memory)':<52}{b:>9.3f}{n / b:>10.1f}")
    print(f"{'medpipe infer_study (Zarr+preprocess+predict)':<52}{s:>9.3f}{n / s:>10.1f}")
    print(f"{'preprocessing alone (one process, not in bare)':<52}{t_pre:>9.3f}{n / t_pre:>10.1f}")
    f = min(floor)
    print(f"{'predict_on_batch loop (TF alone, in memory)':<52}{f:>9.3f}{n / f:>10.1f}")
    print(f"ratio stage / bare: {b / s:.2f} (goal >= 0.9)")
    print(f"peak RSS: bare process {bare_rss:.0f} MiB; workers "
          + ", ".join(f"{v:.0f} MiB" for v in worker_rss.values())
          + f"; model loads per worker: {sorted(loads.values())}; score {res['study_score']:.3f}")


if __name__ == "__main__":
    main()
