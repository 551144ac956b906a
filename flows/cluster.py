"""Which Dask cluster a run uses: a local one of worker processes, one per GPU, or an existing one.

Worker processes of a local cluster must not outlive the run: distributed's worker process
waits on its nanny's stop queue, and a SIGKILLed parent never sends the stop (the worker keeps
its own end of that pipe open, so it never sees EOF either). This module is therefore also a
worker preload (``dask_setup``): a daemon thread in each worker process ends the worker, and
any process it started, as soon as its parent process is gone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from prefect_dask import DaskTaskRunner

from medpipe.config import ClusterConfig

log = logging.getLogger("medpipe")

PRELOAD = __name__  # this module's dask_setup runs in every local worker process
PARENT_POLL_S = 0.5


def cluster_kind(cfg: ClusterConfig) -> str:
    return "address" if cfg.address else cfg.kind


def task_runner(cfg: ClusterConfig) -> DaskTaskRunner:
    """A DaskTaskRunner for the configured cluster.

    - ``local``: a ``distributed.LocalCluster`` of ``workers`` processes (one thread each by
      default: scipy.ndimage releases the GIL, but TensorFlow and Blosc bring threads of their own).
    - ``cuda``: dask-cuda's ``LocalCUDACluster``, one worker per visible GPU, an RMM pool of half
      of each card for CuPy, and a ``GPU=1`` resource per worker so that GPU stages never share a card.
    - ``address``: an existing scheduler (``dask scheduler`` + ``dask worker``/``dask cuda worker``).
    """
    kind = cluster_kind(cfg)
    if kind == "address":
        if not cfg.address:
            raise ValueError("cluster.kind is 'address' but no cluster.address (tcp://HOST:PORT) is set")
        return DaskTaskRunner(address=cfg.address)
    # Worker processes inherit the environment: keep TF quiet and each worker to its own cores.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    common: dict[str, Any] = {
        "preload": [PRELOAD],
        "threads_per_worker": cfg.threads_per_worker,
        "dashboard_address": "127.0.0.1:0" if cfg.dashboard else None,
    }
    if cfg.memory_limit != "auto":
        common["memory_limit"] = cfg.memory_limit
    if kind == "cuda":
        return DaskTaskRunner(
            cluster_class="dask_cuda.LocalCUDACluster",
            cluster_kwargs={**common, "rmm_pool_size": 0.5, "resources": {"GPU": 1}},
        )
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={**common, "n_workers": cfg.workers, "processes": True, "host": "127.0.0.1"},
    )


def gpu_annotations(cfg: ClusterConfig) -> dict[str, Any]:
    """Dask annotations for stages that use a GPU (only where workers declare the resource)."""
    return {"resources": {"GPU": 1}} if cluster_kind(cfg) == "cuda" else {}


# --------------------------------------------------------------------------- worker preload
def dask_setup(worker: Any) -> None:
    """Worker preload: end this worker process when the process that started it dies."""
    parent = os.getppid()
    thread = threading.Thread(target=_watch_parent, args=(parent,), name="medpipe parent watch",
                              daemon=True)
    thread.start()


def _watch_parent(parent: int, poll_s: float = PARENT_POLL_S) -> None:
    """Poll the parent pid; once this process is re-parented (the parent died), exit at once.

    A polling thread rather than ``PR_SET_PDEATHSIG``: the nanny starts worker processes from a
    helper thread, and the death signal would fire when that *thread* ends.
    """
    while os.getppid() == parent:
        time.sleep(poll_s)
    log.warning("worker process %d: parent process %d is gone, exiting", os.getpid(), parent)
    _kill_children()
    os._exit(1)  # nothing to hand back to: the scheduler lived in the dead parent


def _kill_children() -> None:
    """SIGKILL the processes this worker started (e.g. a process pool), so they are not orphaned in turn."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
