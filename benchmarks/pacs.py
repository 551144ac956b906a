"""PACS retrieval throughput beside plain clients, measured in the same run against a local Orthanc.

Starts Debian's Orthanc (tests/pacs/orthanc.py: loopback, temporary storage, DICOMweb plugin),
loads one CT study (a series of ``--instances`` 512x512 slices, and a quarter-size series to show
that memory does not grow with the series, over both protocols), then retrieves the large series to files with:

* medpipe WADO-RS: ``fetch_study`` over DICOMweb (multipart streamed part by part to files, then
  the arrived SOPInstanceUIDs checked against the listing: the full completeness proof);
* dicomweb-client: ``DICOMwebClient.iter_series`` writing each dataset with pydicom (the plain
  DICOMweb client alone);
* medpipe C-GET: ``fetch_study`` over DIMSE (C-FIND listing and C-GET on medpipe's own socket
  loop, :mod:`medpipe.pacs.dimse_get`: each dataset streamed to its file PDU by PDU);
* getscu: dcmtk's ``getscu -od DIR`` (the plain DIMSE client).

Each method runs in its own process (peak RSS is its own), ``--repeat`` times; the best run
counts. The whole benchmark (Orthanc included) is pinned to ``--cores`` CPUs. Orthanc and getscu
(both DCMTK) run with ``TCP_NODELAY=1``: Debian's DCMTK otherwise leaves Nagle's algorithm on.

``--night N`` measures instead what a night with no new study costs (time and PACS operations of
``plan_pacs`` with the default 24 h overlap) against an Orthanc of N small studies over 30 days.

Usage::

    .venv/bin/python benchmarks/pacs.py --instances 300 --cores 2 --repeat 3
    .venv/bin/python benchmarks/pacs.py --night 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- one method, in a child
def _run_one(method: str, url: str, study: str, series: str, dest: Path, expected: int) -> int:
    """Retrieve ``series`` into ``dest`` by ``method``; return the number of files written."""
    if method in ("medpipe-wado", "medpipe-cget"):
        from medpipe.config import PacsConfig
        from medpipe.pacs import open_client
        from medpipe.pacs.retrieve import fetch_study

        source = {"study_key": "bench", "study_uid": study,
                  "series": [{"series_uid": series, "expected": expected, "recheck": False}]}
        with open_client(url, PacsConfig(timeout_s=120, retries=0)) as c:
            folder = fetch_study(source, dest, c)
        return sum(1 for _ in folder.rglob("*.dcm"))
    if method == "dicomweb-client":
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(url=url)
        dest.mkdir(parents=True, exist_ok=True)
        n = 0
        for ds in client.iter_series(study, series):
            ds.save_as(dest / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            n += 1
        return n
    raise ValueError(method)


def _child_main(argv: list[str]) -> None:
    """Import first, then time the retrieval alone (interpreter start and imports are not retrieval)."""
    method, url, study, series, dest, expected = argv
    if method.startswith("medpipe"):
        import medpipe.pacs.dicomweb  # noqa: F401
        import medpipe.pacs.dimse  # noqa: F401
        import medpipe.pacs.retrieve  # noqa: F401
    else:
        import dicomweb_client.api  # noqa: F401
    t0 = time.perf_counter()
    n = _run_one(method, url, study, series, Path(dest), int(expected))
    print(json.dumps({"files": n, "seconds": time.perf_counter() - t0, "rss_mib": _hwm_mib(os.getpid())}))


def _hwm_mib(pid: int) -> float:
    """Peak resident memory of a live process (VmHWM; fresh at exec, unlike a child's ru_maxrss,
    which starts from the forking parent's)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; return (seconds, its peak RSS in MiB as last sampled, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _hwm_mib(proc.pid))
        time.sleep(0.005)
    seconds = time.perf_counter() - t0
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{err[-2000:]}")
    return seconds, peak, out


# --------------------------------------------------------------------------- the benchmark
def make_study(dest: Path, n: int, size: int) -> tuple[str, list[str], list[list[Path]]]:
    import numpy as np

    from medpipe.phantom import ct_phantom
    from medpipe.sample.series import stable_uid, write_series

    study_uid = stable_uid("medpipe-bench-pacs", n, size)
    slab = ct_phantom(shape=(16, size, size), spacing=(1.0, 0.7, 0.7), lesions=[], seed=1).hu
    series_uids, files = [], []
    for k, count in enumerate((n, max(1, n // 4))):
        uid = stable_uid(study_uid, "series", k)
        vol = np.resize(slab, (count, size, size))
        files.append(write_series(vol, (1.0, 0.7, 0.7), dest / f"s{k}", modality="CT", intercept=-1024.0,
                                  study_uid=study_uid, series_uid=uid, series_number=k + 1,
                                  study_date="20261128"))
        series_uids.append(uid)
    return study_uid, series_uids, files


class _Counting:
    """Counts the PACS operations a client is asked for (each is one request or association)."""

    def __init__(self, client):
        self._client, self.calls = client, {}
        self.address = client.address

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def counted(*a, **k):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*a, **k)

        return counted


def quiet_night(n_studies: int, days: int, work: Path) -> list[dict[str, object]]:
    """What a night with no new study costs: plan against an Orthanc of ``n_studies`` small studies
    spread over ``days`` days, after a first run that took them all."""
    from datetime import datetime, timedelta

    import numpy as np

    from medpipe.config import Config
    from medpipe.pacs import open_client
    from medpipe.pacs.plan import commit_window, plan_pacs
    from medpipe.sample.series import stable_uid, write_series
    from orthanc import OrthancServer

    srv = OrthancServer(work / "orthanc-night", stable_age_s=1)
    rows = []
    try:
        srv.start()
        now = datetime(2026, 11, 29, 2, 0)
        files = []
        for k in range(n_studies):
            day = (now - timedelta(days=1 + k % days)).strftime("%Y%m%d")
            files += write_series(np.zeros((2, 32, 32), np.float32), (1, 1, 1), work / "night" / f"st{k}",
                                  study_uid=stable_uid("bench-night", k), series_uid=stable_uid("bench-night", k, 1),
                                  study_date=day, StudyTime="101500")
        srv.upload(files)
        srv.wait_stable(120)
        for url in (srv.dicomweb_url, srv.dimse_url):
            out = work / f"night-out-{url[:5]}"
            cfg = Config.model_validate({"source": {"since": "2000-01-01", "recheck_wait_s": 0}})
            with open_client(url) as c:
                commit_window(out, plan_pacs(c, cfg, out, now=now - timedelta(hours=1)))
                counting = _Counting(c)
                t0 = time.perf_counter()
                plan = plan_pacs(counting, Config.model_validate({"source": {"recheck_wait_s": 0}}), out, now=now)
                rows.append({"address": url.split(":")[0], "seconds": time.perf_counter() - t0,
                             "studies_in_window": len(plan.plans), "operations": dict(counting.calls)})
    finally:
        srv.stop(kill=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cores", type=int, default=2, help="CPUs the benchmark (Orthanc included) may use")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--night", type=int, default=0, metavar="N",
                    help="instead: the cost of a night with no new study against N studies over 30 days")
    args = ap.parse_args()
    if args.night:
        sys.path.insert(0, str(ROOT / "tests" / "pacs"))
        work = Path(tempfile.mkdtemp(prefix="medpipe-bench-night-"))
        try:
            for row in quiet_night(args.night, 30, work):
                print(json.dumps(row))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return

    if args.cores and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[: args.cores]
        os.sched_setaffinity(0, cpus)   # inherited by Orthanc and every client process
    sys.path.insert(0, str(ROOT / "tests" / "pacs"))
    from orthanc import OrthancServer, missing_reason

    if missing_reason():
        sys.exit(f"cannot run: {missing_reason()}")
    getscu = _dcmtk_getscu()
    work = Path(tempfile.mkdtemp(prefix="medpipe-bench-pacs-"))
    srv = OrthancServer(work / "orthanc", stable_age_s=1)
    try:
        study, (big, small), files = make_study(work / "input", args.instances, args.size)
        mb = sum(p.stat().st_size for p in files[0]) / 1e6
        srv.start()
        srv.upload(files[0] + files[1])
        env = {**os.environ, "TCP_NODELAY": "1"}
        methods: list[tuple[str, str, str, int]] = [
            ("medpipe-wado", srv.dicomweb_url, big, len(files[0])),
            ("dicomweb-client", f"{srv.url}/dicom-web", big, len(files[0])),
            ("medpipe-cget", srv.dimse_url, big, len(files[0])),
            ("medpipe-wado (1/4 series)", srv.dicomweb_url, small, len(files[1])),
            ("medpipe-cget (1/4 series)", srv.dimse_url, small, len(files[1])),
        ]
        rows: dict[str, dict[str, float]] = {}
        for rep in range(args.repeat):
            for name, url, series, n in methods:
                dest = work / "out" / f"{name.split()[0]}-{rep}"
                cmd = [sys.executable, __file__, "--child", name.split()[0], url, study, series, str(dest), str(n)]
                _, _, out = _measure(cmd, env)
                result = json.loads(out.strip().splitlines()[-1])
                got, sec, rss = result["files"], result["seconds"], result["rss_mib"]
                assert got == n, f"{name}: {got} files, expected {n}"
                _keep_best(rows, name, sec, rss, n, mb if series == big else mb * n / len(files[0]))
                shutil.rmtree(dest, ignore_errors=True)
            if getscu:
                dest = work / "out" / f"getscu-{rep}"
                dest.mkdir(parents=True)
                cmd = [getscu, "-aet", "BENCH", "-aec", srv.aet, "-S", "-k", "QueryRetrieveLevel=SERIES",
                       "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={big}", "-od", str(dest),
                       "127.0.0.1", str(srv.dicom_port)]
                sec, rss, _ = _measure(cmd, env)
                got = sum(1 for _ in dest.iterdir())
                assert got == len(files[0]), f"getscu: {got} files"
                _keep_best(rows, "getscu", sec, rss, got, mb)
                shutil.rmtree(dest, ignore_errors=True)
    finally:
        srv.stop(kill=True)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nPACS retrieval: one series of {args.instances} CT instances {args.size}x{args.size} "
          f"({mb:.0f} MB) from a local Orthanc on {args.cores} core(s); best of {args.repeat}; each method "
          "in its own process (seconds: the retrieval alone; getscu: the whole process)\n")
    print(f"{'method':<28}{'seconds':>9}{'inst/s':>9}{'MB/s':>9}{'peak RSS MiB':>14}")
    for name, r in rows.items():
        print(f"{name:<28}{r['seconds']:>9.2f}{r['inst_s']:>9.0f}{r['mb_s']:>9.1f}{r['rss_mib']:>14.0f}")
    ratios = {}
    if "dicomweb-client" in rows:
        ratios["medpipe-wado / dicomweb-client"] = rows["medpipe-wado"]["inst_s"] / rows["dicomweb-client"]["inst_s"]
    if "getscu" in rows:
        ratios["medpipe-cget / getscu"] = rows["medpipe-cget"]["inst_s"] / rows["getscu"]["inst_s"]
    plain = [rows[k]["inst_s"] for k in ("dicomweb-client", "getscu") if k in rows]
    if plain:
        best_medpipe = max(rows["medpipe-wado"]["inst_s"], rows["medpipe-cget"]["inst_s"])
        ratios["best medpipe / faster plain client (goal >= 0.8)"] = best_medpipe / max(plain)
    print()
    for k, v in ratios.items():
        print(f"{k:<52}{v:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios, "args": vars(args) | {"json": None}},
                                        indent=2, default=str))


def _dcmtk_getscu() -> str | None:
    """DCMTK's getscu on PATH, passing over pynetdicom's script of the same name (in an activated venv)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which("getscu", path=folder)
        if path:
            with open(path, "rb") as fh:
                if fh.read(2) != b"#!":
                    return path
    return None


def _keep_best(rows: dict[str, dict[str, float]], name: str, sec: float, rss: float, n: int, mb: float) -> None:
    prev = rows.get(name)
    if prev is None or sec < prev["seconds"]:
        rows[name] = {"seconds": sec, "inst_s": n / sec, "mb_s": mb / sec,
                      "rss_mib": max(rss, prev["rss_mib"]) if prev else rss}
    else:
        prev["rss_mib"] = max(prev["rss_mib"], rss)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child_main(sys.argv[2:])
    else:
        main()
