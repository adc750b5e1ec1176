"""Tests of the offline model zoo."""
