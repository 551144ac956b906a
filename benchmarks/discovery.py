"""Discovery and planning over a large archive: with no catalogue, a warm one, and 1% changed.

    .venv/bin/python benchmarks/discovery.py [--files 200000] [--per-series 50] [--workers 2]
                                             [--cache /tmp/medpipe-bench-discovery]
    .venv/bin/python benchmarks/discovery.py --startup [--repeats 3]

``--startup`` measures what a night pays before discovery instead: the embedded Prefect server
started on a fresh database (as every run did before) and on a kept one (as ``medpipe run`` does
now, :func:`flows.server.prefect_api`), alternating, and the Dask cluster as ``flows.cluster``
configures it.

The archive (``--files`` tiny 8x8 CT files, two series per study, ``--per-series`` files a
series) is generated once from one template dataset written by pydicom, its UIDs patched in
place at fixed offsets, and kept under ``--cache`` across runs. Discovery runs as in a
``medpipe run``: ``scan_archive`` on a distributed ``LocalCluster`` of ``--workers`` one-thread
worker processes (started before timing: start-up is measured apart), then ``plan_studies``.

Timed, in one run on the same cluster:

- ``walk+stat``: the floor, ``os.walk`` and one ``stat`` per file (no header read);
- ``no catalogue`` (with ``--check``): every header read (today's discovery);
- ``cold catalogue``: the first night with a catalogue (every header read, the catalogue built);
- ``warm, nothing new``: the goal, under 15 s on 2 cores;
- ``1% changed``: 1% of the files' mtimes moved (their headers read again).

The warm run's plans are checked equal to the cold run's, the 1% run's equal but for the
fingerprints of the touched studies; with ``--check``, every catalogue run's plans are checked
equal to those of a scan without a catalogue (two more full scans: slow on a busy machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian  # noqa: E402

from medpipe.config import IngestConfig  # noqa: E402
from medpipe.ingest import plan_studies, scan_archive  # noqa: E402

GOAL_S = 15.0
FORMAT = "v2"  # bump when the generated archive changes
# Fixed-width placeholders, replaced in the template's bytes for every file: none occurs in another.
STUDY, SERIES, SOP = "2.25.1" + "1" * 9, "2.25.2" + "2" * 12, "2.25.3" + "3" * 17
INSTANCE, POSITION = "77777", "+000000.0"


def template() -> bytes:
    """One 8x8 CT file with placeholder UIDs, instance number and z position."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = SOP
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, SOP
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.Modality, ds.SeriesDescription, ds.SeriesNumber = "CT", "AXIAL 1MM", 1
    ds.InstanceNumber = INSTANCE
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = ["0", "0", POSITION]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.arange(64, dtype=np.int16).tobytes()
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def generate(root: Path, n_files: int, per_series: int) -> None:
    """Write the archive (``root/<study>/<series>/<n>.dcm``) unless a complete one is there."""
    marker = root / f".complete-{FORMAT}-{n_files}-{per_series}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    data = template()
    spots = {name: [i for i in range(len(data)) if data.startswith(value.encode(), i)]
             for name, value in (("study", STUDY), ("series", SERIES), ("sop", SOP), ("inst", INSTANCE),
                                 ("pos", POSITION))}
    assert [len(spots[k]) for k in ("study", "series", "sop", "inst", "pos")] == [1, 1, 2, 1, 1], spots
    buf = bytearray(data)
    t0 = time.perf_counter()
    for n in range(n_files):
        st, rest = divmod(n, 2 * per_series)
        se, i = divmod(rest, per_series)
        values = {"study": f"2.25.1{st:09d}", "series": f"2.25.2{st:09d}{se:03d}",
                  "sop": f"2.25.3{n:017d}", "inst": f"{i + 1:05d}", "pos": f"{i * 1.0:+09.1f}"}
        for name, offsets in spots.items():
            v = values[name].encode()
            for off in offsets:
                buf[off : off + len(v)] = v
        folder = root / f"{st:06d}" / f"{se}"
        if i == 0:
            folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{i:05d}.dcm", "wb") as fh:
            fh.write(buf)
    marker.touch()
    print(f"generated {n_files:,} files in {time.perf_counter() - t0:.1f} s under {root}")


def walk_stat(root: Path) -> int:
    n = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if not name.startswith("."):
                os.stat(os.path.join(folder, name))
                n += 1
    return n


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def discover(root: Path, cfg: IngestConfig, catalogue: Path | None):
    """scan + plan, with its split."""
    scan, t_scan = timed(scan_archive, root, cfg, catalogue=catalogue)
    plans, t_plan = timed(plan_studies, scan, cfg)
    return scan, [p.to_dict() for p in plans], t_scan, t_plan


