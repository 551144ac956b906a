"""One-way keys for DICOM UIDs, so that no identifier reaches a path, a report or a log."""

from __future__ import annotations

import hashlib

DEFAULT_SALT = "medpipe"


def uid_key(uid: str, salt: str = DEFAULT_SALT, length: int = 16) -> str:
    """Return a stable, one-way hex key for a DICOM UID.

    >>> uid_key("1.2.3") == uid_key("1.2.3")
    True
    >>> len(uid_key("1.2.3"))
    16
    """
    digest = hashlib.sha256(f"{salt}\x00{uid.strip()}".encode()).hexdigest()
    return digest[:length]


def study_key(study_uid: str, salt: str = DEFAULT_SALT) -> str:
    """The folder name of a study under ``OUT/studies/``: a hash of its StudyInstanceUID."""
    return uid_key(study_uid, salt)
