"""Over a real distributed LocalCluster: a study's batches run where the study runs, or, fanned
out, spread over the workers with the model loaded once per worker."""

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
            results = [infer_study(s, "CT", cfg, fan_out=True) for s in studies]
        per_worker = client.run(load_count)
    batch_tasks = [t for t in stream.data if "predict_batches" in str(t["key"])]
    loads = [counts.get(str(tiny_model), 0) for counts in per_worker.values()]
    assert sorted(loads) == [1, 1], per_worker  # once per worker process, never once per task
    # 8 batches per study in runs of 4 (one per worker thread), pipelined inside each task
    assert len(batch_tasks) == 4 and len({t["worker"] for t in batch_tasks}) == 2
    for res in results:
        assert len(res["slice_scores"]) == 24 and np.isfinite(res["slice_scores"]).all()
        assert len(res["saliency"]) == 1


def test_a_study_runs_in_the_process_that_runs_it(tmp_path, tiny_model):
    """By default a study of fewer than FAN_OUT_MIN_BATCHES batches never loads the model on other
    workers (each load costs a process seconds of CPU): no batch or saliency task is submitted."""
    from medpipe.inference.stage import FAN_OUT_MIN_BATCHES

    study = write_study(tmp_path, n_slices=24, seed=3)
    cfg = tiny_cfg(tiny_model, batch_size=3, saliency_slices=2)
    assert 24 // 3 < FAN_OUT_MIN_BATCHES
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", worker_dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        with distributed.get_task_stream(client) as stream:
            res = infer_study(study, "CT", cfg)
        per_worker = client.run(load_count)
    assert stream.data == [] and all(str(tiny_model) not in c for c in per_worker.values())
    assert load_count()[str(tiny_model)] == 1  # here, once
    fanned = infer_study(study, "CT", cfg, fan_out=False)
    assert res["slice_scores"] == fanned["slice_scores"] and len(res["saliency"]) == 2
