"""PACS query/retrieve and send: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and DIMSE (C-FIND, C-GET, C-MOVE, C-STORE).

The library never imports Prefect. Addresses: :mod:`medpipe.pacs.address`; credentials:
:mod:`medpipe.pacs.auth`; clients: :func:`medpipe.pacs.client.open_client`; planning a night from a
PACS: :func:`medpipe.pacs.plan.plan_pacs`; retrieval of one study and the plan to ingest it:
:func:`medpipe.pacs.retrieve.fetch_and_plan`; what a run sends back: :mod:`medpipe.pacs.send`
(series medpipe sent are not inputs: :mod:`medpipe.pacs.inputs`).
"""

from .address import PacsAddress
from .auth import Credentials, resolve_credentials, scrub
from .client import (
    IncompleteStudy,
    NoWatermark,
    PacsAuthError,
    PacsClient,
    PacsError,
    PacsUnavailable,
    RemoteSeries,
    RemoteStudy,
    StoreResult,
    StudyQuery,
    open_client,
)

__all__ = [
    "Credentials", "IncompleteStudy", "NoWatermark", "PacsAddress", "PacsAuthError", "PacsClient",
    "PacsError", "PacsUnavailable", "RemoteSeries", "RemoteStudy", "StoreResult", "StudyQuery",
    "open_client", "resolve_credentials", "scrub",
]
