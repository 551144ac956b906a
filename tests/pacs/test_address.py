"""PACS addresses and credentials: parsing, refusals with clear messages, secrets kept out of text."""

from __future__ import annotations

import pytest

from medpipe.config import Config, PacsAuthConfig
from medpipe.errors import ConfigError
from medpipe.pacs import Credentials, PacsAddress, resolve_credentials, scrub


@pytest.mark.parametrize("url, kind, host, port, extra", [
    ("dicomweb+http://127.0.0.1:8042/dicom-web", "dicomweb", "127.0.0.1", 8042,
     {"base_url": "http://127.0.0.1:8042/dicom-web", "tls": False}),
    ("dicomweb+https://pacs.example.org/dicomweb/", "dicomweb", "pacs.example.org", 443,
     {"base_url": "https://pacs.example.org:443/dicomweb", "tls": True}),
    ("dimse://ORTHANC@10.1.2.3:4242", "dimse", "10.1.2.3", 4242, {"called_aet": "ORTHANC"}),
    ("dimse://PACS@pacs", "dimse", "pacs", 104, {"called_aet": "PACS"}),
])
def test_parse(url, kind, host, port, extra):
    a = PacsAddress.parse(url)
    assert (a.kind, a.host, a.port) == (kind, host, port)
    for k, v in extra.items():
        assert getattr(a, k) == v
    assert a.redacted() == url and str(a) == url
    assert a.id == PacsAddress.parse(url).id and a.id.startswith(f"{kind}-{host}-{port}-")


@pytest.mark.parametrize("url, words", [
    ("http://pacs:8042/dicom-web", "scheme must be one of"),
    ("dicomweb+http://alice:s3cret@pacs:8042/dicom-web", "credentials do not belong"),
    ("dicomweb+http://alice@pacs:8042/dicom-web", "credentials do not belong"),
    ("dimse://pacs:104", "called AE title"),
    ("dimse://A_TITLE_LONGER_THAN_16@pacs:104", "called AE title"),
    ("dimse://AET@pacs:104/path", "no path"),
    ("dicomweb+http://:8042/x", "no host"),
    ("dicomweb+http://pacs:99999/x", "bad port"),
    ("dicomweb+http://pacs/x?token=abc", "no query string"),
])
def test_refused(url, words):
    with pytest.raises(ConfigError, match=words) as exc:
        PacsAddress.parse(url)
    assert "s3cret" not in str(exc.value)


def test_config_checks_source_url_without_echoing_it():
    with pytest.raises(Exception) as exc:
        Config.model_validate({"source": {"url": "dicomweb+http://alice:s3cret@pacs/dw"}})
    assert "credentials do not belong" in str(exc.value) and "s3cret" not in str(exc.value)
    with pytest.raises(Exception, match="after source.until"):
        Config.model_validate({"source": {"since": "2026-11-02", "until": "2026-11-01"}})
    assert Config.model_validate({"source": {"url": "dimse://A@h:11112"}}).source.url == "dimse://A@h:11112"


def test_is_pacs():
    assert PacsAddress.is_pacs("DICOMWEB+HTTPS://h/x") and PacsAddress.is_pacs("dimse://A@h")
    assert not PacsAddress.is_pacs("/data/dicom") and not PacsAddress.is_pacs("dimse.d/archive")


def test_credentials_from_environment_never_shown():
    auth = PacsAuthConfig(kind="basic", username_env="U", password_env="P")
    creds = resolve_credentials(auth, env={"U": "alice", "P": "s3cret"})
    assert (creds.username, creds.password) == ("alice", "s3cret")
    assert "s3cret" not in repr(creds) and "alice" not in str(creds)
    assert creds.http_headers()["Authorization"].startswith("Basic ")
    header = creds.http_headers()["Authorization"].split()[1]
    assert scrub(f"sent {header} for alice/s3cret", creds) == "sent *** for ***/***"
    with pytest.raises(ConfigError, match="environment variable P is not set"):
        resolve_credentials(auth, env={"U": "alice"})
    bearer = resolve_credentials(PacsAuthConfig(kind="bearer", secret_block="pacs-token"), secret="tok-123")
    assert bearer.http_headers() == {"Authorization": "Bearer tok-123"} and "tok-123" not in repr(bearer)
    with pytest.raises(ConfigError, match="resolved by the caller"):
        resolve_credentials(PacsAuthConfig(kind="bearer", secret_block="pacs-token"), env={})
    assert resolve_credentials(PacsAuthConfig()) == Credentials()
