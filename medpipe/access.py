"""Where a run may write: output folders are confined to configured roots.

A run's ``out`` can come from a flow-run parameter that anyone with access to the Prefect API
or UI can edit, and the run writes there with the rights of the serving process. Two bounds
apply, and an output folder must lie inside both (each one empty means "no bound"):

- ``run.allowed_out_roots`` of the run's configuration;
- ``MEDPIPE_ALLOWED_OUT_ROOTS`` (``os.pathsep``-separated) in the environment of the process
  that executes the run. ``medpipe serve`` sets it to its ``--out`` folder (and any
  ``--allow-out-root``); a run's parameters cannot change it, so they can only narrow it.

Paths are compared after resolving symlinks and ``..``, so neither leads out of a root.

>>> from pathlib import Path
>>> check_out_folder("/data/out/night", [Path("/data/out")], environ={})
PosixPath('/data/out/night')
>>> check_out_folder("/etc", [Path("/data/out")], environ={})
Traceback (most recent call last):
...
medpipe.access.OutFolderNotAllowed: /etc: output folder outside the allowed roots (/data/out)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import MedpipeError

ENV_ROOTS = "MEDPIPE_ALLOWED_OUT_ROOTS"


class OutFolderNotAllowed(MedpipeError, PermissionError):
    """A run asked to write into a folder outside the allowed output roots."""

    def __init__(self, out: str | Path, roots: Iterable[Path]):
        self.out = str(out)
        self.roots = [str(r) for r in roots]
        super().__init__(f"{self.out}: output folder outside the allowed roots ({', '.join(self.roots)})")

    def __reduce__(self):  # pickled into Prefect's result of a failed run: rebuild from both fields
        return (type(self), (self.out, [Path(r) for r in self.roots]))


def env_roots(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The roots named by ``MEDPIPE_ALLOWED_OUT_ROOTS`` (empty when unset)."""
    value = (os.environ if environ is None else environ).get(ENV_ROOTS, "")
    return [Path(p) for p in value.split(os.pathsep) if p.strip()]


def roots_env_value(roots: Iterable[str | Path]) -> str:
    """The ``MEDPIPE_ALLOWED_OUT_ROOTS`` value for ``roots`` (resolved, so a later chdir changes nothing)."""
    return os.pathsep.join(str(Path(r).expanduser().resolve()) for r in roots)


def is_inside(path: Path, roots: Iterable[Path]) -> bool:
    """Whether resolved ``path`` is one of ``roots`` or lies below one (symlinks resolved)."""
    real = Path(path).expanduser().resolve()
    return any(real.is_relative_to(Path(r).expanduser().resolve()) for r in roots)


def check_out_folder(out: str | Path, configured: Iterable[Path] = (),
                     environ: Mapping[str, str] | None = None) -> Path:
    """Return ``out`` resolved, or raise :class:`OutFolderNotAllowed` if a bound excludes it.

    Parameters
    ----------
    out : str or Path
        The output folder a run asks for.
    configured : iterable of Path
        ``run.allowed_out_roots`` of the run's configuration (empty: no bound from it).
    environ : mapping, optional
        Where ``MEDPIPE_ALLOWED_OUT_ROOTS`` is read (default ``os.environ``).

    Returns
    -------
    Path
        ``out`` with symlinks and ``..`` resolved.
    """
    real = Path(out).expanduser().resolve()
    for roots in (env_roots(environ), list(configured)):
        if roots and not is_inside(real, roots):
            raise OutFolderNotAllowed(out, roots)
    return real
