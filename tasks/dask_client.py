"""The Dask client that library code inside a Prefect task computes with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import distributed


@contextmanager
def cluster_client() -> Iterator[distributed.Client]:
    """Make the flow's Dask cluster the default scheduler for the code in this block.

    On a Dask worker (DaskTaskRunner), ``worker_client`` secedes this task's thread from the
    worker's pool while it waits, so that a task waiting on its own chunk computations never
    starves a one-thread worker. Elsewhere (thread-pool runner, tests) it falls back to
    prefect-dask's client for the flow's cluster.
    """
    try:
        distributed.get_worker()
    except ValueError:
        from prefect_dask import get_dask_client

        with get_dask_client() as client, client.as_current():
            yield client
        return
    with distributed.worker_client() as client, client.as_current():
        yield client
