"""Render report.html and run.html with Jinja2 (autoescaped: DICOM strings are shown as text)."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup

from .figures import StudyFigures, score_chart_svg, study_figures
from .record import key_findings


def _num(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:,.{digits}f}"


def _vec(values: Any, digits: int = 2) -> str:
    return ", ".join(_num(v, digits) for v in values or [])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return _num(value, 3 if abs(value) < 10 else 1)
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_cell(v) for v in value) + ")"
    if isinstance(value, dict):
        if "op" in value:
            params = ", ".join(f"{k}={_cell(v)}" for k, v in (value.get("params") or {}).items())
            return f"{value['op']}({params})"
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    return "–" if value is None else str(value)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The Jinja2 environment of the report templates, autoescaping everything."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("medpipe.report", "templates"),
        autoescape=True,  # every template, whatever its extension
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=_num, vec=_vec, cell=_cell)
    return env


def render_study_html(record: dict[str, Any], figures: StudyFigures | None = None,
                      study_dir: str | Path | None = None) -> str:
    """The text of report.html for ``record`` (pictures from ``study_dir`` when not given)."""
    if figures is None:
        figures = study_figures(study_dir, record) if study_dir is not None else StudyFigures()
    seg = record.get("segmentation")
    cands = (seg or {}).get("lesion_candidates") or []
    cand_cols: list[str] = []
    for c in cands:
        for k in c:
            if k not in cand_cols and k not in ("label",):
                cand_cols.append(k)
    num_cols = {k for k in cand_cols if all(isinstance(c.get(k), (int, float)) or c.get(k) is None for c in cands)}
    model = record.get("model")
    scores = ((model or {}).get("outputs") or {}).get("slice_scores") or []
    return environment().get_template("study.html.j2").render(
        r=record,
        used=record["series"].get("used"),
        seg=seg,
        model=model,
        models=record.get("models") or [],
        figs=figures,
        colors={item["value"]: item["color"] for item in figures.legend},
        cand_cols=cand_cols[:8],
        num_cols=num_cols,
        chart=Markup(score_chart_svg(scores)) if scores else "",
        findings=key_findings(record),
        # per-model times (infer:<name>) are inside `infer`, the stage's wall time
        total_seconds=sum(v for k, v in record.get("timings", {}).items() if not k.startswith("infer:")),
        config_json=json.dumps(record["provenance"].get("config") or {}, indent=2, sort_keys=True),
    )


def report_href(output: str | None) -> str | None:
    """Relative link to a study's report.html from run.html (``None`` for absolute or escaping paths)."""
    if not output:
        return None
    p = Path(output)
    if p.is_absolute() or ".." in p.parts:
        return None
    return quote(p.as_posix().rstrip("/") + "/report.html")


def render_run_html(run: dict[str, Any]) -> str:
    studies = [dict(s, href=report_href(s.get("output"))) for s in run.get("studies") or []]
    counts = {"ok": 0, "failed": 0, "skipped": 0, **(run.get("counts") or {})}
    return environment().get_template("run.html.j2").render(
        run=run, studies=studies, counts=counts,
        parameters_json=json.dumps(run.get("parameters") or {}, indent=2, sort_keys=True, default=str),
    )
