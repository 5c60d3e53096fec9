"""The status page in a real browser, against a real daemon running the demo with its simulators.

Debian's chromium (scripts/test.sh installs it) driven by Playwright for Python; Playwright's own
browser download is never used. The daemon is ``gatewayd demo`` on a copy of etc/demo.yaml with
free ports and a token file, so the page must ask for the token first.

Without chromium the tests skip, or fail under ``CI=true``. A screenshot of the page goes to the
test's temporary directory (its path is printed) and, with ``GATEWAYD_SCREENSHOT=PATH``, to PATH
as well (the README's docs/status-page.png is taken this way).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gatewayd.cli import demo_config_path
from gatewayd.testing import free_port, wait_for_port

pytestmark = pytest.mark.integration

TOKEN = "status-page-token-0123456789"
CABINETS = [f"86000000000000{n}" for n in range(1, 6)]
PLUGINS = ("cabinets", "esam", "heating", "thermometers")
VIEWPORT = {"width": 1280, "height": 900}
TIMEOUT_MS = 15_000  # the longest any expectation waits (a cabinet heartbeat is 10 s)


def missing(message: str) -> None:
    """What a missing browser or Playwright means: a clear failure under CI, a skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def chromium_path() -> str:
    """The system chromium (Debian's package installs /usr/bin/chromium)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    if found is None:
        missing("chromium is not installed: apt-get install chromium (scripts/test.sh does)")
    assert found is not None
    return found


@dataclass
class Demo:
    """The running demo daemon: its API address and files."""

    base: str
    process: subprocess.Popen
    directory: Path

    def log_tail(self) -> str:
        return (self.directory / "stderr.log").read_text(errors="replace")[-3000:]

    def get(self, path: str) -> Any:
        request = urllib.request.Request(
            self.base + path, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())


def demo_config(directory: Path) -> Path:
    """etc/demo.yaml with free ports, a private ESAM pty link and a token file (mode 0600)."""
    config = yaml.safe_load(demo_config_path().read_text())
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    broker = free_port()
    config["api"] = {"listen": f"127.0.0.1:{free_port()}", "token_file": str(token_file)}
    plugins = config["plugins"]
    plugins["thermometers"]["listen"] = f"127.0.0.1:{free_port()}"
    plugins["cabinets"]["listen"] = f"127.0.0.1:{free_port()}"
    plugins["esam"]["port"] = str(directory / "esam-pty")
    plugins["heating"]["broker"]["port"] = broker
    config["sinks"]["north"]["broker"]["port"] = broker
    path = directory / "demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """``gatewayd demo`` as a process, once every plugin has devices."""
    directory = tmp_path_factory.mktemp("status-page")
    config = demo_config(directory)
    address = yaml.safe_load(config.read_text())["api"]["listen"]
    state = str(directory / "state")
    command = [sys.executable, "-m", "gatewayd", "demo", "-c", str(config), "--state-dir", state]
    with (directory / "stdout.log").open("wb") as out, (directory / "stderr.log").open("wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=directory)
    running = Demo(f"http://{address}", process, directory)
    try:
        wait_for_port(int(address.rpartition(":")[2]), timeout=20)
        _wait_for_devices(running)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_devices(demo: Demo, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert demo.process.poll() is None, f"the demo exited:\n{demo.log_tail()}"
        try:
            listed = demo.get("/api/v1/devices?online=true&limit=1000")["devices"]
        except OSError:
            listed = []
        plugins = {d["plugin"] for d in listed}
        cabinets = {d["id"] for d in listed if d["plugin"] == "cabinets"}
        if plugins >= set(PLUGINS) and cabinets >= set(CABINETS):
            return
        assert time.monotonic() < deadline, f"devices online: {sorted(plugins)}\n{demo.log_tail()}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless system chromium (no sandbox: CI runs as root)."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed: pip install -e '.[test]' (scripts/test.sh does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, demo: Demo) -> Iterator[Any]:
    """A fresh tab (own sessionStorage) on the page, the token not yet given."""
    context = browser.new_context(viewport=VIEWPORT, locale="en-GB", timezone_id="UTC")
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    tab.on("response", lambda response: _failed(response, problems))
    tab.goto(demo.base + "/")
    yield tab
    context.close()
    assert not problems, "\n".join(problems)


def _failed(response: Any, problems: list[str]) -> None:
    """Every answer of 400 or more but the 401/403 of the token checks is a problem."""
    if response.status >= 400 and response.status not in (401, 403):
        problems.append(f"{response.status} for {response.request.method} {response.url}")


def give_token(page: Any, token: str = TOKEN) -> None:
    page.locator("#token-input").fill(token)
    page.locator("#token-form button[type=submit]").click()


def signed_in(page: Any) -> Any:
    """Give the token the page asks for, and wait for the plugins table."""
    expect = _expect()
    expect(page.locator("#token-panel")).to_be_visible()
    give_token(page)
    expect(page.locator("#token-panel")).to_be_hidden()
    expect(page.locator("#plugins tbody tr")).to_have_count(len(PLUGINS))
    return expect


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


# --- the tests ---------------------------------------------------------------------------------


def test_page_lists_the_plugins_and_their_devices(page: Any) -> None:
    expect = signed_in(page)
    rows = page.locator("#plugins tbody tr")
    for name in PLUGINS:
        row = rows.filter(has=page.locator(f"td:text-is('{name}')"))
        expect(row.locator(".badge")).to_have_text("running")
    expect(page.locator("#sinks tbody tr")).to_have_count(3)
    devices = page.locator("#devices tbody tr")
    expect(devices.filter(has_text=CABINETS[0])).to_have_count(1)
    for name in PLUGINS:  # the plugin filter: each plugin's devices
        page.locator("#devices-plugin").select_option(name)
        expect(devices.first.locator("td").first).to_have_text(name)
        expect(devices.locator("td:first-child").filter(has_not_text=name)).to_have_count(0)


def test_search_finds_one_cabinet(page: Any) -> None:
    expect = signed_in(page)
    page.locator("#devices-search").fill(CABINETS[2])
    rows = page.locator("#devices tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.locator("td.id")).to_have_text(CABINETS[2])
    expect(rows.locator(".badge")).to_have_text("online")


def test_tail_shows_new_events_as_the_simulators_send_them(page: Any) -> None:
    expect = signed_in(page)
    expect(page.locator("#tail-state")).to_have_text("live")
    lines = page.locator("#tail li[data-type]")
    expect(lines.first).to_be_visible()
    seen = lines.count()
    page.wait_for_function(
        "n => document.querySelectorAll('#tail li[data-type]').length > n", arg=seen
    )
    # filtered by plugin: only the thermometers' readings from now on
    page.locator("#tail-plugin").fill("thermometers")  # the old stream is dropped at once
    page.locator("#tail-clear").click()
    expect(lines.first).to_be_visible()
    page.wait_for_function("() => document.querySelectorAll('#tail li[data-type]').length >= 3")
    plugins = set(lines.evaluate_all("nodes => nodes.map(n => n.dataset.plugin)"))
    assert plugins == {"thermometers"}


def test_cabinets_query_from_the_command_form_shows_the_slots(page: Any) -> None:
    expect = signed_in(page)
    form = page.locator("form.command-card[data-plugin='cabinets']")
    form.locator("select[name=command]").select_option("query")
    form.locator("input[name=imei]").fill(CABINETS[0])
    form.locator("button[type=submit]").click()
    answer = form.locator("pre.answer")
    expect(answer).to_contain_text("200 ok")
    expect(answer).to_contain_text('"slots"')
    assert "good" in (answer.get_attribute("class") or "")


def test_a_wrong_token_gets_a_clear_message(page: Any) -> None:
    expect = _expect()
    expect(page.locator("#token-message")).to_contain_text("needs its API token")
    give_token(page, "not-the-token")
    message = page.locator("#token-message")
    expect(message).to_contain_text("The token was refused: the bearer token is not valid")
    expect(page.locator("#token-panel")).to_be_visible()
    give_token(page)  # another try with the right one
    expect(page.locator("#token-panel")).to_be_hidden()
    expect(page.locator("#plugins tbody tr")).to_have_count(len(PLUGINS))


def test_screenshot(page: Any, demo: Demo, tmp_path: Path) -> None:
    """The page with data everywhere, written to the test's directory (and GATEWAYD_SCREENSHOT:
    the first 1280x900 pixels, after waiting for the charts to have a minute and a half)."""
    expect = signed_in(page)
    wanted = os.environ.get("GATEWAYD_SCREENSHOT")
    if wanted:  # for the README: wait for a minute and a half of chart (about 80 s more)
        deadline = time.monotonic() + 120
        while len(demo.get("/api/v1/history")["t"]) < 10 and time.monotonic() < deadline:
            time.sleep(1)
        page.reload()  # the tab keeps the token (sessionStorage): not asked again
        expect(page.locator("#plugins tbody tr")).to_have_count(len(PLUGINS))
        expect(page.locator("#token-panel")).to_be_hidden()
    expect(page.locator("#tail li[data-type]").first).to_be_visible()
    expect(page.locator("#devices tbody tr td.id").first).to_be_visible()
    expect(page.locator("#charts-note")).to_contain_text("samples")
    form = page.locator("form.command-card[data-plugin='cabinets']")  # an answer on show
    form.locator("select[name=command]").select_option("query")
    form.locator("input[name=imei]").fill(CABINETS[0])
    form.locator("button[type=submit]").click()
    expect(form.locator("pre.answer")).to_contain_text('"slots"')
    path = tmp_path / "status-page.png"
    page.screenshot(path=str(path))
    page.screenshot(path=str(tmp_path / "status-page-full.png"), full_page=True)
    print(f"status page screenshot: {path} (the whole page: status-page-full.png)")
    assert path.stat().st_size > 10_000
    if wanted:
        shutil.copyfile(path, wanted)
        print(f"status page screenshot also at {wanted}")
