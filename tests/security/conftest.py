"""Fixtures of the security tests: a canary in every test database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.security._support import Snapshot, create_canary, snapshot


@pytest.fixture
def canary(dsn: str) -> Iterator[Snapshot]:
    """A canary table (and schema) in the test's database, and the snapshot
    of the database's structure taken after it was planted. The test
    compares against it; the fixture checks once more at the end."""
    create_canary(dsn)
    before = snapshot(dsn)
    yield before
    after = snapshot(dsn)
    assert after.canary == before.canary, "the canary's rows changed"
