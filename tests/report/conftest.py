"""Fixtures for the report tests (the data lives in report_fixtures.py)."""

from report_fixtures import results  # noqa: F401  (pytest fixture)
