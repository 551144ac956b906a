"""Imported by each worker process of a run's local cluster as it starts (Dask's ``preload``).

A worker that imports the stages' modules while the run starts (beside the Prefect server and
the discovery) spares the first study their import. Imports go through
:func:`tasks.study.library`, one at a time per process; one that fails is only logged here:
the task that needs the module then fails with its own error, in its study's entry.

When the worker closes, its process is set to end at once at interpreter exit: TensorFlow's
exit handlers hold a worker that ran inference for seconds, until its nanny kills it, and every
result is already on disk by then.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys

log = logging.getLogger("medpipe")

def preload() -> list[str]:
    """Import the study task's modules (:data:`tasks.study.STUDY_MODULES`); return those that
    failed (each logged with its reason)."""
    try:
        from tasks.study import STUDY_MODULES, library
    except Exception as exc:  # noqa: BLE001 - a worker must start anyway
        log.warning("worker preload: tasks.study: %s", exc)
        return ["tasks.study"]
    failed = []
    for name in STUDY_MODULES:
        try:
            library(name)
        except Exception as exc:  # noqa: BLE001
            log.warning("worker preload: %s: %s", name, exc)
            failed.append(name)
    return failed


async def dask_teardown(worker: object) -> None:
    """Distributed calls this as the worker closes: end the process at once when it exits.

    Registered now, after any library's exit handlers, so it runs first (atexit is last in,
    first out). The task runs' logs and events this process still holds are sent first.
    """
    from flows.server import flush_prefect_logs

    # On a thread: called from the worker's event loop, Prefect's drain would only return a coroutine.
    await asyncio.to_thread(flush_prefect_logs, 5)
    atexit.register(_exit_now)


def _exit_now() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not keep the process
            pass
    os._exit(0)


preload()
