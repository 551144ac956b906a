"""Model batches filled from several studies: one batching thread per loaded model and process.

A worker process running several small studies at once (threads of one Dask worker) would
otherwise call ``predict`` once per study batch, each padded to the model batch: a 64-slice
study in a 128-slice batch computes half padding, and an accelerator waits between the many
small calls. Here every caller in the process submits its preprocessed slices to the
:class:`Batcher` of its model; the batcher's thread packs rows from all waiting requests, in
arrival order, into batches of ``batch_size`` (a request may be split over two batches), calls
``predict`` once per batch and hands each request its own output rows. A caller's whole
batches need no filling: they are predicted in its own thread, as without the batcher.

Batching is per process: Dask worker processes each hold their own model and batcher, and no
rows cross processes (sending slices between processes would cost more than the padding saved).

When a batch is not full the thread waits at most ``wait_s`` for more rows, and only while a
caller that has no request queued is still active (a :meth:`Batcher.session` is open): one
study alone never waits, and neither do studies that all have their rows queued already.

>>> import numpy as np
>>> b = Batcher(lambda x: x * 2, batch_size=4, wait_s=0.0)
>>> b.predict(np.arange(6, dtype=np.float32)[:, None]).ravel().tolist()  # 4 rows, then 2 padded to 4
[0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
>>> b.stats()["calls"], b.stats()["padded_rows"]
(2, 2)
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Batcher", "batcher_for", "clear_batchers"]


@dataclass(eq=False)
class _Request:
    rows: np.ndarray
    session: object | None
    future: Future = field(default_factory=Future)
    taken: int = 0  # rows already placed in a batch
    parts: list[np.ndarray] = field(default_factory=list)
    done: int = 0  # rows whose output came back
    failed: bool = False


class Batcher:
    """Packs rows from concurrent callers into full ``predict`` batches of one model.

    Parameters
    ----------
    predict : callable
        ``predict(batch) -> outputs`` with one output row per input row; always called with
        exactly ``batch_size`` rows (zero rows pad a batch that is not full): from the batching
        thread, and from callers' threads for their whole batches (see :meth:`predict`).
    batch_size : int
        Rows per ``predict`` call.
    wait_s : float
        Longest wait for more rows when a batch is not full and another caller may add some.
    name : str
        Names the batching thread.
    """

    def __init__(self, predict: Callable[[np.ndarray], Any], batch_size: int, wait_s: float = 0.005,
                 name: str = "model"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self._predict = predict
        self.batch_size = int(batch_size)
        self.wait_s = max(0.0, float(wait_s))
        self.name = name
        self.pid = os.getpid()
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._sessions: Counter[object] = Counter()
        self._thread: threading.Thread | None = None
        self._calls = self._rows = self._padded = self._mixed = 0

    # ------------------------------------------------------------------ callers' side

    @contextmanager
    def session(self, key: object | None = None) -> Iterator[object]:
        """Mark the calling task as active while it has more rows to submit.

        While a session is open and has no request queued, a batch that is not full waits
        (at most ``wait_s``) for its rows; pass the yielded token to :meth:`submit`. Tasks of
        one study share its ``key`` (e.g. the image path): a study whose rows are queued from
        one task is not waited for because another of its tasks is still reading.
        """
        token = object() if key is None else key
        with self._cond:
            self._sessions[token] += 1
        try:
            yield token
        finally:
            with self._cond:
                self._sessions[token] -= 1
                if self._sessions[token] <= 0:
                    del self._sessions[token]
                self._cond.notify_all()  # a batch waiting for this session's rows can go now

    def submit(self, rows: np.ndarray, session: object | None = None) -> Future:
        """Queue ``rows`` (first axis: one row per slice); the future gives their output rows."""
        rows = np.asarray(rows)
        req = _Request(rows, session)
        if rows.ndim == 0 or rows.shape[0] == 0:
            req.future.set_exception(ValueError(f"batcher {self.name}: a request needs at least one row, "
                                                f"got shape {rows.shape}"))
            return req.future
        with self._cond:
            self._queue.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"medpipe-batch-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return req.future

    def predict(self, rows: np.ndarray, session: object | None = None) -> np.ndarray:
        """The output rows of ``rows``, predicted in batches shared with other callers.

        Whole batches of ``rows`` are predicted at once in the calling thread (nothing to fill,
        and several callers' full batches keep running side by side as before); only the rest
        goes through the batching thread.
        """
        rows = np.asarray(rows)
        n = rows.shape[0] if rows.ndim else 0
        full = n - n % self.batch_size
        outs = [self._call([rows[a: a + self.batch_size]]) for a in range(0, full, self.batch_size)]
        if full < n or n == 0:  # an empty request fails in submit
            outs.append(self.submit(rows[full:] if rows.ndim else rows, session).result())
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def stats(self) -> dict[str, int]:
        """``calls`` to predict, real ``rows``, ``padded_rows`` and ``mixed_calls`` (rows of 2+ requests)."""
        with self._cond:
            return {"calls": self._calls, "rows": self._rows, "padded_rows": self._padded,
                    "mixed_calls": self._mixed}

    # ------------------------------------------------------------------ the batching thread

    def _queued_rows(self) -> int:
        return sum(r.rows.shape[0] - r.taken for r in self._queue)

    def _more_may_come(self) -> bool:
        """Whether an open session has no request queued (it may be preparing rows now)."""
        waiting = {r.session for r in self._queue}
        return any(s not in waiting for s in self._sessions)

    def _take(self) -> list[tuple[_Request, int, int]]:
        """Up to ``batch_size`` rows from the head of the queue: (request, start, stop) parts.

        Only requests whose rows have the head's row shape and dtype join it; a request that
        differs (a bad input) gets a batch of its own later and fails alone.
        """
        head = self._queue[0].rows
        parts, room = [], self.batch_size
        for req in list(self._queue):
            if room == 0:
                break
            if req.rows.shape[1:] != head.shape[1:] or req.rows.dtype != head.dtype:
                continue
            n = min(room, req.rows.shape[0] - req.taken)
            parts.append((req, req.taken, req.taken + n))
            req.taken += n
            room -= n
            if req.taken == req.rows.shape[0]:
                self._queue.remove(req)
        return parts

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                deadline = time.monotonic() + self.wait_s
                while self._queued_rows() < self.batch_size and self._more_may_come():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                parts = self._take()
            try:
                self._run_batch(parts)
            except BaseException as exc:  # never let the thread die with callers waiting on it
                for req, _, _ in parts:
                    self._fail(req, exc)

    def _run_batch(self, parts: list[tuple[_Request, int, int]]) -> None:
        try:
            out = self._call([req.rows[a:b] for req, a, b in parts])
        except BaseException as exc:
            if len({id(req) for req, _, _ in parts}) == 1:
                self._fail(parts[0][0], exc)
                return
            # One request's rows may be what breaks the batch: run each alone, so only it fails.
            for part in parts:
                self._run_batch([part])
            return
        offset = 0
        for req, a, b in parts:
            self._deliver(req, a, out[offset: offset + b - a])
            offset += b - a

    def _call(self, chunks: list[np.ndarray]) -> np.ndarray:
        n = sum(c.shape[0] for c in chunks)
        pad = self.batch_size - n
        if pad:  # one batch shape: every call reuses one compiled graph
            chunks = [*chunks, np.zeros((pad, *chunks[0].shape[1:]), chunks[0].dtype)]
        batch = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        out = np.asarray(self._predict(batch))
        if out.shape[:1] != (self.batch_size,):
            raise ValueError(f"batcher {self.name}: predict returned {out.shape[:1]} rows for {self.batch_size}")
        with self._cond:
            self._calls += 1
            self._rows += n
            self._padded += pad
            self._mixed += len(chunks) - (1 if pad else 0) > 1
        return out[:n]

    def _deliver(self, req: _Request, start: int, out: np.ndarray) -> None:
        if req.failed:
            return
        req.parts.append((start, out))  # type: ignore[arg-type]
        req.done += out.shape[0]
        if req.done == req.rows.shape[0]:
            pieces = [o for _, o in sorted(req.parts, key=lambda p: p[0])]  # type: ignore[index]
            req.future.set_result(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))

    def _fail(self, req: _Request, exc: BaseException) -> None:
        if not req.failed and not req.future.done():
            req.failed = True
            req.future.set_exception(exc)
        with self._cond:  # rows of it still queued are not worth predicting
            if req in self._queue:
                self._queue.remove(req)


_BATCHERS: dict[tuple, Batcher] = {}
_LOCK = threading.Lock()


def batcher_for(key: tuple, model: Any, batch_size: int, wait_s: float, name: str = "model") -> Batcher:
    """The process's batcher of ``model`` (an object with ``predict``) at ``batch_size``.

    ``key`` identifies the model (e.g. its path and SHA-256); a model object loaded anew
    (after :func:`medpipe.inference.model.clear_cache`) or a forked process gets a new batcher.
    """
    full = (*key, int(batch_size))
    with _LOCK:
        b = _BATCHERS.get(full)
        if b is None or b.pid != os.getpid() or getattr(b, "model", None) is not model:
            b = Batcher(model.predict, batch_size, wait_s, name)
            b.model = model  # type: ignore[attr-defined]
            _BATCHERS[full] = b
        b.wait_s = max(0.0, float(wait_s))  # the latest configuration wins
        return b


def clear_batchers() -> None:
    """Forget this process's batchers (tests); their idle threads stay parked."""
    with _LOCK:
        _BATCHERS.clear()
