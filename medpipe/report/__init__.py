"""Study reports (report.json, report.html, DICOM SEG and SR) and run summaries.

>>> from medpipe.report import assemble_record, validate_report
>>> doc = assemble_record("k1", {}, {}, {"run_id": "r"}, error="ingest: no images")
>>> validate_report(doc)
"""

from .record import assemble_record, jsonable, key_findings
from .run import run_markdown, run_table, write_run_html
from .schema import SCHEMA_VERSION, report_schema, validate_report
from .study import write_study_report

__all__ = [
    "SCHEMA_VERSION", "assemble_record", "jsonable", "key_findings", "report_schema", "run_markdown",
    "run_table", "validate_report", "write_run_html", "write_study_report",
]
