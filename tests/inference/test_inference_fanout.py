"""Fan-out over a real distributed LocalCluster: batches spread, the model loads once per worker."""

from __future__ import annotations

import numpy as np
import pytest

from medpipe.inference.model import load_count
from medpipe.inference.stage import infer_study

from inference_helpers import tiny_cfg, write_study

distributed = pytest.importorskip("distributed")


def test_model_loads_once_per_worker_process(tmp_path, tiny_model):
    studies = [write_study(tmp_path, n_slices=24, seed=s) for s in (1, 2)]
    cfg = tiny_cfg(tiny_model, batch_size=3, saliency_slices=1)  # 8 batch tasks per study
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", worker_dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        with distributed.get_task_stream(client) as stream:
            results = [infer_study(s, "CT", cfg) for s in studies]
        per_worker = client.run(load_count)
    batch_tasks = [t for t in stream.data if "predict_batches" in str(t["key"])]
    loads = [counts.get(str(tiny_model), 0) for counts in per_worker.values()]
    assert sorted(loads) == [1, 1], per_worker  # once per worker process, never once per task
    # 8 batches per study in runs of 4 (one per worker thread), pipelined inside each task
    assert len(batch_tasks) == 4 and len({t["worker"] for t in batch_tasks}) == 2
    for res in results:
        assert len(res["slice_scores"]) == 24 and np.isfinite(res["slice_scores"]).all()
        assert len(res["saliency"]) == 1
