"""The dashboard in a real browser during a live simulation: follow it, pause, resume, stop.

Headless Chromium is Debian's ``chromium`` package, driven by Playwright's Python
package with ``executable_path`` (``playwright install`` is never run); ``make test``
installs Chromium when root (``make system-deps``) and the dev extra has Playwright.
"""

import importlib.util
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from server.launch.processes import free_port
from server.record.runs import run_status
from server.record.store import RunStoreError
from tests.helpers import APP_DIR, make_run, make_run_reaching, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.system_package("chromium")]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = APP_DIR / "test-artifacts"
RUN_NAME = "dashboard-live"
# Far more rounds than the test needs: the test stops the run itself, and a slow
# machine must not let the run finish before the browser has paused it.
SETTINGS = {"local-epochs": 1, "min-train-nodes": 2, "num-server-rounds": 400}
UI_TIMEOUT_MS = 30_000


def require_browser() -> None:
    """Fail (not skip) with what to install when Chromium or Playwright is missing."""
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("the Python package playwright (in the dev extra)")
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (Debian package chromium)")
    if missing:
        pytest.fail(
            f"the dashboard browser test needs {' and '.join(missing)}; .ci/run installs them "
            "(apt-get install chromium as root, pip install -e '.[dev]')"
        )


def state_of(run_dir: Path) -> str:
    """The run's state from its run store ("" before the server has created it)."""
    try:
        return str(run_status(run_dir)["state"])
    except RunStoreError:
        return ""


def round_of(run_dir: Path) -> int:
    """The run's current round from its run store (-1 before the server has created it)."""
    try:
        return int(run_status(run_dir)["current_round"])  # type: ignore[call-overload]
    except RunStoreError:
        return -1


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/runs", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def dashboard(runs_dir: Path, log_path: Path) -> Iterator[str]:
    """``fedcoord dashboard`` on a free port, stopped by PID on the way out."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.ui.cli", "dashboard", "--runs-dir", str(runs_dir)]
            + ["--port", str(port)],
            cwd=APP_DIR,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: process.poll() is not None or answers(url), 60, "the dashboard")
            assert process.poll() is None, log_path.read_text()
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def browser_page(runs_dir: Path, log_name: str, **options: object) -> Iterator[tuple[object, str]]:
    """A Chromium page and the URL of a dashboard of ``runs_dir``; both stopped on the way out."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with dashboard(runs_dir, ARTIFACTS / log_name) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(**options), url
        finally:
            browser.close()


def round_shown_above(page, value: int) -> None:
    page.wait_for_function(
        "n => Number(document.getElementById('round-current').textContent) > n",
        arg=value,
        timeout=UI_TIMEOUT_MS * 2,
    )


def test_dashboard_follows_and_controls_a_live_run(simulate, tmp_path):
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    # Prepare: a 40-round run on 3 nodes, the dashboard, and the browser
    ARTIFACTS.mkdir(exist_ok=True)
    run = simulate(3, RUN_NAME, wait=False, **SETTINGS)
    assert run.returncode == 0, run.output
    try:
        with (
            dashboard(run.run_dir.parent, ARTIFACTS / "dashboard.log") as url,
            sync_playwright() as playwright,
        ):
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1360, "height": 900})
                page.on("dialog", lambda dialog: dialog.accept())  # the stop confirmation
                wait_until(lambda: round_of(run.run_dir) >= 1, 180, "round 1")

                # Execute / Assert: the runs page lists the run and links to it
                page.goto(f"{url}/")
                expect(page.locator("#runs-body")).to_contain_text(RUN_NAME, timeout=UI_TIMEOUT_MS)
                page.click(f"text={RUN_NAME}")
                expect(page.locator("#state-badge")).to_have_text("running")

                # the round counter advances live, the charts and node table fill in
                shown = int(page.inner_text("#round-current"))
                round_shown_above(page, shown)
                expect(page.locator("#nodes-body tr")).to_have_count(3, timeout=UI_TIMEOUT_MS)
                chart_width = "document.getElementById('chart-accuracy').naturalWidth"
                # polled from Python: the page's CSP forbids the eval a string predicate needs
                wait_until(lambda: page.evaluate(chart_width) > 0, 30, "the accuracy chart")

                # pause: the run store says paused, and so does the page
                page.click("#btn-pause")
                expect(page.locator("#notice")).to_contain_text("pause queued")
                wait_until(lambda: state_of(run.run_dir) == "paused", 60, "state paused")
                expect(page.locator("#state-badge")).to_have_text("paused", timeout=UI_TIMEOUT_MS)
                expect(page.locator("#btn-pause")).to_be_disabled()
                held = round_of(run.run_dir)

                # an operator weight goes through the same validated command as the CLI's
                page.select_option("#weight-partition", "1")
                page.fill("#weight-value", "2.5")
                page.click("#btn-weight")
                expect(page.locator("#notice")).to_contain_text("partition 1 weight 2.5 queued")

                # resume: rounds go on
                page.click("#btn-resume")
                expect(page.locator("#notice")).to_contain_text("resume queued")
                wait_until(lambda: round_of(run.run_dir) > held, 60, "a round after resume")
                round_shown_above(page, held)
                expect(page.locator("#state-badge")).to_have_text("running")
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

                # stop: the run ends and the page turns read-only
                page.click("#btn-stop")
                wait_until(lambda: state_of(run.run_dir) == "stopped", 60, "state stopped")
                expect(page.locator("#state-badge")).to_have_text("stopped", timeout=UI_TIMEOUT_MS)
                expect(page.locator("#live")).to_contain_text("finished")
                expect(page.locator("#btn-resume")).to_be_disabled()
            finally:
                browser.close()
    finally:
        # Whatever failed, leave no run going on the session's SuperLink.
        if state_of(run.run_dir) in ("running", "paused"):
            run.cli("stop", RUN_NAME, check=False)


