"""Retrieval from a real Orthanc: WADO-RS, C-GET and C-MOVE into the cache, instances as sent
(compressed ones too), counts proven; short retrievals, wrong credentials and a stopped PACS."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread

from medpipe.config import Config, PacsConfig
from medpipe.pacs import IncompleteStudy, PacsAuthError, PacsUnavailable, StudyQuery, open_client
from medpipe.pacs.auth import Credentials
from medpipe.pacs.client import pacs_semaphore
from medpipe.pacs.plan import plan_pacs
from medpipe.pacs.retrieve import drop_study, fetch_study

FAST = {"timeout_s": 3, "retries": 2, "backoff_s": 0.05}


def _cfg(**pacs):
    return Config.model_validate({"source": {"since": "1990-01-01", "recheck_wait_s": 0},
                                  "pacs": {**FAST, **pacs}})


def _headers(folder: Path) -> dict[str, tuple[str, str]]:
    """SOPInstanceUID -> (transfer syntax, SOP class) of every file under ``folder``."""
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            ds = dcmread(p, stop_before_pixels=True)
            out[str(ds.SOPInstanceUID)] = (str(ds.file_meta.TransferSyntaxUID), str(ds.SOPClassUID))
    return out


@pytest.mark.parametrize("how", ["wado-rs", "c-get", "c-move"])
def test_fetch_every_sample_study_as_sent(orthanc_sample, sample_archive, tmp_path, how, move_port):
    srv = orthanc_sample
    cfg = _cfg(retrieve="move" if how == "c-move" else "get", move_port=move_port)
    source_files = _headers(Path(sample_archive["root"]))
    with open_client(srv.dicomweb_url if how == "wado-rs" else srv.dimse_url, cfg.pacs) as c:
        plan = plan_pacs(c, cfg, tmp_path / "out")
        assert len(plan.plans) == len(sample_archive["studies"]) and not plan.deferred
        got: dict[str, tuple[str, str]] = {}
        for p in plan.plans:
            folder = fetch_study(p["source"], tmp_path / "cache", c)
            got.update(_headers(folder))
            drop_study(tmp_path / "cache", p["source"])
            assert not folder.exists()
    assert got == source_files   # every instance, in the transfer syntax it was stored with
    assert "1.2.840.10008.1.2.4.90" in {ts for ts, _ in got.values()}   # JPEG 2000 lossless, not transcoded


def test_c_get_writes_each_dataset_as_sent_across_many_pdus(orthanc, make_study, tmp_path):
    """medpipe's own C-GET loop: instances of 512 KB arrive in several PDUs each; every file is a
    valid Part 10 file whose dataset equals the one stored, named by its SOPInstanceUID."""
    study = make_study(n_instances=3, size=512)
    orthanc.upload(study.files)
    [(series_uid, files)] = study.series.items()
    with open_client(orthanc.dimse_url, PacsConfig(**FAST)) as c:
        assert c.retrieve_series(study.study_uid, series_uid, tmp_path / "got") == 3
    sent = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, files)}
    for p in (tmp_path / "got").iterdir():
        ds = dcmread(p)
        assert p.name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == sent[p.name[:-4]].file_meta.TransferSyntaxUID
        assert ds == sent.pop(p.name[:-4])
        assert ds.pixel_array.shape == (512, 512)
    assert not sent


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_instance_removed_after_planning_is_incomplete(orthanc, make_study, tmp_path, protocol):
    study = make_study(n_series=2, n_instances=4)
    orthanc.upload(study.files)
    orthanc.wait_stable()
    cfg = _cfg()
    with open_client(orthanc.dicomweb_url if protocol == "dicomweb" else orthanc.dimse_url, cfg.pacs) as c:
        [p] = plan_pacs(c, cfg, tmp_path / "out").plans
        sop = str(dcmread(study.files[-1]).SOPInstanceUID)
        orthanc.delete(f"/instances/{_instance_id(orthanc, sop)}")
        # DIMSE: the recount before retrieval (no server stability flag) sees 4 -> 3; DICOMweb: the listing
        with pytest.raises(IncompleteStudy, match="4 -> 3 instance|3 instance.* where 4 were counted") as exc:
            fetch_study(p["source"], tmp_path / "cache", c)
        assert list(exc.value.missing.values()) == [(4, 3)]
        assert not (tmp_path / "cache" / p["study_key"]).exists()


def _instance_id(srv, sop_uid: str) -> str:
    import httpx

    r = httpx.post(f"{srv.url}/tools/lookup", content=sop_uid, auth=srv.auth)
    return next(x["ID"] for x in r.json() if x["Type"] == "Instance")


def test_c_move_that_delivers_elsewhere_is_incomplete(orthanc_factory, make_study, tmp_path, move_port):
    """C-MOVE can report success and deliver nothing to us (the PACS knows our AE title at another
    address): the counts catch it."""
    elsewhere = _accept_all_receiver()   # a receiver that is not the one we listen on, taking everything
    try:
        srv = orthanc_factory(modalities={"MEDPIPE": ("MEDPIPE", "127.0.0.1", elsewhere.server_address[1])})
        study = make_study(n_instances=3)
        srv.upload(study.files)
        srv.wait_stable()
        cfg = _cfg(retrieve="move", move_port=move_port)
        with open_client(srv.dimse_url, cfg.pacs) as c:
            [p] = plan_pacs(c, cfg, tmp_path / "out").plans
            with pytest.raises(IncompleteStudy, match="0 of 3 listed instance"):
                fetch_study(p["source"], tmp_path / "cache", c)
    finally:
        elsewhere.shutdown()


def _accept_all_receiver():
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="ELSEWHERE")
    ae.add_supported_context(CTImageStorage)
    return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])


def test_wrong_password_is_an_auth_error_at_once(orthanc_factory, sample_archive, tmp_path):
    srv = orthanc_factory(users={"medpipe": "right-password"})
    cfg = PacsConfig(timeout_s=3, retries=3, backoff_s=2.0)
    wrong = Credentials(kind="basic", username="medpipe", password="wrong-password")
    t0 = time.monotonic()
    with open_client(srv.dicomweb_url, cfg, wrong) as c:
        with pytest.raises(PacsAuthError, match="HTTP 401.*refused medpipe's credentials") as exc:
            c.find_studies(StudyQuery())
    assert time.monotonic() - t0 < 1.5   # no retry (a retry would wait backoff_s)
    assert "wrong-password" not in str(exc.value) and "medpipe:" not in str(exc.value)
    right = Credentials(kind="basic", username="medpipe", password="right-password")
    with open_client(srv.dicomweb_url, cfg, right) as c:
        assert c.find_studies(StudyQuery()) == []


def test_unknown_called_ae_title_is_an_auth_error(orthanc_factory):
    srv = orthanc_factory(extra={"DicomCheckCalledAet": True})
    with open_client(srv.dimse_url.replace("ORTHANC@", "NOT_ORTHANC@"), PacsConfig(**FAST)) as c:
        with pytest.raises(PacsAuthError, match="called AE title not recognised"):
            c.find_studies(StudyQuery())


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_stopped_pacs_is_unavailable_after_retries(orthanc, make_study, tmp_path, protocol):
    orthanc.upload(make_study().files)
    orthanc.stop(kill=True)
    url = orthanc.dicomweb_url if protocol == "dicomweb" else orthanc.dimse_url
    cfg = PacsConfig(timeout_s=1, retries=2, backoff_s=0.05)
    with open_client(url, cfg) as c:
        t0 = time.monotonic()
        with pytest.raises(PacsUnavailable, match="after 2 retries"):
            c.find_studies(StudyQuery())
        assert time.monotonic() - t0 < 10
        orthanc.start()   # back on the same storage: the same client works again
        assert len(c.find_studies(StudyQuery())) == 1


def test_one_throttle_per_pacs_address():
    from medpipe.pacs import PacsAddress

    a = pacs_semaphore(PacsAddress.parse("dimse://X@h5-throttle:104"), 2)
    b = pacs_semaphore(PacsAddress.parse("dimse://OTHER_AET@h5-throttle:104"), 5)
    c = pacs_semaphore(PacsAddress.parse("dimse://X@h5-throttle:105"), 2)
    assert a is b and a is not c
    assert a.acquire(blocking=False) and a.acquire(blocking=False) and not a.acquire(blocking=False)
    a.release(), a.release()


class _TlsProxy:
    """HTTPS in front of Orthanc's HTTP (Debian's Orthanc 1.10.1 crashes on its own HTTPS, SIGSEGV
    at the first connection): Python's ssl server, a thread per connection pumping both ways."""

    def __init__(self, pem_cert: Path, pem_key: Path, target_port: int) -> None:
        import socket
        import ssl
        import threading

        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(pem_cert, pem_key)
        self._target = target_port
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._threading = threading
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket

        while True:
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return
            try:
                tls = self._ctx.wrap_socket(raw, server_side=True)
            except OSError:
                raw.close()   # a client that does not trust us
                continue
            up = socket.create_connection(("127.0.0.1", self._target))
            self._threading.Thread(target=self._pump, args=(tls, up), daemon=True).start()

    @staticmethod
    def _pump(tls, up) -> None:
        """Both directions on one thread: an SSL socket must not be read and written concurrently."""
        import select

        try:
            while True:
                ready = [tls] if tls.pending() else select.select([tls, up], [], [], 10)[0]
                if not ready:
                    return
                for src, dst in ((tls, up), (up, tls)):
                    if src in ready:
                        data = src.recv(1 << 16)
                        if not data:
                            return
                        dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (tls, up):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._sock.close()


def test_tls_with_a_ca_bundle(orthanc, make_study, tmp_path):
    """DICOMweb over HTTPS: trusted through pacs.ca_bundle (queries by httpx, WADO-RS by http.client);
    without it the certificate is refused at once, with the reason."""
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    study = make_study(n_instances=3)
    orthanc.upload(study.files)
    orthanc.wait_stable()
    proxy = _TlsProxy(cert, key, orthanc.http_port)
    try:
        url = f"dicomweb+https://127.0.0.1:{proxy.port}/dicom-web"
        cfg = _cfg(ca_bundle=str(cert))
        with open_client(url, cfg.pacs) as c:
            [p] = plan_pacs(c, cfg, tmp_path / "out").plans
            assert len(list(fetch_study(p["source"], tmp_path / "cache", c).rglob("*.dcm"))) == 3
        t0 = time.monotonic()
        with open_client(url, PacsConfig(timeout_s=3, retries=3, backoff_s=2.0)) as c:
            with pytest.raises(Exception, match="TLS certificate is not trusted.*pacs.ca_bundle"):
                c.find_studies(StudyQuery())
        assert time.monotonic() - t0 < 1.5
    finally:
        proxy.close()
