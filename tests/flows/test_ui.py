"""The Prefect UI in headless Chromium: find the nightly deployment, start a custom run, see it finish.

Debian's ``chromium`` driven by Playwright's Python package (no browser download: Playwright
launches ``/usr/bin/chromium``). The server is the session's ``prefect server start`` with the
UI; ``medpipe serve`` serves the deployment. The test clicks what a person would: Deployments,
``nightly``, Run, Custom run; it edits the ``archive`` and ``out`` parameters, submits, and polls
the run's page until it says Completed.

The screenshot of the deployment page (nightly schedule visible) goes to the test's tmp folder;
with ``MEDPIPE_UPDATE_DOCS_IMAGES=1`` it also replaces ``docs/images/prefect-ui.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium (/usr/bin/chromium) is not installed"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "images" / "prefect-ui.png"
# No sandbox (root in a container), nothing fetched from the network by the browser itself.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CONFIG = "model:\n  enabled: false\n"  # inference is not the point here (TF costs ~5 s a worker)


@pytest.fixture
def page(tmp_path: Path):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def form_field(page: Any, label: str) -> Any:
    """The input (or textarea) of a schema-form parameter or a labelled form field."""
    row = page.locator(".p-label").filter(has=page.locator("label", has_text=label)).first
    return row.locator("textarea, input[type=text]").first


def read_flow_run(name: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:  # sync: Playwright runs an event loop in this thread
        [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return run


def open_run_link(page, run_name: str, timeout_s: float = 120.0) -> None:
    """Click the run's link in the deployment's run list, reloading until the list shows it.

    The UI refreshes that list on its own schedule; on a loaded machine a new run took longer
    to appear than one locator timeout (seen in a fresh-clone CI run).
    """
    link = page.get_by_role("link", name=run_name, exact=True).first
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            link.wait_for(state="visible", timeout=10_000)
            break
        except sync_api.TimeoutError:
            if time.monotonic() > deadline:
                raise
            page.reload()
    link.click()


def log_in(page: Any, ui: str, auth: str) -> None:
    """Log in as a person would: the UI asks for the server's ``user:password`` string."""
    page.goto(f"{ui}/deployments")
    password = page.locator("input[type=password]")
    # expect() waits 5 s by default: too short for a loaded machine (seen in a full tests/flows run).
    sync_api.expect(password).to_be_visible(timeout=30_000)
    password.fill(auth)
    page.get_by_role("button", name="Login", exact=True).click()
    sync_api.expect(password).to_have_count(0, timeout=30_000)  # the UI accepted it and moved on


def test_custom_run_from_the_prefect_ui(prefect_api, prefect_auth, medpipe_serve, small_archive, write_archive,
                                        tmp_path, page):
    expect = sync_api.expect
    ui = prefect_api.removesuffix("/api")
    other = write_archive(tmp_path / "archive-2", 1, seed=7)  # the archive of the custom run
    [other_key] = other["studies"]
    config = tmp_path / "medpipe.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "ui-out"
    run_name = f"ui-custom-{uuid.uuid4().hex[:6]}"

    with medpipe_serve(small_archive["root"], tmp_path / "nightly-out", "--config", str(config),
                       "--allow-out-root", str(tmp_path)) as dep:
        try:
            # The server requires basic auth: the UI opens on its login form.
            log_in(page, ui, prefect_auth)
            # Deployments -> nightly: the deployment with its nightly schedule.
            page.goto(f"{ui}/deployments")
            page.get_by_role("link", name="nightly", exact=True).first.click()
            page.wait_for_url(f"**/deployments/deployment/{dep.id}**")
            expect(page.get_by_text("At 02:00 AM every day").first).to_be_visible()

            # Run -> Custom run: edit the parameters, submit.
            page.locator("button.run-menu__run-button").click()
            page.get_by_text("Custom run", exact=True).click()
            page.wait_for_url(f"**/deployments/deployment/{dep.id}/run**")
            expect(form_field(page, "archive")).to_have_value(str(small_archive["root"].resolve()))
            form_field(page, "Run Name").fill(run_name)
            form_field(page, "archive").fill(str(other["root"]))
            form_field(page, "out").fill(str(out))
            page.get_by_role("button", name="Submit", exact=True).click()

            # Back on the deployment page, the run is listed; its own page shows it finish.
            page.wait_for_url(f"**/deployments/deployment/{dep.id}?**")
            open_run_link(page, run_name)
            page.wait_for_url("**/runs/flow-run/**")
            badge = page.locator(".state-badge").first
            expect(badge).to_have_text("Completed", timeout=150_000)  # the UI polls the API
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print(f"page {page.url} (screenshot {tmp_path / 'failure.png'}):\n{page.inner_text('body')[:3000]}")
            raise

        # The run the UI started: the edited parameters, the outputs of the other archive.
        flow_run = read_flow_run(run_name)
        assert flow_run.deployment_id == dep.id and flow_run.state.is_completed()
        assert flow_run.parameters["archive"] == str(other["root"])
        assert flow_run.parameters["out"] == str(out)
        run = json.loads((out / "run.json").read_text())
        assert [(s["study_key"], s["status"]) for s in run["studies"]] == [(other_key, "ok")]
        assert json.loads((out / "studies" / other_key / "report.json").read_text())["status"] == "ok"
        assert not (tmp_path / "nightly-out").exists()

        # The picture for the README: the deployment page, nightly schedule and the finished run.
        page.goto(f"{ui}/deployments/deployment/{dep.id}")
        expect(page.get_by_text("At 02:00 AM every day").first).to_be_visible()
        expect(page.get_by_role("link", name=run_name, exact=True).first).to_be_visible()
        shot = tmp_path / "prefect-ui.png"
        page.screenshot(path=str(shot))
    assert 20_000 < shot.stat().st_size < 400_000
    if os.environ.get("MEDPIPE_UPDATE_DOCS_IMAGES") == "1":
        shutil.copyfile(shot, SCREENSHOT)
