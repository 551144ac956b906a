"""Credentials for a PACS, resolved once from environment variables (or a secret the task layer read).

The library never logs a credential, never writes one to a file, and passes errors through
:func:`scrub` before they leave a client, so that neither run.json nor a log line can hold one.

>>> creds = Credentials(kind="basic", username="alice", password="s3cret")
>>> creds
Credentials(kind='basic', username='***', password='***')
>>> scrub("401 for alice:s3cret", creds)
'401 for ***:***'
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import PacsAuthConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class Credentials:
    """Resolved secrets; ``repr`` and ``str`` never show them."""

    kind: Literal["none", "basic", "bearer"] = "none"
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)

    def __repr__(self) -> str:
        if self.kind == "basic":
            return "Credentials(kind='basic', username='***', password='***')"
        if self.kind == "bearer":
            return "Credentials(kind='bearer', token='***')"
        return "Credentials(kind='none')"

    __str__ = __repr__

    def secrets(self) -> list[str]:
        """Every secret string (and its encodings as they appear on the wire), longest first."""
        out: list[str] = []
        if self.kind == "basic":
            out += [self.password, self.username,
                    base64.b64encode(f"{self.username}:{self.password}".encode()).decode()]
        elif self.kind == "bearer":
            out.append(self.token)
        return sorted({s for s in out if s}, key=len, reverse=True)

    def http_headers(self) -> dict[str, str]:
        """The ``Authorization`` header (empty without credentials)."""
        if self.kind == "basic":
            raw = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return {"Authorization": f"Basic {raw}"}
        if self.kind == "bearer":
            return {"Authorization": f"Bearer {self.token}"}
        return {}


NO_CREDENTIALS = Credentials()


def secret_text(value: str | Mapping[str, Any], block: str | None = None) -> str:
    """The credentials string (``user:password``, or the token) of a secret's value.

    A Prefect Secret block holds a string, or JSON: ``{"username": ..., "password": ...}`` or
    ``{"token": ...}``. ``block`` names the secret in errors.

    >>> secret_text({"username": "alice", "password": "s3cret"})
    'alice:s3cret'
    >>> secret_text({"token": "abc"}), secret_text("bob:pw")
    ('abc', 'bob:pw')
    """
    if isinstance(value, Mapping):
        if "token" in value:
            return str(value["token"])
        if "username" in value and "password" in value:
            return f"{value['username']}:{value['password']}"
        raise ConfigError(f"Secret block {block!r}: a JSON value needs 'username' and 'password', or 'token'")
    return str(value)


def resolve_credentials(auth: PacsAuthConfig, env: Mapping[str, str] | None = None,
                        secret: str | Mapping[str, Any] | None = None) -> Credentials:
    """Read the secrets ``auth`` names.

    ``secret`` is the value of ``auth.secret_block`` when the task layer resolved it (Prefect
    Secret block): ``user:password`` for basic, the token for bearer, or the JSON forms
    :func:`secret_text` reads. Otherwise the environment
    variables named by ``auth`` are read. A missing one is a :class:`~medpipe.errors.ConfigError`
    naming the variable (never its value).

    >>> resolve_credentials(PacsAuthConfig(kind="bearer", token_env="T"), env={"T": "abc"}).token
    'abc'
    """
    env = os.environ if env is None else env
    if auth.kind == "none":
        return NO_CREDENTIALS
    if secret is not None:
        secret = secret_text(secret, auth.secret_block)
        if auth.kind == "bearer":
            return Credentials(kind="bearer", token=secret.strip())
        user, sep, password = secret.partition(":")
        if not sep:
            raise ConfigError(f"Secret block {auth.secret_block!r}: basic auth needs 'user:password'")
        return Credentials(kind="basic", username=user, password=password)
    if auth.secret_block:
        raise ConfigError(f"pacs.auth.secret_block {auth.secret_block!r} must be resolved by the caller "
                          "(the task layer reads Prefect Secret blocks)")

    def need(name: str) -> str:
        value = env.get(name)
        if not value:
            raise ConfigError(f"pacs.auth.kind is {auth.kind!r} but the environment variable {name} is not set")
        return value

    if auth.kind == "bearer":
        return Credentials(kind="bearer", token=need(auth.token_env))
    return Credentials(kind="basic", username=need(auth.username_env), password=need(auth.password_env))


def scrub(text: str, creds: Credentials | None) -> str:
    """``text`` with every secret of ``creds`` replaced by ``***`` (for error messages and logs)."""
    if creds is None:
        return text
    for s in creds.secrets():
        text = text.replace(s, "***")
    return text
