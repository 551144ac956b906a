"""End to end: ``medpipe run`` as a whole process beside dcm2niix on the same files, in one run.

Writes CT phantom series of 512x512 slices (``medpipe.phantom.ct_phantom`` lungs, body, spine
and lesions, written with ``medpipe.sample.write_series``) into a temporary folder, then:

* ``one``: one 300-slice study (``--slices``): wall of ``medpipe run ARCHIVE --out OUT`` and of
  ``dcm2niix`` converting the same files (the peer floor: reading and writing the volume once),
  their ratio, and the per-stage split from ``OUT/run.json`` (``timings`` and ``seconds`` of
  the study; "outside stages" is the run's wall minus the study's ``seconds``);
* ``memory``: peak RSS of every process of medpipe's process tree (psutil samples the whole
  tree every 0.1 s: the CLI, the Prefect server, the Dask scheduler and workers), the largest
  per process and the largest total, for ``--slices`` and for ``--long`` slices;
* ``many``: ``--studies`` such studies in one run: studies per hour, and the share of the run
  not spent in stage work: ``1 - CPU seconds of the Dask workers / (wall x cores)``, the
  core-seconds the run did not fill with stage work (Prefect, the flow, scheduling, start-up,
  idle cores; stage wall times overlap across studies, so they cannot be summed for this);
* ``noop``: ``medpipe run`` again on the archive of ``one`` with nothing new, as % of the first.

Goals (issue 14) are printed beside the figures. Timing on a shared machine is noisy: the
load average is printed with the figures.

Usage::

    .venv/bin/python benchmarks/e2e.py                      # everything (20 studies: ~15+ min)
    .venv/bin/python benchmarks/e2e.py --only one noop      # one study and its no-op rerun
    .venv/bin/python benchmarks/e2e.py --only memory --slices 300 --long 1000
    .venv/bin/python benchmarks/e2e.py --only many --studies 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACING = (1.0, 0.7, 0.7)  # mm (z, y, x): a 358 mm field of view at 512 x 512
GOALS = {"wall_s": 30.0, "vs_dcm2niix": 4.0, "rss_mib": 1536.0, "studies_per_hour": 150.0, "outside": 0.10,
         "noop": 0.02}


def medpipe_command() -> list[str]:
    exe = ROOT / ".venv" / "bin" / "medpipe"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]


def write_studies(root: Path, n_studies: int, n_slices: int, size: int = 512) -> list[Path]:
    """``n_studies`` CT series of ``n_slices`` slices under ``root`` (one folder each).

    One phantom slab with lungs and three lesions is made once and repeated along z (a
    realistic texture at a fraction of the cost of a whole phantom); each study gets its own
    patient, study and series UIDs.
    """
    import numpy as np

    from medpipe.phantom import ct_phantom
    from medpipe.sample import write_series

    slab = ct_phantom(shape=(min(60, n_slices), size, size), spacing=SPACING, n_lesions=3, seed=1).hu
    vol = np.resize(slab, (n_slices, size, size))
    folders = []
    for s in range(n_studies):
        folder = root / f"patient{s:03d}" / "ct"
        write_series(vol, SPACING, folder, modality="CT", intercept=-1024.0, patient_id=f"E2E-{n_slices}-{s}",
                     seed=1000 * n_slices + s, file_names=[f"{k:06d}" for k in range(n_slices)], BodyPartExamined="CHEST")
        folders.append(folder)
    return folders


@dataclass
class Run:
    """One process tree's wall time and memory."""

    wall_s: float
    rc: int
    peak_process_mib: float = 0.0
    peak_process: str = ""
    peak_total_mib: float = 0.0
    processes: int = 0
    tail: str = ""
    per_process: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds by kind of process


def _describe(proc) -> str:  # noqa: ANN001 (psutil.Process)
    try:
        cmd = proc.cmdline()
    except Exception:
        return str(proc.pid)
    text = " ".join(cmd)
    for key, name in (("prefect server", "prefect server"), ("spawn_main", "dask worker"),
                      ("dask scheduler", "dask scheduler"), ("flows.cli", "medpipe"), ("bin/medpipe", "medpipe"),
                      ("dcm2niix", "dcm2niix")):
        if key in text:
            return f"{name} [{proc.pid}]"
    return f"{os.path.basename(cmd[0]) if cmd else '?'} [{proc.pid}]"


