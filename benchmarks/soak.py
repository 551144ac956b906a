"""Soak: many nights over a growing archive, with Dask workers killed at random while they work.

Each night adds studies to the archive and runs ``medpipe run`` as a whole process (as cron or
the Prefect schedule would); while it runs, worker processes are SIGKILLed at random moments.
After every night the outputs are checked against everything published before:

- **studies lost**: a study once published ``ok`` that is missing, damaged or stripped of files
  afterwards (goal 0);
- **false records**: a run.json whose counts or statuses disagree with the study folders (goal 0);
- **manual repairs**: after the last night, one more night without faults must leave every study
  ``ok`` with no lock and no staging left; each study it cannot finish would need a person
  (goal 0).

Usage::

    .venv/bin/python benchmarks/soak.py --nights 6 --studies-per-night 3 --kills 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def add_studies(archive: Path, first: int, n: int) -> None:
    from medpipe.phantom import ct_phantom
    from medpipe.sample import stable_uid, write_series

    for i in range(first, first + n):
        ph = ct_phantom(shape=(24, 96, 96), n_lesions=1, seed=i)
        write_series(ph.hu, ph.spacing, archive / f"night-{i:04d}" / "ct", modality="CT",
                     study_uid=stable_uid("medpipe-soak", i), series_uid=stable_uid("medpipe-soak-s", i),
                     patient_id=f"SOAK-{i}", intercept=-1024.0, series_description="CHEST")


def workers(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def night(archive: Path, out: Path, env: dict[str, str], kills: int, rng: random.Random, log: Path) -> tuple[int, int]:
    """One ``medpipe run`` with up to ``kills`` worker kills; returns (exit status, kills done)."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen([str(BIN / "medpipe"), "run", str(archive), "--out", str(out), "--workers", "2"],
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    done = 0
    moments = sorted(rng.uniform(8, 40) for _ in range(kills))
    t0 = time.monotonic()
    while proc.poll() is None:
        if moments and time.monotonic() - t0 >= moments[0]:
            moments.pop(0)
            victims = workers(proc)
            if victims:
                rng.choice(victims).kill()
                done += 1
        time.sleep(0.2)
    return proc.returncode, done


def check(out: Path, ever_ok: dict[str, dict[str, int]]) -> tuple[int, int]:
    """(studies lost, 1 if run.json disagrees with the folders else 0); updates ``ever_ok``."""
    from medpipe.outputs import STATUSES
    from medpipe.publish import check_published, read_report, verify_study

    lost = 0
    for key, files in ever_ok.items():
        folder = out / "studies" / key
        if verify_study(folder) or check_published(folder):
            lost += 1
            continue
        now = json.loads((folder / "manifest.json").read_text())["files"]
        lost += bool(set(files) - set(now))
    run = json.loads((out / "run.json").read_text())
    counts = Counter(s["status"] for s in run["studies"])
    false = run["counts"] != {s: counts.get(s, 0) for s in STATUSES}
    for s in run["studies"]:
        doc = read_report(out / "studies" / s["study_key"])
        if s["status"] == "ok" and (doc is None or doc.get("status") != "ok"):
            false = True
        if s["status"] == "ok":
            ever_ok[s["study_key"]] = json.loads((out / "studies" / s["study_key"] / "manifest.json").read_text())["files"]
    return lost, int(false)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nights", type=int, default=6)
    ap.add_argument("--studies-per-night", type=int, default=3)
    ap.add_argument("--kills", type=int, default=2, help="worker kills per night")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from flows.server import auth_string, prefect_server

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="medpipe-soak-"))
    archive, out, log = work / "archive", work / "out", work / "runs.log"
    home = work / "prefect"
    auth = auth_string(home)
    rows, ever_ok = [], {}
    with prefect_server(home, auth=auth) as url:
        env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth, "TF_CPP_MIN_LOG_LEVEL": "2"}
        for n in range(args.nights + 1):
            last = n == args.nights  # one more night without faults: what it cannot finish needs a person
            if not last:
                add_studies(archive, n * args.studies_per_night, args.studies_per_night)
            t0 = time.monotonic()
            rc, killed = night(archive, out, env, 0 if last else args.kills, rng, log)
            lost, false = check(out, ever_ok)
            run = json.loads((out / "run.json").read_text())
            rows.append({"night": n + 1, "kills": killed, "exit": rc, "seconds": round(time.monotonic() - t0, 1),
                         **run["counts"], "lost": lost, "false_record": false,
                         "left_over": int((out / ".medpipe.lock").exists() or any((out / ".work").glob("*")))})
            print(rows[-1], flush=True)
    total = args.nights * args.studies_per_night
    final = rows[-1]
    repairs = total - sum(1 for k in ever_ok) + final["left_over"] + (final["exit"] != 0)
    print("\n| night | worker kills | exit | s | ok | failed | skipped | lost | false record |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['night']} | {r['kills']} | {r['exit']} | {r['seconds']} | {r.get('ok', 0)} | {r.get('failed', 0)} "
              f"| {r.get('skipped', 0)} | {r['lost']} | {r['false_record']} |")
    print(f"\nstudies: {total}; worker kills: {sum(r['kills'] for r in rows)}; "
          f"studies lost: {sum(r['lost'] for r in rows)} (goal 0); false records: {sum(r['false_record'] for r in rows)}; "
          f"runs needing manual repair: {repairs} (goal 0)")
    print(f"(outputs and logs in {work})")
    return 0 if not repairs and not any(r["lost"] or r["false_record"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
