"""Tests that need a Debian package skip with one line without it, and fail under CI=true."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py").read_text()
NEEDS_CHROMIUM = """
import pytest

@pytest.mark.system_package("chromium")
def test_needs_chromium():
    pass

def test_needs_nothing():
    pass
"""


@pytest.fixture()
def suite_without_chromium(pytester: pytest.Pytester) -> pytest.Pytester:
    # Prepare: the project's conftest, with Chromium reported missing
    pytester.makeconftest(CONFTEST + '\nSYSTEM_PACKAGES["chromium"] = lambda: False\n')
    pytester.makepyfile(test_needs=NEEDS_CHROMIUM)
    return pytester


def test_a_missing_package_skips_its_tests_with_the_command_and_a_summary(
    suite_without_chromium, monkeypatch
):
    # Execute
    monkeypatch.delenv("CI", raising=False)
    result = suite_without_chromium.runpytest("-rs")

    # Assert
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["*needs the Debian package chromium: run `sudo make system-deps`*"]
    )
    result.stdout.fnmatch_lines(
        ["*1 test(s) skipped: missing Debian packages chromium; install them with*"]
    )


def test_under_ci_a_missing_package_fails_instead(suite_without_chromium, monkeypatch):
    # Execute
    monkeypatch.setenv("CI", "true")
    result = suite_without_chromium.runpytest()

    # Assert: an error in setup, so the run fails
    assert result.ret != 0
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*CI=true: needs the Debian package chromium*"])