def test_dashboard_shows_unreadable_runs(tmp_path):
    require_browser()
    from playwright.sync_api import expect

    # Prepare: a live run and one whose run.db is random bytes
    runs_dir = tmp_path / "runs"
    make_run(runs_dir, "live").close()
    (runs_dir / "broken").mkdir()
    (runs_dir / "broken" / "run.db").write_bytes(b"\x13 not a database " * 300)
    with browser_page(runs_dir, "dashboard-unreadable.log") as (page, url):
        # Execute / Assert: listed as unreadable with the reason, beside the good run
        page.goto(f"{url}/")
        row = page.locator("#runs-body tr", has_text="broken")
        expect(row.locator(".badge")).to_have_text("unreadable", timeout=UI_TIMEOUT_MS)
        expect(row).to_contain_text("run 'broken' is unreadable: ")
        expect(page.locator("#runs-body tr", has_text="live")).to_contain_text("running")

        # its page says so
        page.goto(f"{url}/runs/broken")
        expect(page.locator("h1")).to_have_text("Unreadable run")
        expect(page.locator("main")).to_contain_text("run 'broken' is unreadable: ")

        # a run followed live whose run.db is overwritten: the page stops and says why
        page.goto(f"{url}/runs/live")
        expect(page.locator("#state-badge")).to_have_text("running", timeout=UI_TIMEOUT_MS)
        for path in runs_dir.glob("live/run.db*"):
            path.write_bytes(b"overwritten " * 300)
        expect(page.locator("#state-badge")).to_have_text("unreadable", timeout=UI_TIMEOUT_MS)
        expect(page.locator("#run-message")).to_contain_text("run 'live' is unreadable: ")
        expect(page.locator("#live")).to_contain_text("unreadable")
        expect(page.locator("#btn-pause")).to_be_disabled()


def test_dashboard_compares_the_runs_ticked_on_the_runs_page(tmp_path):
    require_browser()
    from playwright.sync_api import expect

    # Prepare: two runs of different strategies, and one that cannot be read
    runs_dir = tmp_path / "runs"
    make_run_reaching(runs_dir, "avg", [0.1, 0.5, 0.8, 0.9])
    make_run_reaching(runs_dir, "med", [0.1, 0.4, 0.6, 0.7], duration_s=20.0, strategy="median")
    (runs_dir / "broken").mkdir()
    (runs_dir / "broken" / "run.db").write_bytes(b"\x13 not a database " * 300)
    viewport = {"width": 1360, "height": 1100}
    with browser_page(runs_dir, "dashboard-compare.log", viewport=viewport) as (page, url):
        page.goto(f"{url}/")

        # Execute: tick both readable runs (the unreadable one cannot be ticked)
        expect(page.get_by_label("compare broken")).to_be_disabled(timeout=UI_TIMEOUT_MS)
        page.get_by_label("compare avg").check()
        expect(page.locator("#compare-hint")).to_be_visible()
        page.get_by_label("compare med").check()

        # Assert: the table, by strategy, and both charts
        rows = page.locator("#compare-body tr")
        expect(rows).to_have_count(2, timeout=UI_TIMEOUT_MS)
        expect(rows.nth(1)).to_contain_text("median")
        expect(rows.nth(0)).to_contain_text("0.9000")
        for axis in ("round", "time"):
            width = f"document.getElementById('compare-{axis}').naturalWidth"
            wait_until(lambda width=width: page.evaluate(width) > 0, 30, f"the {axis} chart")

        # a target adds the round and time it was reached ('–' when never)
        page.fill("#compare-target", "0.8")
        page.press("#compare-target", "Enter")
        expect(page.locator("#compare-head")).to_contain_text("Round @0.8")
        expect(rows.nth(0)).to_contain_text("30s")
        expect(rows.nth(1)).to_contain_text("–")
        page.screenshot(path=str(ARTIFACTS / "dashboard-compare.png"), full_page=True)
