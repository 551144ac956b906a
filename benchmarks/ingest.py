"""Ingest throughput beside its floor, measured in the same run.

Makes an archive of CT series (512x512, a few hundred slices each) in a temporary folder, then
measures, each phase in a fresh process so that peak memory is its own:

* floor: pydicom reads every file and decodes its pixels into NumPy, writing nothing
  (the faster of 1 and ``--threads`` threads);
* medpipe: ``scan_archive`` + ``plan_studies`` + ``ingest_study`` for every study (sorted,
  rescaled volume in HU, int16 when integral, compressed Zarr, 3-level pyramid), on
  ``--threads`` Dask threads; scan+plan and ``ingest_study`` are also timed apart (the
  best of two runs, as the floor is the best of its two); a third run, after the first two
  runs' output is deleted, writes into the memory that freed (see ``disk``);
* bare: a lower bound for any writer of level 0 (pixels at a known offset, compressed with
  medpipe's codec, one file per 8 slices; no parsing, sorting, rescale or pyramid);
* disk: the bytes medpipe wrote, written again as 1 MiB files (write + rename, as Zarr's
  store does), to show the bound that writing sets: once into new page-cache memory (as
  medpipe's runs write), once into memory just freed. On the 2-core benchmark VM the first
  is 6-8x slower: the VM hands freed memory back to its host, and each new page costs a
  fault there (figures in docs/benchmarks.md).

Usage::

    .venv/bin/python benchmarks/ingest.py --series 3 --slices 200 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def make_archive(root: Path, n_series: int, n_slices: int, size: int) -> None:
    import numpy as np

    from medpipe.phantom import ct_phantom
    from medpipe.sample import write_series

    slab = ct_phantom(shape=(16, size, size), spacing=(1.0, 0.7, 0.7), lesions=[], seed=1).hu
    for s in range(n_series):
        vol = np.resize(slab, (n_slices, size, size))  # realistic texture; cheap to make
        write_series(vol, (1.0, 0.7, 0.7), root / f"patient{s}" / "ct", modality="CT", intercept=-1024.0,
                     patient_id=f"BENCH-{s}", seed=s, shuffle=True, file_names=[f"{k:06d}" for k in range(n_slices)])


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def phase_floor(root: Path, threads: int) -> dict:
    import pydicom

    files = _files(root)

    def read(p: Path) -> int:
        return pydicom.dcmread(p).pixel_array.nbytes

    best = None
    for n in sorted({1, threads}):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            nbytes = sum(pool.map(read, files))
        dt = time.perf_counter() - t0
        if best is None or dt < best["seconds"]:
            best = {"seconds": dt, "threads": n, "bytes": nbytes, "slices": len(files)}
    return best  # type: ignore[return-value]


def phase_medpipe(root: Path, out: Path, threads: int) -> dict:
    """Best of two runs in one process, like the floor (which runs with 1 and ``threads``
    threads), after a scan of one file has paid the one-time imports. A third run, after
    deleting the first two runs' output, writes into the memory that freed ("recycled")."""
    import dask

    from medpipe.config import IngestConfig
    from medpipe.ingest import ingest_study, plan_studies, scan_archive

    cfg = IngestConfig()
    files = _files(root)
    warm = out / "warm-up"  # one file: the first compute imports distributed (~0.2 s, once a process)
    warm.mkdir(parents=True)
    shutil.copy(files[0], warm / files[0].name)
    with dask.config.set(scheduler="threads", num_workers=threads):
        scan_archive(warm, cfg)

    def run(target: Path) -> dict:
        os.sync()  # no writeback of the last run's files during this one
        t0 = time.perf_counter()
        with dask.config.set(scheduler="threads", num_workers=threads):
            plans = plan_studies(scan_archive(root, cfg), cfg)
            t1 = time.perf_counter()
            for p in plans:
                ingest_study(p, target / p.study_key, cfg)
        t2 = time.perf_counter()
        return {"seconds": t2 - t0, "scan_seconds": t1 - t0, "ingest_seconds": t2 - t1}

    best = min((run(out / f"run{i}") for i in range(2)), key=lambda r: r["seconds"])
    written = sum(p.stat().st_size for p in _files(out / "run0"))
    for i in range(2):
        shutil.rmtree(out / f"run{i}")
    recycled = run(out / "run2")["seconds"]
    nbytes = sum(p.stat().st_size for p in files)
    return {**best, "recycled_seconds": recycled, "threads": threads, "bytes": nbytes, "slices": len(files),
            "written": written}


