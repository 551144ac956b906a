import html
import re

from medpipe.report import run_markdown, run_table, write_run_html

RUN = {
    "run_id": "r-2024", "started": "2024-01-02T02:00:00Z", "finished": "2024-01-02T02:10:00Z", "seconds": 600.0,
    "versions": {"medpipe": "0.1.0"}, "parameters": {"archive": "/data"},
    "counts": {"ok": 1, "failed": 1, "skipped": 0},
    "studies": [
        {"study_key": "aaa111", "status": "ok", "error": None, "output": "studies/aaa111", "modality": "CT",
         "seconds": 42.5, "findings": "lesion (score 0.91) | 2 candidates"},
        {"study_key": "bbb222", "status": "failed", "error": "ingest: <img src=x onerror=alert(1)>", "output": "studies/bbb222",
         "modality": None, "seconds": 1.0, "findings": None},
        {"study_key": "ccc333", "status": "failed", "error": "x", "output": "/etc", "modality": None, "seconds": None,
         "findings": None},
    ],
    "issues": [{"path": "a/b.dcm", "reason": "truncated"}],
}


def test_run_html_table_and_links(tmp_path):
    path = write_run_html(tmp_path, RUN)
    assert path == tmp_path / "run.html"
    text = path.read_text()
    hrefs = re.findall(r'href="([^"]+)"', text)
    assert hrefs == ["studies/aaa111/report.html", "studies/bbb222/report.html"]  # absolute output: no link
    assert "<img src=x" not in text and html.escape("<img src=x onerror=alert(1)>") in text
    assert "42.5" in text and "lesion (score 0.91)" in text
    assert "http" not in text.replace("http-equiv", "")


def test_run_table_rows():
    rows = run_table(RUN)
    assert [r["study"] for r in rows] == ["aaa111", "bbb222", "ccc333"]
    assert rows[0]["report"] == "studies/aaa111/report.html" and rows[2]["report"] is None
    assert rows[2]["seconds"] is None


def test_run_markdown_escapes_cells_and_lists_failures_first():
    md = run_markdown(RUN)
    table = [line for line in md.splitlines() if line.startswith("| `")]
    assert table[0].startswith("| `bbb222`") and len(table) == 3
    assert all(line.count(" | ") == 4 for line in table)  # the pipe in the findings is escaped
    assert "<img" not in md and "1 ok · 2 failed" not in md and "1 ok · 1 failed" in md
