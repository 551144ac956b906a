"""A study's input series on a PACS: what it holds less the series medpipe itself sent there.

A destination may be the source too: the SEG, SR and report image medpipe sends land in the
study they describe. Counting them as inputs would change the study's fingerprint (its series and
instance counts), so the study would be redone and its results sent again every night.
:class:`InputsOnly` wraps a client so that planning and retrieval never see them.

>>> from medpipe.pacs.client import RemoteSeries
>>> is_own_series(RemoteSeries("1.2.3", modality="SEG", number=900))
True
>>> is_own_series(RemoteSeries("1.2.4", modality="CT", number=2, description="Chest 1.0"))
False
"""

from __future__ import annotations

from typing import Any

from .client import PacsClient, RemoteSeries

#: Modalities of the objects medpipe makes (SEG, SR, and the report as Secondary Capture / other).
_MADE_MODALITIES = ("SEG", "SR", "OT", "SC")


def is_own_series(series: RemoteSeries) -> bool:
    """Whether ``series`` is one medpipe sent (a result, not an input): one of medpipe's series
    numbers with the modality of an object it makes, or a description that starts "medpipe"."""
    # report.dicom pulls in zarr and highdicom's users: imported only when a series is judged
    from ..report.dicom import SERIES_NUMBERS

    made = series.number in SERIES_NUMBERS.values() and (series.modality or "").upper() in _MADE_MODALITIES
    return made or (series.description or "").lower().startswith("medpipe")


class InputsOnly:
    """A :class:`~medpipe.pacs.client.PacsClient` whose ``find_series`` leaves out
    :func:`is_own_series` (everything else is the wrapped client's). Closes the wrapped client
    when used as a context manager.

    Example (a sketch)::

        with InputsOnly(open_client(url, cfg.pacs, creds)) as client:
            plan = plan_pacs(client, cfg, out)
    """

    def __init__(self, client: PacsClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def find_series(self, study_uid: str) -> list[RemoteSeries]:
        return [s for s in self._client.find_series(study_uid) if not is_own_series(s)]

    def __enter__(self) -> InputsOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()
