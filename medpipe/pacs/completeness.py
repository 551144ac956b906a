"""When is a series complete enough to process? Rules, stated once.

A PACS never says "this series is finished". medpipe proves completeness with counts, in three steps:

1. **Settled before retrieval** (:func:`judge_series`, at planning). The series' instance count
   (NumberOfSeriesRelatedInstances from QIDO-RS or C-FIND) is compared with the last observation
   stored in the source state (count, and since when it has had that count):

   - same count for at least ``source.stable_age_s`` -> **stable**;
   - otherwise (count seen for the first time, changed since the last run, or unchanged for less
     than the stable age), the server's own stability flag decides where there is one (Orthanc's
     ``IsStable``, which turns true after Orthanc's ``StableAge`` without a new instance):
     true -> **stable**, false -> **growing** (the study is deferred);
   - with no such flag (DIMSE, other servers) -> **recheck**: the series is counted again
     ``source.recheck_wait_s`` after the first count, at retrieval time, while the other studies
     of the run proceed. The same count -> processed; another count -> the study is deferred as
     growing. So a new study is not deferred on its first night just because it is new, and a
     series that is still receiving instances is never taken silently: it either changes within
     the wait (deferred), or it was quiet for the wait and the counts after retrieval must still
     match (step 3).

2. **Listed** (at retrieval): the SOPInstanceUIDs the PACS lists for the series must number what
   its count said; a difference means the series moved between the two queries -> deferred.

3. **Arrived** (after retrieval): the distinct SOPInstanceUIDs in the files received must equal the
   listed ones; short (C-MOVE that "succeeded" with nothing, a cut stream) or different ->
   :class:`~medpipe.pacs.client.IncompleteStudy`, and the study is deferred.

A deferred study keeps its StudyInstanceUID in the source's pending list and is queried again by
every later run until it is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .state import Observation

Verdict = Literal["stable", "growing", "recheck"]


@dataclass(frozen=True)
class SeriesJudgement:
    verdict: Verdict
    reason: str


def judge_series(count: int, prev: Observation | None, cur: Observation, now: float, stable_age_s: float,
                 server_stable: Callable[[], bool | None]) -> SeriesJudgement:
    """Apply rule 1 of the module docstring to one series.

    ``prev``/``cur`` are the observations before and after recording ``count`` at ``now``;
    ``server_stable`` asks the server for its flag (called only when the counts cannot decide).

    >>> o = Observation(count=5, since=0.0, seen=0.0)
    >>> judge_series(5, o, o, now=120.0, stable_age_s=60, server_stable=lambda: None).verdict
    'stable'
    >>> new = Observation(count=5, since=120.0, seen=120.0)
    >>> judge_series(5, None, new, now=120.0, stable_age_s=60, server_stable=lambda: None).verdict
    'recheck'
    >>> judge_series(5, None, new, now=120.0, stable_age_s=60, server_stable=lambda: False).verdict
    'growing'
    """
    age = now - cur.since
    if prev is not None and prev.count == count and age >= stable_age_s:
        return SeriesJudgement("stable", f"{count} instance(s), unchanged for {age:.0f} s")
    flag = server_stable()
    if prev is None:
        why = "first seen"
    elif prev.count != count:
        why = f"count changed {prev.count} -> {count} since the last run"
    else:
        why = f"count unchanged for only {age:.0f} s (< stable_age_s {stable_age_s:g})"
    if flag is True:
        return SeriesJudgement("stable", f"{count} instance(s), {why}; the server reports it stable")
    if flag is False:
        return SeriesJudgement("growing", f"{why}; the server reports the series not stable yet")
    return SeriesJudgement("recheck", f"{why}; counted again before retrieval")
