"""Fixtures for the deployment tests: each values profile is rendered once per session."""

from __future__ import annotations

import pytest

from tests.deploy.chart import PROFILES, Release, release


@pytest.fixture(scope="session", params=sorted(PROFILES))
def rel(request: pytest.FixtureRequest) -> Release:
    """The chart rendered with one values profile (every test runs against each profile)."""
    profile: str = request.param
    return release(profile)
