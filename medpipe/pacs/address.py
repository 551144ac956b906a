"""PACS addresses: ``dicomweb+http(s)://HOST:PORT/PATH`` and ``dimse://CALLED_AET@HOST:PORT``.

Secrets never live in an address (run.json records the whole configuration, addresses included):
a ``user:password@`` part is refused with a message that says where credentials go instead.

>>> a = PacsAddress.parse("dicomweb+https://pacs.example.org:8443/dicom-web")
>>> a.kind, a.host, a.port, a.base_url, a.tls
('dicomweb', 'pacs.example.org', 8443, 'https://pacs.example.org:8443/dicom-web', True)
>>> d = PacsAddress.parse("dimse://ORTHANC@10.0.0.5:4242")
>>> d.kind, d.called_aet, d.host, d.port
('dimse', 'ORTHANC', '10.0.0.5', 4242)
>>> PacsAddress.is_pacs("/data/archive"), PacsAddress.is_pacs("dimse://A@h:104")
(False, True)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from ..errors import ConfigError

_SCHEMES = ("dicomweb+http", "dicomweb+https", "dimse")
_AET = re.compile(r"^[\x20-\x7e]{1,16}$")


@dataclass(frozen=True)
class PacsAddress:
    """One PACS endpoint, parsed from its URL (see the module docstring)."""

    url: str
    kind: Literal["dicomweb", "dimse"]
    host: str
    port: int
    path: str = ""
    called_aet: str = ""
    tls: bool = False

    @staticmethod
    def is_pacs(text: str) -> bool:
        """True when ``text`` is written as a PACS address (else it is a folder)."""
        return str(text).lower().startswith(tuple(s + "://" for s in _SCHEMES))

    @classmethod
    def parse(cls, url: str) -> PacsAddress:
        """Parse and check an address; :class:`~medpipe.errors.ConfigError` names what is wrong."""
        text = str(url).strip()
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise ConfigError(f"PACS address {text!r}: scheme must be one of "
                              f"{', '.join(s + '://' for s in _SCHEMES)}")
        if parts.password is not None or (scheme != "dimse" and parts.username is not None):
            raise ConfigError(f"PACS address {cls._strip_userinfo(text)!r}: credentials do not belong in the "
                              "address (it is recorded in run.json); set pacs.auth (environment variables or "
                              "a Prefect Secret block)")
        if parts.query or parts.fragment:
            raise ConfigError(f"PACS address {text!r}: no query string or fragment expected")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"PACS address {text!r}: bad port ({exc})") from None
        host = parts.hostname or ""
        if not host:
            raise ConfigError(f"PACS address {text!r}: no host")
        if scheme == "dimse":
            aet = parts.username or ""
            if not aet or not _AET.match(aet) or aet != aet.strip():
                raise ConfigError(f"PACS address {text!r}: dimse://CALLED_AET@HOST:PORT needs the called AE "
                                  "title (1-16 printable characters, no spaces around it)")
            if parts.path not in ("", "/"):
                raise ConfigError(f"PACS address {text!r}: a DIMSE address has no path")
            return cls(url=text, kind="dimse", host=host, port=port or 104, called_aet=aet)
        tls = scheme == "dicomweb+https"
        return cls(url=text, kind="dicomweb", host=host, port=port or (443 if tls else 80),
                   path=parts.path.rstrip("/"), tls=tls)

    @staticmethod
    def _strip_userinfo(text: str) -> str:
        return re.sub(r"//[^/@]*@", "//***@", text)

    @property
    def base_url(self) -> str:
        """The HTTP(S) root of the DICOMweb service (``dicomweb`` addresses only)."""
        if self.kind != "dicomweb":
            raise ValueError(f"{self.url}: not a DICOMweb address")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{self.path}"

    def redacted(self) -> str:
        """The address for logs (it holds no secret; kept as one place to change if that ever differs)."""
        return self._strip_userinfo(self.url) if self.kind == "dicomweb" else self.url

    @property
    def id(self) -> str:
        """A stable folder name for this address (``OUT/pacs/<id>/``): readable host part and a hash.

        >>> PacsAddress.parse("dimse://ORTHANC@127.0.0.1:4242").id  # doctest: +ELLIPSIS
        'dimse-127.0.0.1-4242-...'
        """
        digest = hashlib.sha256(self.url.lower().encode()).hexdigest()[:8]
        safe_host = re.sub(r"[^A-Za-z0-9.-]", "_", self.host)
        return f"{self.kind}-{safe_host}-{self.port}-{digest}"

    def __str__(self) -> str:
        return self.redacted()
