"""Run summaries: ``OUT/run.html`` and the markdown and table that the flow publishes as
Prefect artifacts (plain functions here: the library never imports Prefect)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from .. import atomic
from .html import _num, render_run_html, report_href


def write_run_html(out_dir: str | Path, run: dict[str, Any]) -> Path:
    """Write ``out_dir/run.html``: one table of the run's studies with links to their reports.

    Parameters
    ----------
    out_dir : path
        The run's output folder (where ``run.json`` is).
    run : dict
        The run record (``run_id``, ``started``, ``finished``, ``seconds``, ``versions``,
        ``parameters``, ``counts``, ``studies``, ``issues``).

    Returns
    -------
    Path
        The file written.
    """
    return atomic.write_text(Path(out_dir) / "run.html", render_run_html(run))


def write_run_record(out_dir: str | Path, run: dict[str, Any]) -> list[str]:
    """Write ``run.json`` and ``run.html`` whatever happens; return what could not be written.

    When the disk is full, the whole record does not fit: a short record (status, counts and
    the reason) is written over the old file's blocks instead, and if even that fails the old
    files are removed. Never does an older run's record stay in place claiming to be this run's;
    the next run with space writes the whole record again.
    """
    out_dir = Path(out_dir)
    problems: list[str] = []
    try:
        atomic.write_json(out_dir / "run.json", run)
    except OSError as exc:
        problems.append(f"run.json: {exc.strerror or exc}")
        _write_short(out_dir / "run.json", _short_json(run, problems))
    try:
        write_run_html(out_dir, run)
    except OSError as exc:
        problems.append(f"run.html: {exc.strerror or exc}")
        _write_short(out_dir / "run.html", _short_html(run, problems))
    return problems


def _short_json(run: dict[str, Any], problems: list[str]) -> bytes:
    short = {k: run.get(k) for k in ("run_id", "started", "finished", "status", "counts", "error")}
    short["record_incomplete"] = problems
    return (json.dumps(short, indent=1, default=str) + "\n").encode()


def _short_html(run: dict[str, Any], problems: list[str]) -> bytes:
    esc = html.escape
    return (f"<!doctype html><html><meta charset=utf-8><title>medpipe run {esc(str(run.get('run_id')))}</title>"
            f"<p>Run {esc(str(run.get('run_id')))}: {esc(str(run.get('status')))}, "
            f"{esc(json.dumps(run.get('counts')))}. The full summary could not be written: "
            f"{esc('; '.join(problems))}.</html>\n").encode()


def _write_short(path: Path, data: bytes) -> None:
    try:
        atomic.overwrite_in_place(path, data)
    except OSError:
        path.unlink(missing_ok=True)  # no record is better than an older run's


def _md(text: Any) -> str:
    """A markdown table cell: no pipes, no newlines, no HTML."""
    s = "–" if text is None or text == "" else str(text)
    return (s.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\r", " ").replace("\n", " "))


def run_table(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per study for a Prefect table artifact.

    >>> run_table({"studies": [{"study_key": "k", "status": "ok", "seconds": 1.234, "findings": "none"}]})
    [{'study': 'k', 'status': 'ok', 'modality': None, 'findings': 'none', 'error': None, 'seconds': 1.23, 'report': None}]
    """
    rows = []
    for s in run.get("studies") or []:
        seconds = s.get("seconds")
        rows.append({
            "study": s.get("study_key"),
            "status": s.get("status"),
            "modality": s.get("modality"),
            "findings": s.get("findings"),
            "error": s.get("error"),
            "seconds": round(float(seconds), 2) if isinstance(seconds, (int, float)) else None,
            "report": report_href(s.get("output")),
        })
    return rows


def run_markdown(run: dict[str, Any], max_rows: int = 200) -> str:
    """A markdown summary of the run: counts, timings, then a table of studies (failures first)."""
    counts = {"ok": 0, "failed": 0, "skipped": 0, **(run.get("counts") or {})}
    studies = sorted(run.get("studies") or [], key=lambda s: (s.get("status") != "failed", str(s.get("study_key"))))
    icon = {"ok": "✅", "failed": "❌", "skipped": "⏭️", "deferred": "⏳"}
    deferred = f" · {counts['deferred']} deferred" if counts.get("deferred") else ""
    lines = [
        f"# medpipe run {_md(run.get('run_id'))}",
        "",
        f"**{counts['ok']} ok · {counts['failed']} failed · {counts['skipped']} skipped{deferred}** "
        f"in {_num(run.get('seconds'), 1)} s ({_md(run.get('started'))} → {_md(run.get('finished'))})",
        "",
        *_source_markdown(run),
        "| study | status | modality | findings | seconds |",
        "|---|---|---|---|---:|",
    ]
    for s in studies[:max_rows]:
        text = s.get("error") if s.get("status") == "failed" else (s.get("findings") or s.get("reason"))
        lines.append(f"| `{_md(s.get('study_key'))}` | {icon.get(s.get('status'), '')} {_md(s.get('status'))} | "
                     f"{_md(s.get('modality'))} | {_md(text)} | {_num(s.get('seconds'), 1)} |")
    if len(studies) > max_rows:
        lines.append(f"\n… and {len(studies) - max_rows} more studies (see run.html).")
    issues = run.get("issues") or []
    if issues:
        lines += ["", f"{len(issues)} file issue{'s' if len(issues) != 1 else ''} (see run.json)."]
    return "\n".join(lines) + "\n"


def _source_markdown(run: dict[str, Any]) -> list[str]:
    """Lines on the PACS source's window and each destination's outbox (none for a folder run)."""
    lines: list[str] = []
    source = run.get("source")
    if isinstance(source, dict) and source.get("kind") != "folder":
        window = source.get("window") or {}
        lines += [f"Source `{_md(source.get('address'))}`, window {_md(window.get('start'))} → "
                  f"{_md(window.get('end'))}", ""]
    for d in run.get("outbox") or []:
        err = f" (last error: {_md(d.get('last_error'))})" if d.get("last_error") else ""
        lines.append(f"- to `{_md(d.get('destination'))}`: {d.get('delivered', 0)} delivered, "
                     f"{d.get('pending', 0)} pending, {d.get('failed', 0)} failed{err}")
    return lines + [""] if run.get("outbox") else lines
