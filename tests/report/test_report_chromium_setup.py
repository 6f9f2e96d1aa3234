"""The browser tests' setup (issue 18 kind 6): a chromedriver of another major version than Chromium is a skip with
the reason, not a stack trace; every ``--version`` call has a time limit. Fake executables stand in for both."""

from __future__ import annotations

import time

import pytest
from report_chromium import _major_version, chromium_or_skip, version_problem


def _fake(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_major_versions_from_the_real_version_lines():
    assert _major_version("Chromium 131.0.6778.85 built on Debian GNU/Linux 12 (bookworm)") == 131
    assert _major_version("ChromeDriver 120.0.6099.224 (3587067cb1c4d5ab2d0c2d5e8b4a9c2b9ec3d40e-refs/...)") == 120
    assert _major_version("Google Chrome 126.0.6478.55 ") == 126
    assert _major_version("no version here") is None


def test_matching_versions_pass_and_different_ones_name_both(tmp_path):
    browser = _fake(tmp_path, "chromium", "echo 'Chromium 131.0.6778.85 built on Debian GNU/Linux 12 (bookworm)'")
    driver = _fake(tmp_path, "chromedriver", "echo 'ChromeDriver 131.0.6778.85 (abc-refs/branch-heads/6778@{#1})'")
    assert version_problem(browser, driver) is None
    old = _fake(tmp_path, "chromedriver-120", "echo 'ChromeDriver 120.0.6099.224 (3587067c-refs/branch-heads/6099)'")
    problem = version_problem(browser, old)
    assert problem is not None and "for Chromium 120" in problem and "is Chromium 131" in problem


def test_a_hanging_or_silent_version_call_is_a_reason_too(tmp_path):
    browser = _fake(tmp_path, "chromium", "echo 'Chromium 131.0.6778.85'")
    start = time.monotonic()
    problem = version_problem(browser, _fake(tmp_path, "stuck", "sleep 30"), timeout=0.5)
    assert time.monotonic() - start < 10 and "did not answer within" in problem
    assert "cannot read the chromedriver version" in version_problem(browser, _fake(tmp_path, "mute", "exit 1"))


def test_a_mismatched_pair_skips_the_browser_test(tmp_path, monkeypatch):
    pytest.importorskip("selenium.webdriver")
    import report_chromium

    paths = {"chromium": _fake(tmp_path, "chromium", "echo 'Chromium 131.0.6778.85'"),
             "chromedriver": _fake(tmp_path, "chromedriver", "echo 'ChromeDriver 129.0.6668.100'")}
    monkeypatch.setattr(report_chromium, "_find", lambda *names: next((paths[n] for n in names if n in paths), None))
    with pytest.raises(pytest.skip.Exception, match="chromedriver .* is for Chromium 129 but .* is Chromium 131"):
        chromium_or_skip()
