"""Operating projections: status, pause, resume, reset, replay and dead
letters. Each is a thin call of the SQL function of the same name, so psql
users and the CLI do the same thing; a Python processor's name stands for
all its partitions, and its handler (Python) is run here for a dead-letter
retry or a replay, in the transaction that records it."""

from __future__ import annotations

import asyncio
from typing import Any, LiteralString

import psycopg
from psycopg.rows import dict_row

from aura_pg.errors import ProjectionError
from aura_pg.models import RecordedEvent
from aura_pg.processors import partition_of
from aura_pg.projection import processor
from aura_pg.projection.connection import queries, translate_projection_error
from aura_pg.store.validation import encodable


def _checked(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` if every text in it can reach the server: Postgres text
    holds no NUL, and a lone surrogate (undecodable bytes in argv) is not
    UTF-8. Refused with a typed error before anything is sent."""
    for key, value in params.items():
        if isinstance(value, str) and ("\x00" in value or not encodable(value)):
            raise ProjectionError(
                f"invalid {key} {value!r}: it must be UTF-8 text without NUL characters"
            )
    return params


def call_function(dsn: str, query: str, params: dict[str, Any]) -> Any:
    """One operator function's value (first column of the first row), its
    text arguments checked first and its refusals typed."""
    _checked(params)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(query, params).fetchone()
    except psycopg.Error as exc:
        raise translate_projection_error(exc) or exc from None
    return row[0] if row else None


def status(dsn: str) -> list[dict[str, Any]]:
    """The rows of ``aura.projection_status``."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(queries()["status"]).fetchall()


def row_names(dsn: str, name: str) -> list[str]:
    """The rows ``name`` stands for: itself, or the partitions of the
    Python processor of that name (``name/0`` ...)."""
    _checked({"name": name})
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute(processor.queries()["row_kind"], {"name": name}).fetchone() is not None:
            return [name]
        rows = conn.execute(processor.queries()["rows"], {"name": name}).fetchall()
    return [row[0] for row in rows] or [name]


def _each_row(dsn: str, query: LiteralString, name: str) -> str:
    """The operator function ``query`` on every row of ``name``; its value
    (the same for each)."""
    outcomes = {str(call_function(dsn, query, {"name": row})) for row in row_names(dsn, name)}
    return ", ".join(sorted(outcomes))


def pause(dsn: str, name: str) -> str:
    return _each_row(dsn, queries()["pause"], name)


def resume(dsn: str, name: str) -> str:
    return _each_row(dsn, queries()["resume"], name)


def reset(dsn: str, name: str) -> str:
    return _each_row(dsn, queries()["reset"], name)


def replay_stream(dsn: str, name: str, stream_id: str, from_version: int = 1) -> int:
    """Apply one stream's events again (those before the checkpoint); for a
    Python processor, through its handler, in one transaction."""
    params = {"name": name, "stream_id": stream_id, "from_version": from_version}
    kind, handler = _kind(dsn, name)
    if kind != "python":
        return int(call_function(dsn, queries()["replay_stream"], params))
    if "/" not in name and (rows := row_names(dsn, name)) != [name]:
        # The partition that holds the stream.
        name = rows[partition_of(stream_id, len(rows))]
        params["name"] = name
    return _run_handler(dsn, handler, processor.queries()["replay_events"], params, None)


def repartition(dsn: str, name: str, partitions: int) -> str:
    """Split a Python processor into ``partitions`` (1: none) without
    skipping or repeating an event (``aura.repartition_processor``)."""
    return str(
        call_function(
            dsn, processor.queries()["repartition"], {"name": name, "partitions": partitions}
        )
    )


def _kind(dsn: str, name: str) -> tuple[str | None, str | None]:
    """A projection row's kind and handler; a processor's by its name."""
    rows = row_names(dsn, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(processor.queries()["row_kind"], {"name": rows[0]}).fetchone()
    return (row[0], row[1]) if row else (None, None)


def _run_handler(
    dsn: str,
    handler_name: str | None,
    read: LiteralString,
    params: dict[str, Any],
    finish: LiteralString | None,
) -> int:
    """Run a processor's handler over the events ``read`` returns, then
    ``finish``, in one transaction; the number of events. A handler that
    raises leaves everything as it was (ProjectionError)."""
    assert handler_name is not None
    handler = processor.load_handler(handler_name)
    _checked(params)
    if processor.is_async_handler(handler):
        return asyncio.run(_run_async_handler(dsn, handler_name, handler, read, params, finish))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
            events = _events(conn.execute(read, params).fetchall())
            if events:
                try:
                    handler(events, conn)
                except Exception as exc:
                    raise _handler_failed(handler_name, exc) from exc
            if finish is not None:
                conn.execute(finish, params)
    except psycopg.Error as exc:
        raise translate_projection_error(exc) or exc from None
    return len(events)


async def _run_async_handler(
    dsn: str,
    handler_name: str,
    handler: Any,
    read: LiteralString,
    params: dict[str, Any],
    finish: LiteralString | None,
) -> int:
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with conn, conn.transaction():
            events = _events(await (await conn.execute(read, params)).fetchall())
            if events:
                try:
                    await handler(events, conn)
                except Exception as exc:
                    raise _handler_failed(handler_name, exc) from exc
            if finish is not None:
                await conn.execute(finish, params)
    except psycopg.Error as exc:
        raise translate_projection_error(exc) or exc from None
    return len(events)


def _events(rows: list[tuple[Any, ...]]) -> list[RecordedEvent]:
    return [processor.recorded_event(row) for row in rows]


def _handler_failed(handler_name: str, exc: Exception) -> ProjectionError:
    return ProjectionError(f"handler {handler_name} raised {exc!r}; nothing changed")


def dead_letters(dsn: str, projection: str | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(
            queries()["dead_letters"], _checked({"projection": projection})
        ).fetchall()


def retry_dead_letter(dsn: str, dead_letter_id: int) -> str:
    """Apply a dead letter's event now; a Python processor's through its
    handler, in the transaction that marks it retried."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            processor.queries()["letter_projection"], {"id": dead_letter_id}
        ).fetchone()
    if row is None or row[1] != "python":
        return str(call_function(dsn, queries()["retry_dead_letter"], {"id": dead_letter_id}))
    _run_handler(
        dsn,
        row[2],
        processor.queries()["dead_letter_event"],
        {"id": dead_letter_id},
        processor.queries()["dead_letter_retried"],
    )
    return "retried"


def skip_dead_letter(dsn: str, dead_letter_id: int, note: str | None = None) -> str:
    params = {"id": dead_letter_id, "note": note}
    return str(call_function(dsn, queries()["skip_dead_letter"], params))
