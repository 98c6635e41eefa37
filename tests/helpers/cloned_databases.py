"""Fresh migrated databases on demand, cloned from the session's template,
for tests that need many: one per hypothesis example, say.

Events can never be deleted, so a clean slate is a new database. One
CREATE DATABASE takes a quarter to most of a second here, mostly in the
checkpoints that STRATEGY FILE_COPY requests; clones made at the same
time share them, so eight in parallel cost little more than one. Batches
are made ahead, while no test runs, because a CREATE DATABASE is a
transaction like any other: while it runs, gap-free reads and projections
in every database of the cluster wait for it.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Self

import psycopg
from psycopg import sql
from pytest_postgresql.executors import NoopExecutor


class ClonedDatabases:
    """``create()`` returns the DSN of a new database cloned from the
    template (made in batches of ``batch``), ``drop(dsn)`` removes one; on
    exit, so is every database it made and nobody dropped."""

    def __init__(self, server: NoopExecutor, prefix: str = "aura_clone", *, batch: int = 8) -> None:
        self._server = server
        self._names = (f"{prefix}_{os.getpid()}_{n}" for n in itertools.count())
        self._batch = batch
        self._ready: list[str] = []
        self._live: set[str] = set()

    def _dsn(self, dbname: str) -> str:
        server = self._server
        return f"host={server.host} port={server.port} user={server.user} dbname={dbname}"

    def _execute(self, statement: sql.Composed) -> None:
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            conn.execute(statement)

    def _clone(self, name: str) -> None:
        self._execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(self._server.template_dbname)
            )
        )

    def _drop(self, name: str) -> None:
        self._execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        self._live.discard(name)

    def create(self) -> str:
        if not self._ready:
            names = [next(self._names) for _ in range(self._batch)]
            self._live.update(names)
            with ThreadPoolExecutor(max_workers=4) as workers:
                list(workers.map(self._clone, names))
            self._ready = names[::-1]
        return self._dsn(self._ready.pop())

    def drop(self, dsn: str) -> None:
        self._drop(str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with ThreadPoolExecutor(max_workers=4) as workers:
            list(workers.map(self._drop, sorted(self._live)))