def run_tree(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd``; sample the RSS of it and all its descendants every 0.1 s."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    per: dict[int, float] = {}
    names: dict[int, str] = {}
    cpu: dict[int, float] = {}  # last CPU seconds seen of each process (they end with the run)
    peak_total = 0.0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        if time.perf_counter() - t0 > timeout_s:
            proc.kill()
            break
        total = 0.0
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for p in tree:
            try:
                rss = p.memory_info().rss / 2**20
            except psutil.Error:
                continue
            try:
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
            except psutil.Error:
                pass
            total += rss
            if rss > per.get(p.pid, 0.0):
                per[p.pid] = rss
                names.setdefault(p.pid, _describe(p))
        peak_total = max(peak_total, total)
        time.sleep(0.1)
    proc.wait()
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    run = Run(wall, proc.returncode, peak_total_mib=peak_total, processes=len(per), tail="".join(out)[-2000:])
    if per:
        pid = max(per, key=per.get)  # type: ignore[arg-type]
        run.peak_process_mib, run.peak_process = per[pid], names.get(pid, str(pid))
        run.per_process = {names.get(p, str(p)): round(v) for p, v in sorted(per.items(), key=lambda kv: -kv[1])}
    for pid, sec in cpu.items():
        kind = names.get(pid, "other").split(" [")[0]
        run.cpu_s[kind] = run.cpu_s.get(kind, 0.0) + sec
    return run


def run_medpipe(archive: Path, out: Path, timeout_s: float = 3600.0) -> tuple[Run, dict]:
    """``medpipe run ARCHIVE --out OUT`` as a whole process; its run.json (``{}`` when missing)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = run_tree([*medpipe_command(), "run", str(archive), "--out", str(out)], timeout_s, env)
    record = out / "run.json"
    data = json.loads(record.read_text()) if record.is_file() else {}
    if run.rc != 0:
        print(f"medpipe run exited {run.rc}:\n{run.tail}", file=sys.stderr)
    return run, data


def run_dcm2niix(series: Path, out: Path, compress: str = "n") -> Run:
    """dcm2niix converting one series to NIfTI: uncompressed (``-z n``, its default here), or
    gzipped with pigz (``-z y``, the ``.nii.gz`` most sites keep)."""
    out.mkdir(parents=True, exist_ok=True)
    run = run_tree(["dcm2niix", "-z", compress, "-b", "n", "-f", "vol", "-o", str(out), str(series)], 600.0)
    written = sum(p.stat().st_size for p in out.glob("*.nii*"))
    if run.rc != 0 or written == 0:
        raise RuntimeError(f"dcm2niix exited {run.rc} and wrote {written} bytes:\n{run.tail}")
    return run


def stage_split(data: dict) -> tuple[dict[str, float], float]:
    """The stage seconds summed over the run's studies, and the studies' ``seconds`` summed."""
    split: dict[str, float] = {}
    total = 0.0
    for study in data.get("studies", []):
        for stage, sec in (study.get("timings") or {}).items():
            if isinstance(sec, (int, float)):
                split[stage] = split.get(stage, 0.0) + float(sec)
        total += float(study.get("seconds") or 0.0)
    return split, total


def _goal(ok: bool) -> str:
    return "met" if ok else "NOT met"


def part_one(tmp: Path, n_slices: int) -> dict:
    archive = tmp / f"one-{n_slices}"
    folders = write_studies(archive, 1, n_slices)
    run_dcm2niix(folders[0], tmp / "nii-warm")  # page cache warm for both, as in a nightly run
    peer = run_dcm2niix(folders[0], tmp / "nii")
    peer_gz = run_dcm2niix(folders[0], tmp / "nii-gz", compress="y")
    ours, data = run_medpipe(archive, tmp / f"out-one-{n_slices}")
    split, study_s = stage_split(data)
    ratio = ours.wall_s / peer.wall_s
    print(f"\n## one study: {n_slices} slices of 512x512 CT")
    print(f"medpipe run       {ours.wall_s:8.1f} s wall (exit {ours.rc})   goal < {GOALS['wall_s']:.0f} s: "
          f"{_goal(ours.wall_s < GOALS['wall_s'])}")
    print(f"dcm2niix -z n     {peer.wall_s:8.1f} s wall (exit {peer.rc}; page cache warmed by a first run)")
    print(f"dcm2niix -z y     {peer_gz.wall_s:8.1f} s wall (exit {peer_gz.rc}; .nii.gz through pigz)")
    print(f"ratio             {ratio:8.2f} x          goal <= {GOALS['vs_dcm2niix']:.0f}x: "
          f"{_goal(ratio <= GOALS['vs_dcm2niix'])}  (vs -z y: {ours.wall_s / peer_gz.wall_s:.2f} x)")
    print("per-stage split (run.json timings; stages of a study may overlap: infer beside filter/segment):")
    for stage, sec in split.items():
        print(f"  {stage:34s}{sec:8.2f} s")
    print(f"  {'study seconds':34s}{study_s:8.2f} s  (run.json studies[].seconds)")
    print(f"  {'outside stages':34s}{ours.wall_s - study_s:8.2f} s  (wall - study seconds: start-up, Prefect, "
          "Dask, discovery, run record)")
    return {"archive": archive, "out": tmp / f"out-one-{n_slices}", "wall": ours.wall_s, "run": ours,
            "dcm2niix": peer.wall_s, "split": split}


def part_memory(tmp: Path, slices: list[int], first: Run | None) -> None:
    print("\n## peak memory (RSS) of medpipe's process tree")
    print(f"{'slices':>7}{'largest process MiB':>21}  {'which':28s}{'tree total MiB':>15}{'processes':>10}")
    peaks = []
    for n in slices:
        if first is not None and n == slices[0]:
            run = first
        else:
            archive = tmp / f"mem-{n}"
            write_studies(archive, 1, n)
            run, _ = run_medpipe(archive, tmp / f"out-mem-{n}")
            shutil.rmtree(archive, ignore_errors=True)
        peaks.append(run.peak_process_mib)
        print(f"{n:>7}{run.peak_process_mib:>21.0f}  {run.peak_process:28s}{run.peak_total_mib:>15.0f}"
              f"{run.processes:>10}")
        print("        per process: " + ", ".join(f"{k} {v}" for k, v in list(run.per_process.items())[:6]))
    flat = max(peaks) / min(peaks) if min(peaks) > 0 else float("inf")
    print(f"goal < {GOALS['rss_mib']:.0f} MiB per process: {_goal(max(peaks) < GOALS['rss_mib'])}; "
          f"flat with series length: largest/smallest {flat:.2f} ({_goal(flat < 1.25)}, taken as within 25%)")


def part_many(tmp: Path, n_studies: int, n_slices: int, workers: int) -> None:
    archive = tmp / "many"
    write_studies(archive, n_studies, n_slices)
    ours, data = run_medpipe(archive, tmp / "out-many", timeout_s=4 * 3600)
    split, _ = stage_split(data)
    ok = sum(1 for s in data.get("studies", []) if s.get("status") == "ok")
    per_hour = ok / ours.wall_s * 3600
    # Stages of different studies overlap and wait for the same workers, so their wall times
    # add up to more than the run: the share is measured on CPU instead. Stage work is the
    # Dask workers' CPU; the rest of the 2 x wall core-seconds is orchestration (the CLI's
    # process with the scheduler and the flow, the Prefect server) or cores left idle.
    cores = os.cpu_count() or workers
    work = ours.cpu_s.get("dask worker", 0.0)
    orchestration = sum(v for k, v in ours.cpu_s.items() if k != "dask worker")
    outside = 1 - work / (ours.wall_s * cores)
    print(f"\n## {n_studies} studies of {n_slices} slices in one run ({ok} ok), {workers} workers")
    print(f"wall {ours.wall_s:.1f} s, {per_hour:.0f} studies/h   goal >= {GOALS['studies_per_hour']:.0f}: "
          f"{_goal(per_hour >= GOALS['studies_per_hour'])}")
    print(f"CPU: Dask workers (stage work) {work:.1f} s, orchestration {orchestration:.1f} s "
          f"({', '.join(f'{k} {v:.1f}' for k, v in ours.cpu_s.items() if k != 'dask worker')}), "
          f"of {ours.wall_s * cores:.1f} core-seconds")
    print(f"share of the run's core-seconds not in stage work (orchestration or idle): {outside:.1%}   "
          f"goal < {GOALS['outside']:.0%}: {_goal(outside < GOALS['outside'])} (other jobs on the machine count as idle)")
    print("stage wall seconds summed (run.json; overlapping): " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()))
    shutil.rmtree(archive, ignore_errors=True)


def part_noop(tmp: Path, first: dict) -> None:
    again, data = run_medpipe(first["archive"], first["out"])
    share = again.wall_s / first["wall"]
    skipped = sum(1 for s in data.get("studies", []) if s.get("status") == "skipped")
    print("\n## second run, nothing new")
    print(f"wall {again.wall_s:.1f} s = {share:.1%} of the first run ({first['wall']:.1f} s), {skipped} skipped   "
          f"goal < {GOALS['noop']:.0%}: {_goal(share < GOALS['noop'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=["one", "memory", "many", "noop"], help="parts to run (default all)")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--long", type=int, default=1000, help="slices of the long series of the memory part")
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2, help="the configuration's cluster.workers (for shares)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    parts = set(args.only or ["one", "memory", "many", "noop"])
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="medpipe-bench-e2e-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"medpipe end to end: {' '.join(medpipe_command())} run ARCHIVE --out OUT; {os.cpu_count()} cores, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    try:
        first = part_one(tmp, args.slices) if parts & {"one", "noop", "memory"} else None
        if "noop" in parts and first is not None:
            part_noop(tmp, first)
        if "memory" in parts:
            part_memory(tmp, [args.slices, args.long], first["run"] if first else None)
        if "many" in parts:
            part_many(tmp, args.studies, args.slices, args.workers)
    finally:
        print(f"\nload average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
              "(other jobs on the machine make wall times noisy)")
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
