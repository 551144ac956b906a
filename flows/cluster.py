"""Which Dask cluster a run uses: a local one of worker processes, one per GPU, or an existing one."""

from __future__ import annotations

import os
from typing import Any

from prefect_dask import DaskTaskRunner

from medpipe.config import ClusterConfig


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
