"""A real Orthanc for the tests: Debian's ``Orthanc`` on loopback, free ports, temporary storage.

The server runs from one JSON configuration written next to its storage and index folders, with
the DICOMweb plugin loaded, optional basic-auth users and optional DICOM peers (``DicomModalities``,
the destinations a C-MOVE may name). ``stop()`` and ``start()`` keep the same folders and ports,
so a test can take the PACS down and bring it back with what it held.

Other suites import it with ``tests/pacs`` on ``sys.path`` (``tests`` is not a package)::

    sys.path.insert(0, str(Path(__file__).parents[1] / "pacs"))
    from orthanc import OrthancServer

    srv = OrthancServer(tmp_path / "orthanc", users={"alice": "s3cret"}).start()
    srv.upload_folder(archive)          # POST /instances of every file
    srv.get("/studies")                 # REST, with the first user's credentials
    srv.dicomweb_url                    # 'dicomweb+http://127.0.0.1:PORT/dicom-web'
    srv.dimse_url                       # 'dimse://ORTHANC@127.0.0.1:PORT'
    srv.stop(); srv.start()             # same storage, same ports
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_binary() -> str | None:
    """Path of Debian's ``Orthanc`` (in /usr/sbin, which a non-root PATH may lack), or None."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None


def missing_reason() -> str | None:
    """Why the Orthanc tests cannot run here (None when they can)."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (Debian package 'orthanc'; `make system-packages` installs it as root)"
    if not DICOMWEB_PLUGIN.exists():
        return f"the DICOMweb plugin {DICOMWEB_PLUGIN} is missing (Debian package 'orthanc-dicomweb')"
    return None


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancServer:
    """One Orthanc process with its own storage, index, configuration and ports.

    Parameters
    ----------
    root
        Folder for ``config.json``, ``storage/``, ``index/`` and ``orthanc.log`` (created).
    aet
        Orthanc's AE title (the called AET of ``dimse://AET@HOST:PORT``).
    users
        Basic-auth users; when given, ``AuthenticationEnabled`` is on and every REST and
        DICOMweb request must carry one of them (the helper's own requests use the first).
    modalities
        DICOM peers Orthanc knows, ``{name: (aet, host, port)}``: C-MOVE destinations.
    stable_age_s
        Orthanc's ``StableAge``: seconds without a new instance before a series is stable.
    extra
        More configuration keys, merged last.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        aet: str = "ORTHANC",
        users: Mapping[str, str] | None = None,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        stable_age_s: int = 60,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.aet = aet
        self.users = dict(users or {})
        self.modalities = dict(modalities or {})
        self.stable_age_s = stable_age_s
        self.extra = dict(extra or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.host = "127.0.0.1"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # ------------------------------------------------------------------ addresses
    @property
    def url(self) -> str:
        """Orthanc's REST root, ``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The medpipe address of its DICOMweb service."""
        return f"dicomweb+http://{self.host}:{self.http_port}/dicom-web"

    @property
    def dimse_url(self) -> str:
        """The medpipe address of its DICOM service."""
        return f"dimse://{self.aet}@{self.host}:{self.dicom_port}"

    @property
    def auth(self) -> tuple[str, str] | None:
        """The first user's (name, password), or None without authentication."""
        return next(iter(self.users.items()), None)

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict[str, Any]:
        """The JSON configuration the process starts with."""
        cfg: dict[str, Any] = {
            "Name": f"medpipe-test-{self.http_port}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "SyncStorageArea": False,       # no fsync per stored file: tests, not a hospital
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpBindAddress": self.host,   # loopback only (Orthanc >= 1.9)
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "StableAge": self.stable_age_s,
            "SaveJobs": False,
            "HttpsVerifyPeers": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        }
        cfg.update(self.extra)
        return cfg

    # ------------------------------------------------------------------ life cycle
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 30.0) -> OrthancServer:
        """Start (or start again, on the same storage and ports); return once ``GET /system`` answers."""
        if self.running:
            return self
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError(missing_reason() or "Orthanc is not installed")
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "config.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self._log = open(self.root / "orthanc.log", "ab")
        # DCMTK as Debian builds it leaves Nagle's algorithm on unless TCP_NODELAY=1 is in the
        # environment: each C-GET/C-MOVE sub-operation then waits for a delayed ACK (~4x slower)
        env = {**os.environ, "TCP_NODELAY": "1"}
        self._proc = subprocess.Popen(
            [binary, str(config_path)], stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=self.root, env=env,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode} at start:\n{self.log_tail()}")
            try:
                if self._client(timeout=1.0).get("/system").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer GET /system within {timeout_s} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15.0, *, kill: bool = False) -> None:
        """Stop the process (SIGTERM, then SIGKILL); storage and ports are kept for ``start()``.

        Orthanc's orderly shutdown takes seconds (its DICOM server winds down); ``kill=True``
        ends it at once, as a crash would (the fixtures' teardown uses it).
        """
        if self._proc is not None:
            if self._proc.poll() is None:
                if kill:
                    self._proc.kill()
                self._proc.terminate()
                try:
                    self._proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        path = self.root / "orthanc.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    # ------------------------------------------------------------------ REST
    def _client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=timeout)

    def get(self, path: str, **params: Any) -> Any:
        """``GET`` a REST path and return its JSON."""
        with self._client() as c:
            r = c.get(path, params=params or None)
            r.raise_for_status()
            return r.json()

    def post(self, path: str, body: Any = None) -> Any:
        with self._client() as c:
            r = c.post(path, content=json.dumps(body) if body is not None else None)
            r.raise_for_status()
            return r.json() if r.content else None

    def delete(self, path: str) -> None:
        with self._client() as c:
            c.delete(path).raise_for_status()

    def upload(self, paths: Iterable[str | Path]) -> list[str]:
        """Store DICOM files by ``POST /instances``; return Orthanc's instance ids."""
        ids: list[str] = []
        with self._client() as c:
            for p in paths:
                r = c.post("/instances", content=Path(p).read_bytes(),
                           headers={"Content-Type": "application/dicom"})
                r.raise_for_status()
                ids.append(r.json()["ID"])
        return ids

    def upload_folder(self, folder: str | Path) -> list[str]:
        """Store every DICOM file under ``folder`` (any name; DICOMDIR left out)."""
        files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != "DICOMDIR"]
        return self.upload(files)

    def wait_stable(self, timeout_s: float = 30.0) -> None:
        """Wait until Orthanc reports every series stable (``StableAge`` s after its last instance)."""
        deadline = time.monotonic() + timeout_s
        while any(not self.get(f"/series/{sid}")["IsStable"] for sid in self.get("/series")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc series not stable after {timeout_s} s")
            time.sleep(0.2)

    def clear(self) -> None:
        """Delete every patient (hence every study) Orthanc holds."""
        for pid in self.get("/patients"):
            self.delete(f"/patients/{pid}")

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's id of the study with this StudyInstanceUID, or None."""
        with self._client() as c:
            r = c.post("/tools/lookup", content=study_uid)
            r.raise_for_status()
            found = [x["ID"] for x in r.json() if x.get("Type") == "Study"]
        return found[0] if found else None

    def instance_count(self, study_uid: str) -> int:
        """Instances Orthanc holds in the study (0 when it has none)."""
        sid = self.study_id(study_uid)
        return 0 if sid is None else len(self.get(f"/studies/{sid}/instances"))
