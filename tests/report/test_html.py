import html
import re
import shutil
import subprocess
from pathlib import Path

import markupsafe
import pytest

from medpipe.config import Config
from medpipe.report import assemble_record, write_study_report

EVIL = "<script>document.title='pwned'</script><b>bold</b>"  # the series description conftest writes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def report(study):
    doc = assemble_record(study.study_dir.name, study.stages, study.timings, study.provenance)
    write_study_report(study.study_dir, doc, Config())
    return study.study_dir / "report.html", doc


def test_html_is_self_contained_and_escaped(report):
    path, doc = report
    text = path.read_text()
    assert EVIL not in text and str(markupsafe.escape(EVIL)) in text
    assert "<script" not in text.lower()
    # No external resource at all: only data: images, no URL scheme anywhere.
    assert not re.search(r"(https?:|ftp:|//[a-z0-9.-]+\.[a-z]{2,})", text.replace("http-equiv", ""), re.I)
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) >= 9 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for fact in ("lesion-slice-cnn", "ab" * 32, doc["provenance"]["config_fingerprint"], "f1nger", "ct_tissues",
                 "LOCALIZER", "fewer than 4 slices", "one localizer image ignored", "not a DICOM file", "run-test"):
        assert html.escape(fact) in text, fact
    assert path.stat().st_size < 2_000_000


def test_failed_study_html(study):
    doc = assemble_record("k", {"plan": study.stages["plan"]}, {"ingest": 0.2}, study.provenance,
                          error="ingest: <b>pixel data truncated</b>")
    write_study_report(study.study_dir, doc, Config())
    text = (study.study_dir / "report.html").read_text()
    assert "Processing failed: ingest: &lt;b&gt;pixel data truncated&lt;/b&gt;" in text


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_report_renders_in_chromium(report, tmp_path):
    path, doc = report
    dom = _chromium("--dump-dom", path.as_uri(), tmp=tmp_path).stdout
    title = re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert title == f"medpipe report {doc['study_key']}"  # the injected script would have set 'pwned'
    assert "<script" not in dom.lower() and "pwned" not in title
    desc = re.search(r'<dd id="series-description">(.*?)</dd>', dom, re.S).group(1)
    assert html.unescape(desc) == EVIL  # shown as text, not parsed into elements
    assert re.search(r'id="status">ok<', dom)
    assert "lesion (0.902)" in dom and "Key findings:" in dom
    shot = tmp_path / "report.png"
    _chromium("--hide-scrollbars", "--window-size=1280,2000", f"--screenshot={shot}", path.as_uri(), tmp=tmp_path)
    assert shot.is_file() and shot.stat().st_size > 20_000
