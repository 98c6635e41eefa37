"""Shared pieces of the security tests: hostile names, a canary that notices
when anything outside the intended rows changes, and row snapshots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg

# Names an attacker (or a careless caller) might pass: SQL and PL/pgSQL
# breakouts, format() and psycopg placeholders, quotes of every kind, JSON
# look-alikes, Unicode look-alikes and invisible characters. All are valid
# stream ids, event types, idempotency keys and JSON strings (1 to 200
# characters, no control characters): the store must keep them verbatim.
HOSTILE: tuple[str, ...] = (
    "x'; DROP TABLE aura.events; --",
    "x'); DROP TABLE public.canary; --",
    '"; DROP SCHEMA aura CASCADE; --',
    "$$; DROP TABLE public.canary; $$",
    "$x$; DROP TABLE public.canary; --$x$",
    "'; SELECT pg_sleep(5); --",
    "' OR '1'='1",
    "'' OR 1=1 --",
    "\\'; DROP TABLE public.canary; --",
    "trailing backslash \\",
    "\\u0000 is six characters here",
    "\\\\u0000",
    "%I %L %s %1$s %% %",
    "%(stream_id)s %(events)s",
    "%s",
    "{0} {stream_id} {{}}",
    "E'\\x00'",
    "U&'\\0000'",
    "/* unterminated comment",
    "-- just a comment",
    ";",
    "'",
    '"',
    "`backtick`",
    "NULL",
    "null",
    "[]",
    '{"type": "x", "data": {}}',
    "a:b",
    "a:b:c",
    "aura.events",
    "pg_catalog.pg_class",
    "\u0430\u0443\u0440\u0430",  # Cyrillic look-alike of "aura"
    "\uff41\uff55\uff52\uff41",  # full-width
    "aura\u200b",  # zero-width space
    "e\u0301",  # combining accent
    "\u202eevil",  # right-to-left override
    "\u00a0nbsp",
    "\ufb01 \u01c5 \u00df \u0130 \u0131",  # ligature, titlecase, case-fold oddities
    "😀🔥 emoji",
    "\U0010fffd private use",
    "x" * 200,
    "'" * 200,
    '"' * 200,
    "$" * 200,
)

# Names that are not valid stream ids / types / keys: refused with a typed
# error before anything is written.
INVALID_NAMES: tuple[str, ...] = (
    "",
    "a\x00b",
    "\x00",
    "a\nb",
    "tab\there",
    "bell\x07",
    "del\x7f",
    "c1\x85",
    "lone surrogate \udcff",
    "\ud800",
    "x" * 256,
    "y" * 100_000,
)


def dumps_canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)


def json_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers compared as decimals (JSON has one
    number type; jsonb keeps 1e+23 as 100000000000000000000000)."""

    def canonical(value: Any) -> Any:
        return json.loads(
            json.dumps(value, allow_nan=False), parse_float=Decimal, parse_int=Decimal
        )

    return bool(canonical(a) == canonical(b))


@dataclass(frozen=True)
class Snapshot:
    """What must not change when a hostile name goes by: the database's
    structure (schemas, relations, columns, functions and their bodies,
    triggers, roles, settings) and the canary's rows."""

    structure: tuple[tuple[Any, ...], ...]
    canary: tuple[tuple[Any, ...], ...]


_STRUCTURE = """
SELECT 'schema', n.nspname, '', ''
FROM pg_namespace n
WHERE n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
UNION ALL
SELECT 'relation', n.nspname, c.relname, c.relkind::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname NOT LIKE '\\_timescaledb%'
UNION ALL
SELECT 'column', n.nspname, c.relname || '.' || a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped
  AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname NOT LIKE '\\_timescaledb%'
  AND n.nspname <> 'information_schema'
UNION ALL
SELECT 'function', n.nspname, p.oid::regprocedure::text, md5(p.prosrc)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE '\\_timescaledb%'
UNION ALL
SELECT 'trigger', c.relname, t.tgname, t.tgenabled::text
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE NOT t.tgisinternal
UNION ALL
SELECT 'role', r.rolname, r.rolsuper::text, r.rolcanlogin::text FROM pg_roles r
UNION ALL
SELECT 'setting', coalesce(s.setdatabase::text, ''), coalesce(s.setrole::text, ''),
       array_to_string(s.setconfig, ',')
FROM pg_db_role_setting s
UNION ALL
SELECT 'grant', n.nspname, c.relname, coalesce(c.relacl::text, '')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('aura', 'public')
ORDER BY 1, 2, 3, 4
"""


def create_canary(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.canary (id integer PRIMARY KEY, secret text NOT NULL)")
        conn.execute(
            "INSERT INTO public.canary VALUES (1, 'tweet'), (2, 'x''; DROP TABLE aura.events; --')"
        )
        conn.execute("CREATE SCHEMA canary_nest")
        conn.execute("CREATE TABLE canary_nest.eggs (n integer)")
        conn.execute("INSERT INTO canary_nest.eggs SELECT generate_series(1, 3)")


def snapshot(dsn: str) -> Snapshot:
    with psycopg.connect(dsn, autocommit=True) as conn:
        structure = tuple(tuple(row) for row in conn.execute(_STRUCTURE).fetchall())
        canary = tuple(
            tuple(row)
            for row in conn.execute(
                "SELECT 'canary', id::text, secret FROM public.canary "
                "UNION ALL SELECT 'eggs', n::text, '' FROM canary_nest.eggs ORDER BY 1, 2"
            ).fetchall()
        )
    return Snapshot(structure, canary)


def event_rows(dsn: str) -> list[tuple[Any, ...]]:
    """Every event and stream row, in a comparable form."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        events = conn.execute(
            "SELECT 'event', global_position, event_id::text, stream_id, version, type,"
            " data::text, metadata::text, idempotency_key FROM aura.events"
            " ORDER BY global_position"
        ).fetchall()
        streams = conn.execute(
            "SELECT 'stream', stream_id, version FROM aura.streams ORDER BY stream_id"
        ).fetchall()
    return [tuple(r) for r in events] + [tuple(r) for r in streams]


def counts(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    """Events, streams, and the sum of stream versions."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM aura.events), (SELECT count(*) FROM aura.streams),"
        " (SELECT coalesce(sum(version), 0) FROM aura.streams)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])
