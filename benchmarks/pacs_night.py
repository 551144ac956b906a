"""What a night with no new studies costs against a PACS of a few hundred studies.

A local Orthanc (Debian's, as in tests/pacs) is filled with ``--studies`` small studies (two
instances each) dated ``--age-days`` ago: the archive a nightly run faces. Then, for DICOMweb and
for DIMSE:

1. **first night**: ``medpipe run URL --out OUT --since <yesterday>``: nothing in its window, it
   stores the watermark;
2. **quiet night** (the figure): ``medpipe run URL --out OUT`` again, no new study anywhere. Its
   wall time (a whole process, as cron or the schedule start it: Prefect, the Dask cluster, the
   query, run.json) and its planning time (run.json ``source.plan_seconds``) are printed;
3. **worst-case planning**: every one of the studies inside the window and already published
   (``plan_pacs`` with ``is_done`` true for all, as a night whose overlap covers the whole PACS):
   the query of the window plus one series query per study; beside it, a plain client doing the
   same queries in the same run (httpx QIDO-RS; pynetdicom C-FIND), the floor of that work.

Usage::

    .venv/bin/python benchmarks/pacs_night.py --studies 300

Figures go to docs/benchmarks.md ("PACS: a quiet night"); measured while other work shares the
machine they are noisy: run twice.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "pacs"))
BIN = Path(sys.executable).parent


def fill(srv, n: int, dest: Path, age_days: int) -> None:
    """``n`` studies of one CT series of two 16 x 16 instances, dated ``age_days`` ago."""
    from conftest import write_study

    day = (dt.date.today() - dt.timedelta(days=age_days)).strftime("%Y%m%d")
    files = []
    for i in range(n):
        files += write_study(dest / f"s{i}", n_series=1, n_instances=2, study_date=day, tag=f"night-{i}").files
    srv.upload(files)


def night(url: str, out: Path, env: dict[str, str], *args: str) -> tuple[int, float, float | None, str]:
    """One ``medpipe run``: exit status, wall seconds, planning seconds (from its task's log), output."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "medpipe"), "run", url, "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    return proc.returncode, wall, (run.get("source") or {}).get("plan_seconds"), json.dumps(run.get("counts"))


def worst_case(url: str, n_expected: int) -> tuple[float, int]:
    """``plan_pacs`` over the whole PACS (window from 400 days back), every study published."""
    from medpipe.config import Config
    from medpipe.pacs import open_client
    from medpipe.pacs.plan import plan_pacs

    cfg = Config.model_validate({"source": {"url": url, "since": (dt.date.today() - dt.timedelta(days=400)).isoformat(),
                                            "use_change_feed": False}})
    with tempfile.TemporaryDirectory() as out, open_client(url, cfg.pacs) as client:
        t0 = time.perf_counter()
        plan = plan_pacs(client, cfg, Path(out), is_done=lambda key, fp: True)
        seconds = time.perf_counter() - t0
    assert len(plan.plans) == n_expected, (len(plan.plans), n_expected)
    return seconds, len(plan.plans)


def plain_dicomweb(base: str, days: int) -> float:
    """The same queries by a plain httpx client: studies of the window, then each study's series."""
    import httpx

    since = (dt.date.today() - dt.timedelta(days=days)).strftime("%Y%m%d")
    t0 = time.perf_counter()
    with httpx.Client(base_url=base, timeout=60) as c:
        studies = c.get("/studies", params={"StudyDate": f"{since}-", "limit": 100000}).json()
        for s in studies:
            uid = s["0020000D"]["Value"][0]
            c.get(f"/studies/{uid}/series").json()
    return time.perf_counter() - t0


def plain_dimse(host: str, port: int, aet: str, days: int) -> float:
    """The same queries by a plain pynetdicom C-FIND: studies of the window, then each one's series."""
    from pydicom import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    since = (dt.date.today() - dt.timedelta(days=days)).strftime("%Y%m%d")
    ae = AE(ae_title="PLAIN")
    ae.add_requested_context(FIND)
    t0 = time.perf_counter()
    assoc = ae.associate(host, port, ae_title=aet)
    q = Dataset()
    q.QueryRetrieveLevel, q.StudyDate, q.StudyInstanceUID = "STUDY", f"{since}-", ""
    uids = [ds.StudyInstanceUID for status, ds in assoc.send_c_find(q, FIND) if ds is not None]
    for uid in uids:
        s = Dataset()
        s.QueryRetrieveLevel, s.StudyInstanceUID, s.SeriesInstanceUID = "SERIES", uid, ""
        s.NumberOfSeriesRelatedInstances, s.Modality = "", ""
        list(assoc.send_c_find(s, FIND))
    assoc.release()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=300)
    ap.add_argument("--age-days", type=int, default=30, help="how old the PACS's studies are")
    args = ap.parse_args()

    from flows.server import auth_string, prefect_server
    from orthanc import OrthancServer

    with tempfile.TemporaryDirectory(prefix="medpipe-pacs-night-") as tmp:
        tmp_p = Path(tmp)
        srv = OrthancServer(tmp_p / "orthanc", stable_age_s=2).start()
        try:
            t0 = time.perf_counter()
            fill(srv, args.studies, tmp_p / "studies", args.age_days)
            print(f"Orthanc filled with {args.studies} studies in {time.perf_counter() - t0:.1f} s")
            home = tmp_p / "prefect"
            auth = auth_string(home)
            with prefect_server(home, auth=auth) as api:
                env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth, "TF_CPP_MIN_LOG_LEVEL": "2"}
                since = (dt.date.today() - dt.timedelta(days=1)).isoformat()
                rows = []
                for kind, url in (("DICOMweb", srv.dicomweb_url), ("DIMSE", srv.dimse_url)):
                    out = tmp_p / f"out-{kind}"
                    code1, wall1, _, _ = night(url, out, env, "--since", since)
                    code2, wall2, plan2, counts = night(url, out, env)
                    worst, n = worst_case(url, args.studies)
                    days = args.age_days + 1
                    peer = (plain_dicomweb(srv.url + "/dicom-web", days) if kind == "DICOMweb"
                            else plain_dimse(srv.host, srv.dicom_port, srv.aet, days))
                    rows.append((kind, code1, wall1, code2, wall2, plan2, counts, worst, peer, n))
        finally:
            srv.stop()
    print(f"\nA night with no new studies, PACS of {args.studies} studies (2 cores shared: noisy)")
    print(f"{'protocol':<9} {'1st night':>10} {'quiet night':>12} {'its plan':>9}   "
          f"{'plan, all {0} in window'.format(args.studies):>26} {'plain client':>13} {'ratio':>6}")
    for kind, c1, w1, c2, w2, p2, counts, worst, peer, n in rows:
        plan = f"{p2:.2f} s" if p2 is not None else "–"
        print(f"{kind:<9} {w1:>8.1f} s {w2:>10.1f} s {plan:>9}   {worst:>24.2f} s {peer:>11.2f} s "
              f"{worst / peer:>5.1f}x   (exit {c1}/{c2}, counts {counts})")


if __name__ == "__main__":
    main()
