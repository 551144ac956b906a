"""Which Dask cluster a run uses: a local one of worker processes, one per GPU, or an existing one.

Worker processes of a local cluster end with the run, even a SIGKILLed one, without help from
us: distributed starts each worker with a pipe whose other end only the parent holds, and a
thread in the worker exits the process at once when that pipe closes
(``distributed/process.py``, ``AsyncProcess._immediate_exit_when_closed``; about 0.1 s after
the parent dies, checked by ``tests/faults/test_orphans.py``). So stages must not start
processes of their own inside a worker: that exit would orphan them.

The process that runs the flow is tied the same way to a ``medpipe serve`` that started it
(:func:`flows.server.exit_with_parent`, armed here because every run asks for its cluster first).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect_dask import DaskTaskRunner

from medpipe.config import ClusterConfig

from .server import exit_with_parent


def cluster_kind(cfg: ClusterConfig) -> str:
    return "address" if cfg.address else cfg.kind


log = logging.getLogger("medpipe")

# Closing a cluster whose workers were lost and restarted can wait on a worker that is gone.
CLOSE_TIMEOUT_S = 20.0

# Imported by every local worker process as it starts (distributed's ``preload``): the stages'
# modules load while the run starts (beside the Prefect server), not in the first study.
WORKER_PRELOAD = "flows.worker_preload"


def local_cluster_spec(cfg: ClusterConfig) -> tuple[str, dict[str, Any]] | None:
    """The class and keyword arguments of the cluster a run starts itself (None for ``address``).

    - ``local``: a ``distributed.LocalCluster`` of ``workers`` processes (one thread each by
      default: scipy.ndimage releases the GIL, but TensorFlow and Blosc bring threads of their own).
    - ``cuda``: dask-cuda's ``LocalCUDACluster``, one worker per visible GPU, an RMM pool of half
      of each card for CuPy, and a ``GPU=1`` resource per worker so that GPU stages never share a card.
    """
    kind = cluster_kind(cfg)
    if kind == "address":
        return None
    # Worker processes inherit the environment: keep TF quiet and each worker to its own cores.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    common: dict[str, Any] = {
        "threads_per_worker": cfg.threads_per_worker,
        "dashboard_address": "127.0.0.1:0" if cfg.dashboard else None,
        "preload": [WORKER_PRELOAD],
    }
    if cfg.memory_limit != "auto":
        common["memory_limit"] = cfg.memory_limit
    if kind == "cuda":
        return "dask_cuda.LocalCUDACluster", {**common, "rmm_pool_size": 0.5, "resources": {"GPU": 1}}
    return "distributed.LocalCluster", {**common, "n_workers": cfg.workers, "processes": True, "host": "127.0.0.1"}


@contextmanager
def started_cluster(cfg: ClusterConfig) -> Iterator[str | None]:
    """Start the cluster of :func:`local_cluster_spec`; yield its scheduler's address; close it on exit.

    ``medpipe run`` starts it while its Prefect server starts, and gives the flow the address.
    Yields None for ``address`` (the flow connects to that scheduler itself).

    >>> with started_cluster(cfg.cluster) as address:   # doctest: +SKIP
    ...     process_archive(archive, out, dask_address=address)
    """
    spec = local_cluster_spec(cfg)
    if spec is None:
        yield None
        return
    path, kwargs = spec
    module, _, name = path.rpartition(".")
    cluster = getattr(importlib.import_module(module), name)(**kwargs)
    try:
        yield cluster.scheduler_address
    finally:
        try:
            cluster.close(timeout=CLOSE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the run's results are written; its workers end with it
            log.warning("Dask cluster did not close cleanly (%s: %s); its workers end with this process",
                        type(exc).__name__, exc)


def task_runner(cfg: ClusterConfig) -> DaskTaskRunner:
    """A DaskTaskRunner for the configured cluster: the one of :func:`local_cluster_spec`, started
    with the flow, or for ``address`` an existing scheduler (``dask scheduler`` + ``dask
    worker``/``dask cuda worker``)."""
    exit_with_parent()  # a run served by `medpipe serve` ends with it, and so does its cluster
    spec = local_cluster_spec(cfg)
    if spec is None:
        if not cfg.address:
            raise ValueError("cluster.kind is 'address' but no cluster.address (tcp://HOST:PORT) is set")
        return DaskTaskRunner(address=cfg.address)
    cluster_class, cluster_kwargs = spec
    return DaskTaskRunner(cluster_class=cluster_class, cluster_kwargs=cluster_kwargs)


def gpu_annotations(cfg: ClusterConfig) -> dict[str, Any]:
    """Dask annotations for stages that use a GPU (only where workers declare the resource)."""
    return {"resources": {"GPU": 1}} if cluster_kind(cfg) == "cuda" else {}
