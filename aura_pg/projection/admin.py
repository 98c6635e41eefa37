"""Operating projections: status, pause, resume, reset, replay and dead
letters. Each is a thin call of the SQL function of the same name, so psql
users and the CLI do the same thing."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from aura_pg.errors import ProjectionError
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


def pause(dsn: str, name: str) -> str:
    return str(call_function(dsn, queries()["pause"], {"name": name}))


def resume(dsn: str, name: str) -> str:
    return str(call_function(dsn, queries()["resume"], {"name": name}))


def reset(dsn: str, name: str) -> str:
    return str(call_function(dsn, queries()["reset"], {"name": name}))


def replay_stream(dsn: str, name: str, stream_id: str, from_version: int = 1) -> int:
    return int(
        call_function(
            dsn,
            queries()["replay_stream"],
            {"name": name, "stream_id": stream_id, "from_version": from_version},
        )
    )


def dead_letters(dsn: str, projection: str | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(
            queries()["dead_letters"], _checked({"projection": projection})
        ).fetchall()


def retry_dead_letter(dsn: str, dead_letter_id: int) -> str:
    return str(call_function(dsn, queries()["retry_dead_letter"], {"id": dead_letter_id}))


def skip_dead_letter(dsn: str, dead_letter_id: int, note: str | None = None) -> str:
    params = {"id": dead_letter_id, "note": note}
    return str(call_function(dsn, queries()["skip_dead_letter"], params))