def phase_bare(root: Path, out: Path, threads: int) -> dict:
    """A lower bound for any writer of medpipe's level 0: each 8 files' pixels (the last
    ``size*size*2`` bytes of this archive's files) into a slab, compressed with medpipe's int16
    codec and written as one chunk file; no DICOM parsing, sorting, rescale or pyramid. Best of two."""
    import numpy as np

    from medpipe.omezarr import _compressors, numcodecs_blosc

    codec = numcodecs_blosc(_compressors(np.int16)[0], np.int16)
    files = _files(root)
    side = int(((files[0].stat().st_size - 1024) // 2) ** 0.5)  # the archive's square slices
    groups = [files[i:i + 8] for i in range(0, len(files), 8)]

    def chunk(target: Path, i: int, group: list[Path]) -> int:
        slab = np.empty((len(group), side, side), np.int16)
        for k, f in enumerate(group):
            with open(f, "rb") as fp:
                fp.seek(-side * side * 2, os.SEEK_END)
                fp.readinto(memoryview(slab[k]).cast("B"))
        data = codec.encode(slab)
        tmp = target / f"{i}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target / str(i))
        return len(data)

    best = None
    for run in range(2):  # into new folders, as medpipe's two runs
        target = out / f"run{run}"
        target.mkdir(parents=True)
        os.sync()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            written = sum(pool.map(lambda a: chunk(target, *a), enumerate(groups)))
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return {"seconds": best, "written": written}


def phase_disk(out: Path, nbytes: int) -> dict:
    """Write ``nbytes`` as 1 MiB files (write + rename) twice: into new page-cache memory, then,
    after deleting the first copy, into the memory it freed. On a VM that hands freed guest
    memory back to its host, only the second write runs at memory speed."""
    block = os.urandom(2**20)

    def write(target: Path) -> float:
        target.mkdir(parents=True)
        os.sync()
        t0 = time.perf_counter()
        for i in range(max(1, nbytes // 2**20)):
            tmp = target / f"b{i}.tmp"
            tmp.write_bytes(block)
            os.replace(tmp, target / f"b{i}")
        return time.perf_counter() - t0

    fresh = write(out / "fresh")
    shutil.rmtree(out / "fresh")
    return {"seconds": fresh, "recycled_seconds": write(out / "recycled"), "written": nbytes}


def _child(phase: str, root: Path, out: Path, threads: int, *extra: str) -> dict:
    # Each phase in a fresh, small process: Linux carries ru_maxrss across fork+exec, so the
    # parent stays small (it never imports NumPy) and the archive is made in a child too.
    cmd = [sys.executable, __file__, "--phase", phase, "--root", str(root), "--out", str(out),
           "--threads", str(threads), *extra]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=3)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phase", choices=["make", "floor", "medpipe", "bare", "disk"], help=argparse.SUPPRESS)
    ap.add_argument("--nbytes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "make":
        make_archive(args.root, args.series, args.slices, args.size)
        print("{}")
        return
    if args.phase:
        if args.phase == "disk":
            res = phase_disk(args.out, args.nbytes)
        elif args.phase == "bare":
            res = phase_bare(args.root, args.out, args.threads)
        else:
            res = phase_floor(args.root, args.threads) if args.phase == "floor" else phase_medpipe(args.root, args.out, args.threads)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    tmp = Path(tempfile.mkdtemp(prefix="medpipe-bench-ingest-"))
    try:
        _child("make", tmp / "archive", tmp / "out", args.threads, "--series", str(args.series),
               "--slices", str(args.slices), "--size", str(args.size))
        _child("floor", tmp / "archive", tmp / "out", args.threads)  # warm the page cache once
        floor = _child("floor", tmp / "archive", tmp / "out", args.threads)
        ours = _child("medpipe", tmp / "archive", tmp / "out", args.threads)
        bare = _child("bare", tmp / "archive", tmp / "bare", args.threads)
        disk = _child("disk", tmp / "archive", tmp / "disk", args.threads, "--nbytes", str(ours["written"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"archive: {args.series} CT series x {args.slices} slices of {args.size}x{args.size}, "
          f"{ours['bytes'] / 2**20:.0f} MiB in {ours['slices']} files; {args.threads} threads")
    print(f"{'':28s}{'MB/s':>10s}{'slices/s':>10s}{'seconds':>10s}{'peak RSS MiB':>14s}")
    for name, r in ((f"floor (pydicom->NumPy, {floor['threads']}t)", floor), ("medpipe ingest", ours)):
        print(f"{name:28s}{r['bytes'] / 1e6 / r['seconds']:10.1f}{r['slices'] / r['seconds']:10.1f}"
              f"{r['seconds']:10.2f}{r['peak_rss_mib']:14.0f}")
    for name, sec in (("  of which scan + plan", ours["scan_seconds"]), ("  of which ingest_study", ours["ingest_seconds"])):
        print(f"{name:28s}{ours['bytes'] / 1e6 / sec:10.1f}{ours['slices'] / sec:10.1f}{sec:10.2f}")
    print(f"bare chunk writer (no parsing, rescale or pyramid): {bare['seconds']:.2f} s, "
          f"{bare['written'] / 2**20:.0f} MiB; {floor['seconds'] / bare['seconds']:.2f} of the floor")
    print(f"medpipe wrote {ours['written'] / 2**20:.0f} MiB; writing that as 1 MiB files takes "
          f"{disk['seconds']:.2f} s ({disk['written'] / 2**20 / disk['seconds']:.0f} MiB/s) into new memory, "
          f"{disk['recycled_seconds']:.2f} s into memory just freed")
    print(f"medpipe / floor: {floor['seconds'] / ours['seconds']:.2f} "
          f"(scan + plan alone: {floor['seconds'] / ours['scan_seconds']:.2f}, "
          f"ingest_study alone: {floor['seconds'] / ours['ingest_seconds']:.2f})")
    print(f"medpipe / floor writing into memory just freed: {floor['seconds'] / ours['recycled_seconds']:.2f} "
          f"({ours['recycled_seconds']:.2f} s)")


if __name__ == "__main__":
    main()
