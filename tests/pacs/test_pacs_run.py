"""End to end against a real Orthanc: nightly ``medpipe run`` processes pulling from a PACS and
sending SEG, SR and the report image back, for DICOMweb and for DIMSE.

Each test is one story of several nights, each night a real ``medpipe run`` subprocess as users
start it (its own Dask cluster; one Prefect server for the module):

1. two studies (DICOMweb: and the sample archive, whose CR is JPEG 2000 compressed): all
   processed, SEG and SR filed into the same studies in the source Orthanc and delivered to a
   second destination;
2. two new studies arrive, and a third whose series is still being added while the run plans
   (instances trickle in): only the two are processed, the third is ``deferred``; the second
   destination is stopped, so its results stay ``pending`` in the outbox;
3. the third study is complete and the second destination is back: the third is processed and
   the outbox delivers everything it held;
4. (DICOMweb) a wrong password: the run fails at once, exit 3, with a clear message; (DIMSE) a
   wrong called AE title, the same.

After the nights, every byte under OUT, the runs' output and the Prefect server's database are
searched for the password.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orthanc import OrthancServer, missing_reason

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 600
STABLE_AGE_S = 6            # Orthanc's StableAge of the source: a series quiet this long is stable
TRICKLE_S = 2.0             # one instance of the growing series every TRICKLE_S seconds (< StableAge)
USER = "medpipe"

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One Prefect server for the runs of this module (as tests/faults do); its home is searched
    for secrets at the end."""
    from flows.server import auth_string, prefect_server

    home = tmp_path_factory.mktemp("prefect-pacs")
    auth = auth_string(home)
    with prefect_server(home, auth=auth) as url:
        yield {"env": {"PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth}, "home": home}


# --------------------------------------------------------------------------- studies
def write_phantom(dest: Path, n: int, *, slices: int = 12) -> tuple[str, list[Path]]:
    """A small chest CT phantom study dated today (inside every night's window)."""
    from medpipe.phantom import ct_phantom
    from medpipe.sample import stable_uid, write_series

    ph = ct_phantom(shape=(slices, 64, 64), n_lesions=1, seed=n)
    uid = stable_uid("medpipe-test-pacs-run", dest.name, n)
    files = write_series(ph.hu, ph.spacing, dest / f"study-{n}", modality="CT", study_uid=uid,
                         series_uid=stable_uid("medpipe-test-pacs-run-series", dest.name, n),
                         patient_id=f"PACS-RUN-{n}", patient_name=f"Night^Patient{n}", intercept=-1024.0,
                         series_description="CHEST", BodyPartExamined="CHEST",
                         study_date=dt.date.today().strftime("%Y%m%d"), StudyTime="000100")
    return uid, files


class Trickle:
    """Upload files one by one, ``TRICKLE_S`` apart, in a thread: a series still being added."""

    def __init__(self, srv: OrthancServer, files: list[Path]):
        self.srv, self.files = srv, list(files)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for f in self.files:
            self.srv.upload([f])
            time.sleep(TRICKLE_S)

    def __enter__(self) -> "Trickle":
        self.srv.upload(self.files[:2])
        self.files = self.files[2:]
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()


def wait_stable(srv: OrthancServer) -> None:
    """Until Orthanc calls every series stable (its StableAge passed since the last instance)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(srv.get(f"/series/{s}")["IsStable"] for s in srv.get("/series")):
            return
        time.sleep(0.5)
    pytest.fail("Orthanc's series did not become stable")


def modalities_in(srv: OrthancServer, study_uid: str) -> list[str]:
    """The Modality of each series Orthanc holds in the study (through its REST API)."""
    sid = srv.study_id(study_uid)
    if sid is None:
        return []
    return sorted(s["MainDicomTags"].get("Modality", "") for s in srv.get(f"/studies/{sid}/series"))


# --------------------------------------------------------------------------- runs
class Nights:
    """``medpipe run SOURCE --out OUT --send ...`` as a subprocess, night after night."""

    def __init__(self, tmp: Path, prefect: dict[str, Any], source: str, send: list[str], password: str,
                 extra_config: dict[str, Any] | None = None):
        self.tmp, self.out, self.source, self.send = tmp, tmp / "out", source, send
        self.logs: list[Path] = []
        self.env = {**os.environ, **prefect["env"], "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                    "MEDPIPE_PACS_USER": USER, "MEDPIPE_PACS_PASSWORD": password}
        config = {
            "model": {"enabled": False},   # the PACS path is under test; inference has its own tests
            "cluster": {"workers": 2},
            "pacs": {"auth": {"kind": "basic"}, "retries": 1, "backoff_s": 0.2, "timeout_s": 10},
            "source": {"stable_age_s": 30, "recheck_wait_s": 3 * TRICKLE_S},
        }
        for k, v in (extra_config or {}).items():
            config[k] = {**config.get(k, {}), **v}
        self.config = tmp / "medpipe.yaml"
        self.config.write_text(yaml.safe_dump(config))

    def run(self, *args: str, source: str | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
        log = self.tmp / f"night-{len(self.logs)}.log"
        self.logs.append(log)
        cmd = [str(BIN / "medpipe"), "run", source or self.source, "--out", str(self.out), "--config",
               str(self.config), *[a for d in self.send for a in ("--send", d)], *args]
        with open(log, "wb") as fh:
            proc = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=ROOT, stdout=fh,
                                  stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
        return proc.returncode, log.read_text(errors="replace")

    def record(self) -> dict[str, Any]:
        return json.loads((self.out / "run.json").read_text())


def statuses(run: dict[str, Any]) -> dict[str, str]:
    return {s["study_key"]: s["status"] for s in run["studies"]}


def outbox(run: dict[str, Any], url: str) -> dict[str, Any]:
    from medpipe.pacs import PacsAddress

    want = PacsAddress.parse(url).redacted()
    return next(d for d in run["outbox"] if d["destination"] == want)


def assert_no_secret(password: str, places: list[Path]) -> None:
    """No byte of any file under ``places`` holds the password or the basic-auth header value."""
    needles = [password.encode(), base64.b64encode(f"{USER}:{password}".encode())]
    for place in places:
        files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
        for f in files:
            data = f.read_bytes()
            for n in needles:
                assert n not in data, f"{f} holds a secret"


# --------------------------------------------------------------------------- the stories
def _story(tmp_path: Path, prefect_env: dict[str, Any], kind: str, sample: dict[str, Any] | None = None) -> None:
    from medpipe.keys import study_key

    password = "pw-" + secrets.token_hex(12)
    extra = {"DicomCheckCalledAet": True} if kind == "dimse" else {}
    src = OrthancServer(tmp_path / "pacs", users={USER: password}, stable_age_s=STABLE_AGE_S, extra=extra).start()
    dest = OrthancServer(tmp_path / "dest", stable_age_s=STABLE_AGE_S).start()
    try:
        url = src.dicomweb_url if kind == "dicomweb" else src.dimse_url
        dest_url = dest.dicomweb_url if kind == "dicomweb" else dest.dimse_url
        nights = Nights(tmp_path, prefect_env, url, [url, dest_url], password)
        # Study 5 has more slices: they trickle in for as long as night 2 plans and fetches.
        uids = {n: write_phantom(tmp_path / "studies", n, slices=12 if n < 5 else 24) for n in range(1, 6)}
        keys = {n: study_key(uid) for n, (uid, _) in uids.items()}

        # Night 1: studies 1 and 2, and the sample archive if given (a first run: --since).
        src.upload(uids[1][1] + uids[2][1])
        samples = {s["study_key"]: s for s in (sample or {}).get("studies", [])}
        if sample:
            src.upload_folder(sample["root"])
        wait_stable(src)
        code, text = nights.run("--since", "2000-01-01")
        assert code == 0, text
        run = nights.record()
        assert statuses(run) == {keys[1]: "ok", keys[2]: "ok", **{k: "ok" for k in samples}}, run["studies"]
        assert run["source"]["window"]["start"] and run["source"]["committed"] is True
        first = 2 + len(samples)
        for d in (url, dest_url):
            assert outbox(run, d)["delivered"] == first and outbox(run, d)["pending"] == 0, run["outbox"]
        for n in (1, 2):
            assert {"SEG", "SR"} <= set(modalities_in(src, uids[n][0])), "results not in the source study"
            assert {"SEG", "SR"} <= set(modalities_in(dest, uids[n][0]))
        for s in samples.values():  # SR for every study; SEG for the volumes
            want = {"SEG", "SR"} if s["n_files"] > 1 else {"SR"}
            assert want <= set(modalities_in(src, s["study_uid"])), (s["name"], modalities_in(src, s["study_uid"]))
        sent = src.instance_count(uids[1][0])

        # Night 2: studies 3 and 4 are new; 5 is still arriving; the second destination is down.
        src.upload(uids[3][1] + uids[4][1])
        wait_stable(src)
        dest.stop()
        with Trickle(src, uids[5][1]):
            code, text = nights.run()
        assert code == 0, text
        run = nights.record()
        got = statuses(run)
        assert got[keys[3]] == got[keys[4]] == "ok", run["studies"]
        assert got[keys[5]] == "deferred", run["studies"]
        assert all(got.get(k, "skipped") == "skipped" for k in [keys[1], keys[2], *samples]), run["studies"]
        assert run["counts"]["deferred"] == 1 and run["counts"]["ok"] == 2
        assert outbox(run, url)["delivered"] == 2, run["outbox"]                  # 3 and 4 only
        assert outbox(run, dest_url)["pending"] == 2 and outbox(run, dest_url)["last_error"], run["outbox"]
        assert src.instance_count(uids[1][0]) == sent, "an unchanged study's results were sent again"
        assert "deferred" in (nights.out / "run.html").read_text()
        assert "pending" in (nights.out / "run.html").read_text().lower()

        # Night 3: study 5 complete, the destination back: 5 processed, the outbox emptied.
        wait_stable(src)
        dest.start()
        code, text = nights.run()
        assert code == 0, text
        run = nights.record()
        assert statuses(run).get(keys[5]) == "ok", run["studies"]
        assert outbox(run, dest_url)["pending"] == 0 and outbox(run, dest_url)["delivered"] == 3, run["outbox"]
        for n in (3, 4, 5):
            assert {"SEG", "SR"} <= set(modalities_in(dest, uids[n][0]))
        assert {"SEG", "SR"} <= set(modalities_in(src, uids[5][0]))

        # Night 4: wrong credentials fail the run at once, with a clear message.
        if kind == "dicomweb":
            code, text = nights.run(env={"MEDPIPE_PACS_PASSWORD": "not-" + password})
        else:
            # Another address is another source (no watermark yet): --since, or it is refused first.
            code, text = nights.run("--since", "2026-01-01", source=f"dimse://WRONG@{src.host}:{src.dicom_port}")
        assert code == 3, text
        assert "refused medpipe's credentials" in text, text
    finally:
        src.stop()
        dest.stop()
    assert_no_secret(password, [nights.out, *nights.logs, prefect_env["home"]])


def test_nightly_dicomweb(tmp_path: Path, prefect_env: dict[str, Any], sample_archive: dict[str, Any]) -> None:
    _story(tmp_path, prefect_env, "dicomweb", sample_archive)


def test_nightly_dimse(tmp_path: Path, prefect_env: dict[str, Any]) -> None:
    """The same story over C-FIND, C-GET and C-STORE (small studies only: the sample archive's
    run is the DICOMweb test's, and each night here starts a whole run)."""
    _story(tmp_path, prefect_env, "dimse")