def startup(repeats: int, workers: int) -> None:
    """Server start on a fresh and on a kept database, alternating; then the local cluster's start."""
    import tempfile

    from flows.server import claim_slot, prefect_server

    def start(home: Path, keep: bool, fds=()) -> float:
        t0 = time.perf_counter()
        with prefect_server(home, keep_database=keep, pass_fds=fds):
            return time.perf_counter() - t0

    fresh, kept = [], []
    with tempfile.TemporaryDirectory(prefix="medpipe-startup-") as tmp, claim_slot(Path(tmp) / "run") as slot:
        assert slot is not None
        first = start(slot[0], True, (slot[1],))  # creates the kept database
        for n in range(repeats):
            fresh.append(start(Path(tmp) / f"fresh-{n}", False))
            kept.append(start(slot[0], True, (slot[1],)))
    print(f"prefect server start, fresh database: {' '.join(f'{t:.1f}' for t in fresh)} s "
          f"(median {np.median(fresh):.1f})")
    print(f"prefect server start, kept database:  {' '.join(f'{t:.1f}' for t in kept)} s "
          f"(median {np.median(kept):.1f}; its first start {first:.1f})")
    from medpipe.config import ClusterConfig

    from flows.cluster import task_runner

    times = []
    for _ in range(repeats):
        runner = task_runner(ClusterConfig(workers=workers))
        t0 = time.perf_counter()
        import distributed

        cluster = distributed.LocalCluster(**runner.cluster_kwargs)
        client = distributed.Client(cluster)
        client.wait_for_workers(workers)
        times.append(time.perf_counter() - t0)
        client.close()
        cluster.close()
    print(f"dask LocalCluster of {workers} workers (flows.cluster's settings): "
          f"{' '.join(f'{t:.1f}' for t in times)} s (median {np.median(times):.1f})")
    print(f"load average {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--per-series", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/medpipe-bench-discovery"))
    ap.add_argument("--startup", action="store_true", help="measure server and cluster start instead")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check", action="store_true",
                    help="also scan without a catalogue (timed) and check every catalogue run's plans against it")
    args = ap.parse_args()
    if args.startup:
        return startup(args.repeats, args.workers)
    root = args.cache / f"archive-{args.files}"
    generate(root, args.files, args.per_series)
    cat = args.cache / "catalogue.sqlite"
    cat.unlink(missing_ok=True)
    cfg = IngestConfig()

    import distributed

    t0 = time.perf_counter()
    cluster = distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address="127.0.0.1:0")
    client = distributed.Client(cluster)
    start = time.perf_counter() - t0
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; cluster of {args.workers} workers "
          f"started in {start:.1f} s (not counted below)")
    rows = []
    head = f"{'discovery':<22}{'scan s':>9}{'plan s':>9}{'total s':>9}{'headers read':>14}   goal"

    def row(label: str, ts: float, tp: float, nread: int) -> None:
        rows.append((label, ts, tp, nread))
        goal = f"< {GOAL_S:.0f} s: {'met' if ts + tp < GOAL_S else 'NOT met'}" if label.startswith("warm") else ""
        print(f"{label:<22}{ts:>9.2f}{tp:>9.2f}{ts + tp:>9.2f}{nread:>14,}   {goal}", flush=True)

    print(head, flush=True)
    try:
        n, t = timed(walk_stat, root)
        row("walk+stat (floor)", t, 0.0, n)
        if args.check:
            scan, ref, ts, tp = discover(root, cfg, None)
            row("no catalogue", ts, tp, scan.n_read)
        scan, cold, ts, tp = discover(root, cfg, cat)
        row("cold catalogue", ts, tp, scan.n_read)
        assert not args.check or cold == ref, "cold catalogue: plans differ from the run without one"
        scan, plans, ts, tp = discover(root, cfg, cat)
        row("warm, nothing new", ts, tp, scan.n_read)
        assert plans == cold, "warm catalogue: plans differ from the cold run"
        files = sorted(p for p in root.rglob("*.dcm"))[:: 100]
        later = time.time_ns() + 10**9
        for p in files:
            os.utime(p, ns=(later, later))
        scan, plans, ts, tp = discover(root, cfg, cat)
        row("1% changed", ts, tp, scan.n_read)
        if args.check:
            _, ref, _, _ = discover(root, cfg, None)
            assert plans == ref, "1% changed: plans differ from the run without a catalogue"
        else:  # the same plans but for the fingerprints of the studies whose files were touched
            touched = {f"2.25.1{int(p.parent.parent.name):09d}" for p in files}
            assert 0 < len({p["fingerprint"] for p in plans} - {p["fingerprint"] for p in cold}) <= len(touched)
            strip = [{k: v for k, v in p.items() if k != "fingerprint"} for p in plans]
            assert strip == [{k: v for k, v in p.items() if k != "fingerprint"} for p in cold]
        scan, plans, ts, tp = discover(root, cfg, cat)
        row("warm again", ts, tp, scan.n_read)
    finally:
        client.close()
        cluster.close()
    print(f"{len(plans):,} studies, {scan.n_files:,} files; catalogue {cat.stat().st_size / 2**20:.0f} MiB")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
