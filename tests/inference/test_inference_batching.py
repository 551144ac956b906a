"""Model batches filled from several studies (medpipe.inference.batching) with real Keras models.

Results must equal per-study batching bit for bit: every ``predict`` call has the same batch
shape either way (padded to ``batch_size``), and a slice's output row depends only on that
slice (convolutions, pooling and dense layers work per sample), so only the rows' positions
in the batch change, not the arithmetic done on them.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import numpy as np
import pytest

from medpipe.errors import StudyError
from medpipe.inference import batching
from medpipe.inference.batching import Batcher
from medpipe.inference.model import load_model, resolve_model
from medpipe.inference.stage import infer_study

from inference_helpers import TINY, tiny_cfg, write_study


def _alone(predict, x: np.ndarray, bs: int) -> np.ndarray:
    """Per-request batching: ``x`` in padded batches of its own."""
    outs = []
    for a in range(0, len(x), bs):
        part = x[a: a + bs]
        pad = np.zeros((bs - len(part), *x.shape[1:]), x.dtype)
        outs.append(predict(np.concatenate([part, pad]))[: len(part)])
    return np.concatenate(outs)


def _concurrently(batcher: Batcher, requests: list[np.ndarray]) -> list[object]:
    """Each request from its own thread and session, all released at once; outputs or exceptions."""
    out: list[object] = [None] * len(requests)
    gate = threading.Barrier(len(requests))

    def one(i: int) -> None:
        with batcher.session() as s:
            gate.wait()
            try:
                out[i] = batcher.predict(requests[i], s)
            except Exception as exc:
                out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.fixture
def tiny(tiny_model):
    return load_model(resolve_model(tiny_cfg(tiny_model).model))


def test_rows_of_several_callers_equal_their_own_batches(tiny):
    rng = np.random.default_rng(0)
    requests = [rng.random((n, TINY, TINY, 1), dtype=np.float32) for n in (3, 7, 12, 1, 5)]
    b = Batcher(tiny.predict, batch_size=8, wait_s=1.0)
    outs = _concurrently(b, requests)
    for x, got in zip(requests, outs):
        assert np.array_equal(got, _alone(tiny.predict, x, 8))  # bit for bit
    st = b.stats()
    assert st["rows"] == 28 and st["calls"] == 4 and st["padded_rows"] == 4  # 28 rows in 4 calls, not 7
    assert st["mixed_calls"] >= 2


def test_a_bad_request_fails_alone(tiny):
    rng = np.random.default_rng(1)
    good = [rng.random((n, TINY, TINY, 1), dtype=np.float32) for n in (6, 9)]
    bad = rng.random((4, TINY, 5), dtype=np.float32)  # not slices of the model's input rank
    nan = np.full((2, TINY, TINY, 1), np.nan, np.float32)  # NaN rows: NaN out, nobody else's
    b = Batcher(tiny.predict, batch_size=8, wait_s=1.0)
    outs = _concurrently(b, [good[0], bad, nan, good[1]])
    assert np.array_equal(outs[0], _alone(tiny.predict, good[0], 8))
    assert np.array_equal(outs[3], _alone(tiny.predict, good[1], 8))
    assert isinstance(outs[1], Exception)
    assert np.isnan(outs[2]).all()


def test_one_caller_never_waits():
    import time

    b = Batcher(lambda x: x + 1, batch_size=64, wait_s=5.0)  # a wait would show as seconds
    t = time.monotonic()
    with b.session() as s:
        out = b.predict(np.zeros((3, 2), np.float32), s)
    # Two tasks of one study (one key): the idle one is not waited for either.
    with b.session("study-a") as s1, b.session("study-a"):
        b.predict(np.zeros((3, 2), np.float32), s1)
    assert time.monotonic() - t < 2.5
    assert out.shape == (3, 2) and (out == 1).all() and b.stats()["calls"] == 2


def test_a_partial_batch_waits_for_another_studys_rows():
    b = Batcher(lambda x: x + 1, batch_size=8, wait_s=5.0)
    outs = _concurrently(b, [np.zeros((3, 2), np.float32), np.ones((4, 2), np.float32)])
    assert (outs[0] == 1).all() and (outs[1] == 2).all()
    assert b.stats()["calls"] == 1 and b.stats()["mixed_calls"] == 1


def test_empty_request_is_an_error():
    b = Batcher(lambda x: x, batch_size=4)
    with pytest.raises(ValueError, match="at least one row"):
        b.predict(np.zeros((0, 2)))


def _infer_all(studies: list[Path], cfg, modality: str = "CT") -> list[object]:
    """infer_study of every study at once, one thread each (as a worker runs study tasks)."""
    def one(study: Path) -> object:
        try:
            res = infer_study(study, modality, cfg)
        except StudyError as exc:
            return exc
        res.pop("seconds")
        return res

    with dask.config.set(scheduler="synchronous"), ThreadPoolExecutor(len(studies)) as pool:
        return list(pool.map(one, studies))


def test_infer_study_batched_across_studies_equals_per_study(tmp_path, tiny_model):
    studies = [write_study(tmp_path, n_slices=n, seed=s) for s, n in enumerate((7, 16, 3, 23))]
    studies.append(write_study(tmp_path, n_slices=9, seed=9, nan_slices=(2, 5)))
    broken = write_study(tmp_path, n_slices=8, seed=10)  # bad input: an undecodable chunk
    chunks = [p for p in (broken / "image.zarr" / "0").rglob("c*") if p.is_file()]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"not a chunk")
    studies.append(broken)
    batching.clear_batchers()
    alone = _infer_all(studies, tiny_cfg(tiny_model, batch_size=8, batch_across_studies=False))
    batched = _infer_all(studies, tiny_cfg(tiny_model, batch_size=8, batch_wait_ms=200))
    for a, b in zip(alone[:-1], batched[:-1]):
        assert a == b  # scores, study score and label, flags, saliency: identical
    assert batched[4]["flags"] and batched[4]["slice_scores"][2] is None
    assert isinstance(batched[-1], StudyError) and "study-10" in str(batched[-1])
    stats = batching._BATCHERS[next(iter(batching._BATCHERS))].stats()
    assert stats["rows"] == 7 + 16 + 3 + 23 + 9 and stats["mixed_calls"] > 0


def test_whole_batches_run_in_the_callers_thread():
    seen: list[str] = []

    def predict(x: np.ndarray) -> np.ndarray:
        seen.append(threading.current_thread().name)
        return x * 3

    b = Batcher(predict, batch_size=4, wait_s=0.0, name="t")
    out = b.predict(np.arange(10, dtype=np.float32)[:, None])
    assert out.ravel().tolist() == [3.0 * i for i in range(10)]
    me = threading.current_thread().name
    assert seen == [me, me, "medpipe-batch-t"]  # 2 whole batches here, the last 2 rows padded there


def test_segmentation_masks_batched_across_studies_equal_per_study(tmp_path, tiny_segmenter):
    from medpipe import omezarr

    studies = [write_study(tmp_path, n_slices=n, seed=s) for s, n in enumerate((5, 11, 6))]
    fields = {"output": "segmentation", "labels": ["background", "dense"], "batch_size": 8, "saliency_slices": 1}

    def masks() -> list[np.ndarray]:
        return [omezarr.read_labels(s / "image.zarr", "model").compute() for s in studies]

    alone = _infer_all(studies, tiny_cfg(tiny_segmenter, **fields, batch_across_studies=False))
    alone_masks = masks()
    batching.clear_batchers()
    batched = _infer_all(studies, tiny_cfg(tiny_segmenter, **fields, batch_wait_ms=200))
    assert alone == batched
    assert next(iter(batching._BATCHERS.values())).stats()["mixed_calls"] > 0
    for a, b in zip(alone_masks, masks()):
        assert np.array_equal(a, b) and a.any()


def test_batching_settings_do_not_redo_studies():
    """They change how batches are packed, not the outputs: the configuration fingerprint ignores them."""
    from medpipe.config import Config

    base = Config().fingerprint()
    assert Config.model_validate({"model": {"batch_across_studies": False, "batch_wait_ms": 50}}).fingerprint() == base
    named = Config.model_validate({"models": [{"name": "a"}]}).fingerprint()
    assert Config.model_validate({"models": [{"name": "a", "batch_wait_ms": 9}]}).fingerprint() == named
