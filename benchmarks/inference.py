"""Inference throughput: medpipe's stage (Zarr -> preprocess -> batched predict on Dask workers)
beside a bare ``model.predict`` over the same preprocessed batches held in memory.

    .venv/bin/python benchmarks/inference.py [--slices 192] [--pixels 256] [--batch 32]
                                             [--workers 2] [--threads 1] [--repeats 7]
    .venv/bin/python benchmarks/inference.py --many-studies 200 --slices 64 [--batch 32]
                                             [--concurrent 8] [--repeats 2]

Since issue 14 the stage runs a study of this size in the calling process (``--fan-out``: as
tasks over the cluster's workers, as before).

Fair and repeatable on a shared machine: both sides see the same slices and batch size and
are warmed up (the graph built, every worker's model loaded once); the timed repeats
alternate bare and stage (in turn first), so both see the same load, and the ratio is the
median of the per-pair ratios. The load average is printed before and after. A breakdown
times reading, preprocessing and predicting one batch at a time inside one worker (its
TensorFlow limited to the worker's threads) and in this process (TensorFlow on all cores).

``--study DIR``: a real study (a study folder with ``image.zarr``, e.g. one published by
``medpipe run``) through ``infer_study`` inside a worker of a fresh 2-worker x 1-thread
LocalCluster (as ``medpipe run`` runs it), two copies in turn (first and second study of that
worker): batches fanned out over the workers (what the stage did before issue 14) against
batches run in the study's own process, and the latter after :func:`warm_up`; wall and CPU
seconds of the study and CPU seconds of all workers. Also the model check at run start in a
fresh process: ``validate_model`` (loads TensorFlow) against ``inspect_model`` (files only).

    .venv/bin/python benchmarks/inference.py --study OUT/studies/KEY

``--many-studies N``: N small studies of ``--slices`` slices through ``infer_study``, ``--concurrent``
at a time in threads of this process (as one Dask worker process runs several study tasks; each
study's batches run in its own thread), once with per-study batching (``batch_across_studies``
off: every study's batches padded and predicted alone) and once with batches filled across
studies (:mod:`medpipe.inference.batching`), alternating in the same run; prints studies/s,
``predict`` calls and padded rows of both, and checks that both give the same scores.
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


def breakdown(image_path: str, cfg: Config, n: int, batch: int, repeats: int = 3) -> dict[str, float]:
    """Median milliseconds per batch of reading (Zarr), preprocessing and predicting, in this process."""
    import zarr

    from medpipe.inference.model import load_model, resolve_model
    from medpipe.inference.preprocess import preprocess_slices

    info = resolve_model(cfg.model)
    model = load_model(info)
    spacing = omezarr.read_meta(image_path).spacing[1:]
    arr = zarr.open_array(str(Path(image_path) / "0"), mode="r")
    times: dict[str, list[float]] = {"read": [], "preprocess": [], "predict": []}
    for _ in range(repeats):
        for a in range(0, n, batch):
            t0 = time.perf_counter()
            raw = arr[a: a + batch]
            t1 = time.perf_counter()
            x = preprocess_slices(raw, spacing, size=info.size, window=info.window, spacing_mm=info.spacing_mm)
            t2 = time.perf_counter()
            model.predict(x)
            t3 = time.perf_counter()
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[k].append(dt)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def many_studies(args: argparse.Namespace) -> None:
    """Per-study batching against batches filled across studies, on ``args.many_studies`` studies."""
    from concurrent.futures import ThreadPoolExecutor

    import dask

    from medpipe.inference import batching
    from medpipe.inference.model import load_model, resolve_model
    from medpipe.inference.stage import infer_study

    load0 = os.getloadavg()
    n_studies, n = args.many_studies, args.slices
    spacing = (2.5, 256 / args.pixels, 256 / args.pixels)
    base = {"batch_size": args.batch, "saliency_slices": 0, "batch_wait_ms": args.wait_ms}
    cfgs = {"per-study batching": Config.model_validate({"model": {**base, "batch_across_studies": False}}),
            "batched across studies": Config.model_validate({"model": base})}
    info = resolve_model(cfgs["per-study batching"].model)
    model = load_model(info)
    calls = [0]
    predict = model.predict

    def counted(batch: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return predict(batch)

    model.predict = counted  # type: ignore[method-assign]  # both modes call it through here
    with tempfile.TemporaryDirectory(prefix="medpipe-bench-") as tmp:
        # 8 distinct phantoms; the N study folders link to them (N full copies would only fill the disk).
        images = []
        for seed in range(min(8, n_studies)):
            ph = ct_phantom((n, args.pixels, args.pixels), spacing, n_lesions=2, seed=seed)
            images.append(Path(tmp) / f"image-{seed}.zarr")
            omezarr.write_image(images[-1], ph.hu, spacing, levels=1)
        studies = []
        for i in range(n_studies):
            studies.append(Path(tmp) / f"study-{i:04d}")
            studies[-1].mkdir()
            (studies[-1] / "image.zarr").symlink_to(images[i % len(images)])

        def run(cfg: Config) -> tuple[float, float, int, list]:
            batching.clear_batchers()
            calls[0] = 0
            t, c = time.perf_counter(), time.process_time()
            with dask.config.set(scheduler="synchronous"), ThreadPoolExecutor(args.concurrent) as pool:
                res = list(pool.map(lambda s: infer_study(s, "CT", cfg)["slice_scores"], studies))
            return time.perf_counter() - t, time.process_time() - c, calls[0], res

        for cfg in cfgs.values():  # warm-up: graph built, pools and caches filled
            run(cfg)
        times: dict[str, list[float]] = {k: [] for k in cfgs}
        cpu: dict[str, list[float]] = {k: [] for k in cfgs}
        n_calls: dict[str, int] = {}
        scores: dict[str, list] = {}
        for r in range(args.repeats):
            for name in (list(cfgs) if r % 2 == 0 else list(cfgs)[::-1]):
                dt, dc, n_calls[name], scores[name] = run(cfgs[name])
                times[name].append(dt)
                cpu[name].append(dc)
    load1 = os.getloadavg()
    print(f"{n_studies} studies of {n} slices of {args.pixels}x{args.pixels} int16, batch {args.batch}, "
          f"{args.concurrent} studies at a time in threads of one process, wait {args.wait_ms:g} ms; "
          f"model {info.name} {info.version} {info.input_shape}; {os.cpu_count()} CPUs; "
          f"{args.repeats} alternating repeats")
    print(f"load average (1, 5, 15 min): before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    # CPU seconds of this process: on a shared machine less noisy than wall time.
    print(f"{'mode':<26}{'median s':>10}{'best s':>9}{'studies/s':>11}{'CPU s':>8}{'predict calls':>15}"
          f"{'padded rows':>13}")
    for name in cfgs:
        med = float(np.median(times[name]))
        padded = n_calls[name] * args.batch - n_studies * n
        print(f"{name:<26}{med:>10.2f}{min(times[name]):>9.2f}{n_studies / med:>11.1f}"
              f"{float(np.median(cpu[name])):>8.1f}{n_calls[name]:>15}{padded:>13}")
    a, b = (float(np.median(times[k])) for k in cfgs)
    ca, cb = (float(np.median(cpu[k])) for k in cfgs)
    same = scores["per-study batching"] == scores["batched across studies"]
    print(f"speed-up of batching across studies: {a / b:.2f}x wall, {ca / cb:.2f}x CPU; "
          f"slice scores identical: {same}")


def _studies_in_worker(dirs: list[str], config: dict, fan_out: bool, warm: bool) -> dict:
    """On a worker, as a study task runs there: optionally warm up, then infer each study in turn."""
    import distributed

    from medpipe.inference.model import warm_up
    from medpipe.inference.stage import infer_study

    cfg = Config.model_validate(config)
    out: dict = {"studies": []}
    if warm:
        t, c = time.perf_counter(), time.process_time()
        warm_up(cfg.model.path)
        out["warm_up"] = (time.perf_counter() - t, time.process_time() - c)
    with distributed.worker_client() as client, client.as_current():
        for d in dirs:
            t, c = time.perf_counter(), time.process_time()
            res = infer_study(Path(d), "CT", cfg, fan_out=fan_out)
            out["studies"].append((time.perf_counter() - t, time.process_time() - c, res["study_score"]))
    return out


def _check_in_fresh_process(check: str) -> tuple[float, float]:
    """Seconds (wall, CPU) of ``check`` (inspect_model or validate_model) of the default model in a
    new interpreter, after its medpipe imports (as in a worker, which has them preloaded)."""
    import json
    import subprocess

    code = ("import json, time; from medpipe.config import ModelConfig; from medpipe.inference import model; "
            "from medpipe.inference import stage; "
            "t, c = time.perf_counter(), time.process_time(); "
            f"model.{check}(ModelConfig()); print(json.dumps([time.perf_counter() - t, time.process_time() - c]))")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=str(Path(__file__).resolve().parent.parent))
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))  # type: ignore[return-value]


def real_study(args: argparse.Namespace) -> None:
    """The stage and the model check on a real study; see the module docstring (``--study``)."""
    import shutil

    import distributed

    src = Path(args.study)
    image = src if src.name == "image.zarr" else src / "image.zarr"
    meta = omezarr.read_meta(image)
    load0 = os.getloadavg()
    config = {"model": {}}  # the defaults a run uses
    checks = {name: [_check_in_fresh_process(name) for _ in range(args.repeats)]
              for name in ("validate_model", "inspect_model")}
    modes = {"fanned out over workers (before)": (True, False), "in the study's process": (False, False),
             "in the study's process, after warm_up": (False, True)}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="medpipe-bench-") as tmp:
        dirs = []
        for i in range(2):
            dirs.append(str(Path(tmp) / f"study-{i}"))
            shutil.copytree(image, Path(dirs[-1]) / "image.zarr")
        for name, (fan_out, warm) in modes.items():
            with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                          worker_dashboard_address=":0") as cluster, \
                    distributed.Client(cluster) as client:
                client.wait_for_workers(2)
                first = sorted(client.scheduler_info()["workers"])[0]
                cpu0 = client.run(time.process_time)
                res = client.submit(_studies_in_worker, dirs, config, fan_out, warm, workers=[first],
                                    pure=False).result()
                cpu1 = client.run(time.process_time)
                loads = client.run(lambda: sum(__import__("medpipe.inference.model", fromlist=["x"])
                                               .load_count().values()))
                rss = client.run(peak_rss_mib)
            rows[name] = (res, sum(cpu1[w] - cpu0[w] for w in cpu1), sorted(loads.values()), max(rss.values()))
    load1 = os.getloadavg()
    print(f"study {src}: {meta.shape[0]} slices of {meta.shape[1]}x{meta.shape[2]} {meta.dtype} at "
          f"{meta.spacing[1]:g} mm; default model, batch {Config().model.batch_size}, saliency "
          f"{Config().model.saliency_slices} slices; {os.cpu_count()} CPUs, 2 workers x 1 thread")
    print(f"load average (1, 5, 15 min): before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(f"{'model check at run start (fresh process)':<44}{'wall s':>8}{'CPU s':>8}   (median of {args.repeats})")
    for name, runs in checks.items():
        w, c = np.median(np.array(runs), axis=0)
        print(f"{name:<44}{w:>8.3f}{c:>8.3f}")
    print(f"{'infer stage':<40}{'1st wall':>9}{'1st CPU':>8}{'2nd wall':>9}{'2nd CPU':>8}{'workers CPU':>12}"
          f"{'loads':>7}{'peak RSS MiB':>13}")
    for name, (res, cpu, loads, rss) in rows.items():
        (w1, c1, s1), (w2, c2, s2) = res["studies"]
        print(f"{name:<40}{w1:>9.2f}{c1:>8.2f}{w2:>9.2f}{c2:>8.2f}{cpu:>12.2f}{str(loads):>7}{rss:>13.0f}")
        if "warm_up" in res:
            print(f"{'  of which warm_up before the 1st study':<40}{res['warm_up'][0]:>9.2f}{res['warm_up'][1]:>8.2f}")
    scores = {round(r[0]["studies"][0][2], 6) for r in rows.values()}
    print(f"study scores identical across modes: {len(scores) == 1} ({scores})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=192)
    ap.add_argument("--pixels", type=int, default=256, help="in-plane size of the synthetic CT")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per worker (and TensorFlow threads)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed pairs (bare, stage), alternating order (default 7; 2 with --many-studies)")
    ap.add_argument("--many-studies", type=int, default=0, metavar="N",
                    help="N small studies: per-study batching against batches filled across studies")
    ap.add_argument("--concurrent", type=int, default=8, help="with --many-studies: studies at a time")
    ap.add_argument("--wait-ms", type=float, default=5.0, help="with --many-studies: model.batch_wait_ms")
    ap.add_argument("--fan-out", action="store_true", default=None,
                    help="the stage's batches as tasks over the cluster's workers (default: by the study's size, "
                    "i.e. in this process for these sizes)")
    ap.add_argument("--study", metavar="DIR", help="a real study folder (with image.zarr): the stage and the "
                    "model check, before and after issue 14")
    args = ap.parse_args()
    if args.study:
        args.repeats = args.repeats or 2
        return real_study(args)
    if args.many_studies:
        args.repeats = args.repeats or 2
        return many_studies(args)
    args.repeats = args.repeats or 7

    import distributed

    from medpipe.inference.model import load_model, resolve_model
    from medpipe.inference.preprocess import preprocess_slices
    from medpipe.inference.stage import infer_study

    load0 = os.getloadavg()
    cfg = Config.model_validate({"model": {"batch_size": args.batch, "saliency_slices": 0}})
    info = resolve_model(cfg.model)
    spacing = (2.5, 256 / args.pixels, 256 / args.pixels)  # 256 mm field of view, model grid 2 mm
    n = args.slices
    with tempfile.TemporaryDirectory(prefix="medpipe-bench-") as tmp:
        ph = ct_phantom((n, args.pixels, args.pixels), spacing, n_lesions=4, seed=3)
        study = Path(tmp) / "study"
        image = study / "image.zarr"
        omezarr.write_image(image, ph.hu, spacing, levels=1)

        model = load_model(info).keras
        pre = []
        for _ in range(3):
            t = time.perf_counter()
            x = preprocess_slices(ph.hu, spacing[1:], size=info.size, window=info.window, spacing_mm=info.spacing_mm)
            pre.append(time.perf_counter() - t)

        def bare() -> float:  # the same preprocessed slices in memory, one model.predict
            t = time.perf_counter()
            model.predict(x, batch_size=args.batch, verbose=0)
            return time.perf_counter() - t

        def floor() -> float:  # TensorFlow alone: predict_on_batch per batch, no input pipeline
            t = time.perf_counter()
            for i in range(0, n, args.batch):
                model.predict_on_batch(x[i: i + args.batch])
            return time.perf_counter() - t

        with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=args.threads, processes=True,
                                      dashboard_address=":0", worker_dashboard_address=":0") as cluster, \
                distributed.Client(cluster) as client:

            def stage() -> float:
                t = time.perf_counter()
                stage.res = infer_study(study, "CT", cfg, fan_out=args.fan_out)  # type: ignore[attr-defined]
                return time.perf_counter() - t

            bare(), floor(), stage()  # warm-up: predict graph built here, the model loaded on each worker
            times: dict[str, list[float]] = {"bare": [], "stage": [], "floor": []}
            for r in range(args.repeats):
                for name in (("bare", "stage", "floor") if r % 2 == 0 else ("stage", "bare", "floor")):
                    times[name].append({"bare": bare, "stage": stage, "floor": floor}[name]())
            worker_ms = client.submit(breakdown, str(image), cfg, n, args.batch, pure=False).result()
            worker_rss = client.run(peak_rss_mib)
            loads = client.run(lambda: sum(__import__("medpipe.inference.model", fromlist=["x"]).load_count().values()))
        main_ms = breakdown(str(image), cfg, n, args.batch)
        bare_rss = peak_rss_mib()
    load1 = os.getloadavg()

    med = {k: float(np.median(v)) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    pairs = np.array(times["bare"]) / np.array(times["stage"])
    res = stage.res  # type: ignore[attr-defined]
    print(f"study: {n} slices of {args.pixels}x{args.pixels} int16 at {spacing[1]:g} mm, batch {args.batch}, "
          f"model {info.name} {info.version} {info.input_shape}; {os.cpu_count()} CPUs, "
          f"{args.workers} workers x {args.threads} thread(s); {args.repeats} interleaved repeats")
    print(f"load average (1, 5, 15 min): before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(f"{'path':<56}{'median s':>10}{'best s':>9}{'slices/s':>10}")
    rows = [("bare model.predict (preprocessed, in memory)", "bare"),
            ("medpipe infer_study (Zarr+preprocess+predict)", "stage"),
            ("predict_on_batch loop (TF alone, in memory)", "floor")]
    for label, k in rows:
        print(f"{label:<56}{med[k]:>10.3f}{best[k]:>9.3f}{n / med[k]:>10.1f}")
    p = float(np.median(pre))
    print(f"{'preprocessing alone, from memory (not in bare)':<56}{p:>10.3f}{min(pre):>9.3f}{n / p:>10.1f}")
    print(f"ratio stage / bare: median {np.median(pairs):.2f} (pairs {pairs.min():.2f}-{pairs.max():.2f}); "
          f"stage / predict_on_batch loop: {med['floor'] / med['stage']:.2f} (goal >= 0.9)")
    for where, ms in (("one worker (TF on its threads)", worker_ms), ("this process (TF on all cores)", main_ms)):
        total = sum(ms.values())
        print(f"per batch of {args.batch}, {where}: " + ", ".join(
            f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in ms.items()))
    print(f"peak RSS: bare process {bare_rss:.0f} MiB; workers "
          + ", ".join(f"{v:.0f} MiB" for v in worker_rss.values())
          + f"; model loads per worker: {sorted(loads.values())}; study score {res['study_score']:.3f}")


if __name__ == "__main__":
    main()
