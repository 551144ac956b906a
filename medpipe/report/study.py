"""Write one study's report files: report.json, report.html, seg.dcm, sr.dcm."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .. import atomic
from .dicom import write_dicom_outputs
from .html import render_study_html
from .record import jsonable
from .schema import validate_report

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)


def write_study_report(study_dir: Path, record: dict, cfg: "Config",
                       source_files: list[str] | None = None) -> dict[str, str]:
    """Validate ``record`` and write the study's report files into ``study_dir``.

    Parameters
    ----------
    study_dir : Path
        The study folder (holds ``image.zarr`` and ``saliency/``).
    record : dict
        From :func:`assemble_record`.
    cfg : Config
        ``cfg.report`` says which files to write and whether SEG/SR carry patient identity.
    source_files : list of str, optional
        The DICOM files of the series used; needed for SEG and SR (they reference them).

    Returns
    -------
    dict
        Kind (``json``, ``html``, ``seg``, ``sr``) to file name relative to ``study_dir``.
        A SEG or SR that cannot be made is never an exception: ``record["objects"]`` says why
        (and a failure to make one is also a warning).

    Raises
    ------
    ValueError
        When ``record`` does not follow the report schema.
    """
    study_dir = Path(study_dir)
    record = jsonable(copy.deepcopy(record))
    validate_report(record)
    study_dir.mkdir(parents=True, exist_ok=True)
    rc = cfg.report
    written: dict[str, str] = {}

    objects, problems = write_dicom_outputs(study_dir, record, cfg, source_files)
    written.update({o["object"]: o["file"] for o in objects if o["made"]})
    record["objects"] = objects
    for p in problems:
        log.warning("study %s: %s", record["study_key"], p)
        record["warnings"].append(p)

    if rc.html:
        written["html"] = "report.html"
    written["json"] = "report.json"
    record["outputs"] = dict(sorted(written.items()))
    validate_report(record)
    if rc.html:
        atomic.write_text(study_dir / "report.html", render_study_html(record, study_dir=study_dir))
    atomic.write_json(study_dir / "report.json", record)
    return record["outputs"]
