"""The errors medpipe raises. Every message names the file or study and the reason."""

from __future__ import annotations

from pathlib import Path


class MedpipeError(Exception):
    """Base class of medpipe's own errors."""


class ConfigError(MedpipeError, ValueError):
    """The configuration is invalid (bad file, unknown operator, impossible values)."""


class InputError(MedpipeError):
    """A file of the archive cannot be used.

    >>> str(InputError("/a/b.dcm", "truncated pixel data"))
    '/a/b.dcm: truncated pixel data'
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class StudyError(MedpipeError):
    """A study cannot be processed; ``study_key`` names it (never a patient identifier)."""

    def __init__(self, study_key: str, reason: str):
        self.study_key = study_key
        self.reason = reason
        super().__init__(f"study {study_key}: {reason}")


class ModelError(MedpipeError):
    """The inference model is missing, corrupt or does not fit the configured input."""
