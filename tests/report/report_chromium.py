"""Headless Chromium for the report tests (selenium, the Debian packages ``chromium`` and ``chromium-driver``).

A uniquely named module (not conftest.py). :func:`chromium_or_skip` skips the calling test, with the reason, when the
browser, its driver or selenium is missing, or when chromedriver and Chromium are of different major versions (the
driver would start and then fail with a stack trace); ``.ci/run`` installs them, so CI runs the tests. Every call
into Chromium has a time limit: ``--version`` :data:`VERSION_TIMEOUT_S`, page loads :data:`PAGE_LOAD_TIMEOUT_S`,
scripts :data:`SCRIPT_TIMEOUT_S`, waits :func:`wait_for`'s ``timeout``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu",
    # no traffic of the browser's own (updates, sync, first-run pages): the network log holds the page's requests only
    "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
    "--window-size=1400,1000",
)


def _find(*names: str) -> str | None:
    for n in names:
        p = shutil.which(n) or (f"/usr/bin/{n}" if Path(f"/usr/bin/{n}").is_file() else None)
        if p:
            return p
    return None


VERSION_TIMEOUT_S = 20.0
PAGE_LOAD_TIMEOUT_S = 60.0
SCRIPT_TIMEOUT_S = 30.0


def _major_version(text: str) -> int | None:
    """The major version in ``--version`` output (``Chromium 131.0.6778.85 built on Debian`` -> 131)."""
    m = re.search(r"\b(\d+)\.\d+(?:\.\d+)*", text)
    return int(m.group(1)) if m else None


def version_problem(browser: str, driver: str, timeout: float = VERSION_TIMEOUT_S) -> str | None:
    """Why ``driver`` cannot drive ``browser`` (different major versions, or a version that cannot be read), or None."""
    majors = {}
    for name, path in (("Chromium", browser), ("chromedriver", driver)):
        try:
            done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"{path} --version did not answer within {timeout:.0f} s"
        except OSError as err:
            return f"{path} --version cannot run ({err})"
        text = (done.stdout + done.stderr).strip()
        majors[name] = _major_version(text)
        if done.returncode != 0 or majors[name] is None:
            return f"cannot read the {name} version from {path} --version ({text[:200]!r})"
    if majors["Chromium"] != majors["chromedriver"]:
        return (f"chromedriver {driver} is for Chromium {majors['chromedriver']} but {browser} is Chromium "
                f"{majors['Chromium']}: install the matching pair (Debian: apt-get install chromium chromium-driver)")
    return None


def chromium_or_skip():
    """``(webdriver module, chromium path, chromedriver path)`` or skip the test with the reason."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")
    browser = _find("chromium", "chromium-browser")
    driver = _find("chromedriver")
    if browser is None or driver is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; .ci/run "
                    "installs them)")
    problem = version_problem(browser, driver)
    if problem:
        pytest.skip(problem)
    return webdriver, browser, driver


def start_chromium(tmp_path: Path):
    """A headless Chromium driven by selenium, with browser console and performance (network) logs, a fresh profile
    and the driver path given explicitly."""
    webdriver, browser, driver = chromium_or_skip()
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='profile-', dir=tmp_path)}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=opts)
    chrome.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    chrome.set_script_timeout(SCRIPT_TIMEOUT_S)
    return chrome


def wait_for(driver, script: str, timeout: float = 20.0, poll: float = 0.05):
    """Poll ``return <script>`` until truthy; the value, or AssertionError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = driver.execute_script(f"return {script}")
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for: {script}")


def network_requests(driver) -> list[tuple[str, str]]:
    """``(url, document url)`` of every request in the performance log (``Network.requestWillBeSent``)."""
    out = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            out.append((msg["params"]["request"]["url"], msg["params"].get("documentURL", "")))
    return out
