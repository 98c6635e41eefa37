"""Every store test here runs twice: against EventStore, and against
AsyncEventStore driven through blocking proxies (tests/helpers/store_drivers.py).

``store`` is the store under test, with EventStore's interface either way;
``driver`` makes more of the same kind (``driver.connect(dsn, ...)``, a
store over a pool of the test's, a connection for ``conn=``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aura_pg import EventStore
from tests.helpers.store_drivers import DRIVERS, StoreDriver, store_driver


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> Iterator[StoreDriver]:
    with store_driver(request.param) as opened:
        yield opened


@pytest.fixture
def store(driver: StoreDriver, dsn: str) -> Iterator[EventStore]:
    with driver.connect(dsn, max_size=20) as event_store:
        yield event_store
