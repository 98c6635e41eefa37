"""Migrations: alembic runs each revision's frozen SQL; the chain, the psql
manifest of the current schema (sql/install.sql) and the DBA's printed SQL
all build the same schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from aura_pg import EventStore, MigrationError, NewEvent, migrate
from aura_pg.projection.registration import register_projections
from tests.helpers.projections import fixture_catalog

REPO_ROOT = Path(__file__).resolve().parents[2]

CATALOG_QUERY = """
SELECT 'column', c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
       || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
       || CASE WHEN a.attidentity <> '' THEN ' identity ' || a.attidentity::text ELSE '' END
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE n.nspname = 'aura' AND a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'v', 'p') AND c.relname <> 'alembic_version'
UNION ALL
SELECT 'constraint', conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'aura'::regnamespace
  AND conrelid <> coalesce(to_regclass('aura.alembic_version'), 0)
UNION ALL
SELECT 'index', pg_get_indexdef(i.indexrelid)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE c.relnamespace = 'aura'::regnamespace AND c.relname <> 'alembic_version_pkc'
UNION ALL
SELECT 'function', p.oid::regprocedure || ' ' || md5(pg_get_functiondef(p.oid))
FROM pg_proc p WHERE p.pronamespace = 'aura'::regnamespace
UNION ALL
SELECT 'trigger', pg_get_triggerdef(t.oid)
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relnamespace = 'aura'::regnamespace AND NOT t.tgisinternal
UNION ALL
SELECT 'view', c.relname || ' ' || md5(pg_get_viewdef(c.oid))
FROM pg_class c WHERE c.relnamespace = 'aura'::regnamespace AND c.relkind = 'v'
UNION ALL
SELECT 'comment', coalesce(obj_description(c.oid), '') || ' on ' || c.relname
FROM pg_class c WHERE c.relnamespace = 'aura'::regnamespace AND c.relkind IN ('r', 'v')
  AND c.relname <> 'alembic_version'
UNION ALL
SELECT 'owner and privileges', 'schema ' || n.nspname || ' ' || pg_get_userbyid(n.nspowner)
       || ' ' || coalesce(n.nspacl::text, '')
FROM pg_namespace n WHERE n.nspname = 'aura'
UNION ALL
SELECT 'owner and privileges', c.relname || ' ' || pg_get_userbyid(c.relowner)
       || ' ' || coalesce(c.relacl::text, '')
FROM pg_class c WHERE c.relnamespace = 'aura'::regnamespace
  AND c.relname NOT IN ('alembic_version', 'alembic_version_pkc')
UNION ALL
SELECT 'owner and privileges', p.oid::regprocedure || ' ' || pg_get_userbyid(p.proowner)
       || ' ' || coalesce(p.proacl::text, '')
FROM pg_proc p WHERE p.pronamespace = 'aura'::regnamespace
UNION ALL
SELECT 'default privileges', pg_get_userbyid(a.defaclrole) || ' '
       || a.defaclnamespace::regnamespace::text || ' ' || a.defaclobjtype::text
       || ' ' || a.defaclacl::text
FROM pg_default_acl a
ORDER BY 1, 2
"""


def catalog(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(CATALOG_QUERY).fetchall()


def psql(dsn: str, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-q", dsn, *args],
        input=script, capture_output=True, text=True, check=True,
    )  # fmt: skip


def test_migrate_brings_an_empty_database_to_head(empty_dsn: str) -> None:
    assert migrate.current_revision(empty_dsn) is None
    with pytest.raises(MigrationError, match="run `aura-pg migrate`"):
        migrate.check_current(empty_dsn)
    migrate.upgrade(empty_dsn)
    assert migrate.current_revision(empty_dsn) == migrate.head_revision()
    migrate.check_current(empty_dsn)
    before = catalog(empty_dsn)
    migrate.upgrade(empty_dsn)  # nothing left to do
    assert catalog(empty_dsn) == before


def test_migration_chain_psql_manifest_and_printed_sql_build_the_same_schema(
    dsn: str, empty_dsn: str, pg_server: Any
) -> None:
    migrated = catalog(dsn)
    assert len(migrated) > 30
    owned = [row[1] for row in migrated if row[0] == "owner and privileges"]
    assert any(o.startswith("schema aura aura_owner ") for o in owned)
    assert any(o.startswith("events aura_owner {aura_owner=") for o in owned)
    psql(empty_dsn, "-f", str(REPO_ROOT / "sql" / "install.sql"))
    assert catalog(empty_dsn) == migrated

    printed = migrate.upgrade_sql()
    name = "aura_printed_sql"
    admin = f"host={pg_server.host} port={pg_server.port} user={pg_server.user} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")  # type: ignore[arg-type]
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    target = admin.replace("dbname=postgres", f"dbname={name}")
    try:
        # On standard input: the script is longer than an argument may be.
        psql(target, "-f", "-", script=printed)
        assert catalog(target) == migrated
        assert migrate.current_revision(target) == migrate.head_revision()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")  # type: ignore[arg-type]


def test_concurrent_migrations_queue_instead_of_failing(empty_dsn: str) -> None:
    # Separate processes, as when several deploys start at once.
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "aura_pg.cli", "migrate", "--dsn", empty_dsn],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outcomes = [(run.communicate(timeout=120), run.returncode) for run in runs]
    assert [code for _, code in outcomes] == [0] * 4, outcomes
    assert migrate.current_revision(empty_dsn) == migrate.head_revision()


def test_printed_sql_is_one_transaction_with_the_version_row() -> None:
    printed = migrate.upgrade_sql()
    assert printed.lstrip().startswith("BEGIN;")
    assert printed.rstrip().endswith("COMMIT;")
    assert "CREATE OR REPLACE FUNCTION aura.append_events" in printed
    assert "INSERT INTO aura.alembic_version (version_num) VALUES ('0001')" in printed
    assert "CREATE OR REPLACE FUNCTION aura.project_batch" in printed
    assert f"SET version_num='{migrate.head_revision()}'" in printed


async def test_upgrading_from_0005_gives_existing_read_models_their_own_roles(
    empty_dsn: str,
) -> None:
    """A database at 0005 with a read model and projected events: 0006 hands
    the schema and its objects to the read model's role, makes the handlers
    run as it, and the projection carries on from its checkpoint."""
    migrate.upgrade(empty_dsn, "0005")
    async with await psycopg.AsyncConnection.connect(empty_dsn, autocommit=True) as conn:
        await register_projections(conn, fixture_catalog().select(["tally_set"]))
    with EventStore.connect(empty_dsn, max_size=1) as store:
        store.append("s-1", [NewEvent("A", {}), NewEvent("B", {})])
        project = "SELECT applied FROM aura.project_batch('tally_set', %s, %s)"
        ownership = (
            "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c"
            " WHERE c.relnamespace = 'tally_set'::regnamespace AND c.relkind IN ('r', 'S')"
            " UNION SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'tally_set'"
        )
        handlers = (
            "SELECT p.proname, p.prosecdef, pg_get_userbyid(p.proowner) FROM pg_proc p"
            " WHERE p.pronamespace = 'tally_set'::regnamespace"
            "   AND p.proname IN"
            "       ('apply_batch', 'forget_stream', 'check_event', 'aura_run_handler')"
            " ORDER BY 1"
        )
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            assert conn.execute(project, ("0", 0)).fetchone() == (2,)
            # Created by the migrating superuser, so it is the owner at 0005.
            assert conn.execute(ownership).fetchall() == [(conninfo_to_dict(empty_dsn)["user"],)]

        migrate.upgrade(empty_dsn)
        role = "aura_projector/tally_set"  # <projector role>/<schema> since 0009
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            assert conn.execute(ownership).fetchall() == [(role,)]
            assert conn.execute(handlers).fetchall() == [
                ("apply_batch", False, role),
                ("aura_run_handler", True, role),  # runs apply_batch as the role
                ("check_event", False, role),
                ("forget_stream", True, role),
            ]
            store.append("s-1", [NewEvent("C", {})])
            ((tx, pos),) = conn.execute(
                "SELECT transaction_id, global_position FROM aura.projection_checkpoints"
                " WHERE name = 'tally_set'"
            ).fetchall()
            assert conn.execute(project, (tx, pos)).fetchone() == (1,)
            counted = conn.execute("SELECT events FROM tally_set.streams").fetchall()
            assert counted == [(3,)]


READ_MODEL_OWNERS = """
SELECT pg_get_userbyid(n.nspowner) FROM pg_namespace n WHERE n.nspname = %(s)s
UNION SELECT pg_get_userbyid(c.relowner) FROM pg_class c WHERE c.relnamespace = %(s)s::regnamespace
UNION SELECT pg_get_userbyid(p.proowner) FROM pg_proc p WHERE p.pronamespace = %(s)s::regnamespace
"""


async def test_upgrading_from_0008_gives_each_read_model_schema_a_role_of_its_own_name(
    empty_dsn: str,
) -> None:
    """A database at 0008 where a read model, its shadow and the schema a
    rebuild kept all belong to the pre-0009 role <projector>_<schema>: 0009
    gives each schema the role <projector>/<schema>, drops the old role, and
    the projections carry on from their checkpoints."""
    old_role = "aura_projector_tally_set"
    schemas = ("tally_set", "tally_set__previous", "tally_set__shadow")
    spec = fixture_catalog().get("tally_set")
    migrate.upgrade(empty_dsn, "0008")
    async with await psycopg.AsyncConnection.connect(empty_dsn, autocommit=True) as conn:
        await register_projections(conn, [spec])
    with EventStore.connect(empty_dsn, max_size=1) as store:
        store.append("s-1", [NewEvent("A", {}), NewEvent("B", {})])
    try:
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            conn.execute("SELECT aura.begin_rebuild('tally_set')")
            conn.execute("SELECT aura.finish_rebuild('tally_set')")  # keeps tally_set__previous
            conn.execute(
                "SELECT aura.begin_shadow('tally_set', %s, 'apply_batch', 'set_based', NULL,"
                " 'forget_stream')",
                (spec.definition_sql + "-- version 2\n",),
            )
            # Revisions before 0009 were frozen from the files of 0009's
            # time: hand the schemas to one role the way the 0006 release's
            # read_model_role named and marked it.
            if not conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (old_role,)
            ).fetchone():
                conn.execute(f"CREATE ROLE {old_role} NOLOGIN")  # (the release made it)
            conn.execute(f"COMMENT ON ROLE {old_role} IS 'aura-pg read model role'")
            conn.execute(f"GRANT aura_handler TO {old_role}")
            conn.execute(f"GRANT {old_role} TO aura_projector")
            for schema in schemas:
                conn.execute("SELECT aura.give_read_model(%s, %s)", (schema, old_role))
            conn.execute(
                f"ALTER DEFAULT PRIVILEGES FOR ROLE {old_role}"
                " GRANT SELECT ON TABLES TO aura_reader"
            )
            for schema in schemas:
                assert conn.execute(READ_MODEL_OWNERS, {"s": schema}).fetchall() == [(old_role,)]

        migrate.upgrade(empty_dsn)
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            for schema in schemas:
                owners = conn.execute(READ_MODEL_OWNERS, {"s": schema}).fetchall()
                assert owners == [(f"aura_projector/{schema}",)], schema
            assert conn.execute(
                "SELECT count(*) FROM pg_roles WHERE rolname = %s", (old_role,)
            ).fetchone() == (0,)
            store_ = EventStore.connect(empty_dsn, max_size=1)
            with store_:
                store_.append("s-1", [NewEvent("C", {})])
            for name, applied in (("tally_set", 1), ("tally_set__shadow", 3)):
                ((tx, pos),) = conn.execute(
                    "SELECT transaction_id, global_position FROM aura.projection_checkpoints"
                    " WHERE name = %s",
                    (name,),
                ).fetchall()
                batch = conn.execute(
                    "SELECT applied FROM aura.project_batch(%s, %s, %s)", (name, tx, pos)
                )
                assert batch.fetchone() == (applied,), name
            assert conn.execute("SELECT events FROM tally_set.streams").fetchall() == [(3,)]
            assert conn.execute("SELECT events FROM tally_set__shadow.streams").fetchall() == [(3,)]
    finally:
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (old_role,)).fetchone():
                conn.execute(f"DROP OWNED BY {old_role}")
                conn.execute(f"DROP ROLE {old_role}")


def test_upgrading_rehashes_the_keys_of_stream_ids_with_colons(empty_dsn: str) -> None:
    """Before 0006 'a:b' + key 'c' and 'a' + key 'b:c' shared a hash. After
    the upgrade a resend of an event recorded at 0005 is still answered as
    a duplicate, and the other stream's key is its own."""
    migrate.upgrade(empty_dsn, "0005")
    with EventStore.connect(empty_dsn, max_size=1) as store:
        first = store.append("a:b", [NewEvent("T", {"x": 1}, idempotency_key="c")])
        plain = store.append("plain", [NewEvent("T", {}, idempotency_key="k")])
        # Revisions before 0009 were frozen from the files of 0009's time,
        # so write the hash as a release before 0006 did:
        # sha256(stream_id || ':' || key).
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE aura.events DISABLE TRIGGER events_refuse_update_delete")
            conn.execute(
                "UPDATE aura.events SET idempotency_hash ="
                " sha256(convert_to(stream_id || ':' || idempotency_key, 'UTF8'))"
            )
            conn.execute("ALTER TABLE aura.events ENABLE TRIGGER events_refuse_update_delete")
        migrate.upgrade(empty_dsn)
        resent = store.append("a:b", [NewEvent("T", {"x": 1}, idempotency_key="c")])
        assert resent.duplicate and resent.events == first.events
        assert store.append("plain", [NewEvent("T", {}, idempotency_key="k")]).duplicate
        assert plain.events[0].version == 1
        other = store.append("a", [NewEvent("T", {"x": 1}, idempotency_key="b:c")])
        assert not other.duplicate
        assert [e.idempotency_key for e in store.read_stream("a")] == ["b:c"]


async def test_upgrading_from_0009_clears_the_error_of_a_projection_once_it_recovers(
    empty_dsn: str,
) -> None:
    """A database at 0009 with a read model whose last batch failed: after
    the upgrade the failure still shows, and the next applied batch clears
    it (at 0009 it stayed for good)."""
    migrate.upgrade(empty_dsn, "0009")
    async with await psycopg.AsyncConnection.connect(empty_dsn, autocommit=True) as conn:
        await register_projections(conn, fixture_catalog().select(["tally_set"]))
    with EventStore.connect(empty_dsn, max_size=1) as store:
        store.append("s-1", [NewEvent("A", {}), NewEvent("B", {})])
    status = "SELECT consecutive_failures, last_error FROM aura.projection_status"
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT aura.record_projection_failure('tally_set', '0', 0, NULL, 'boom', 'XX000')"
        )
        migrate.upgrade(empty_dsn)
        assert conn.execute(status).fetchall() == [(1, "XX000: boom")]
        project = "SELECT applied FROM aura.project_batch('tally_set', '0', 0)"
        assert conn.execute(project).fetchone() == (2,)
        assert conn.execute(status).fetchall() == [(0, None)]
        counted = conn.execute("SELECT events FROM tally_set.streams").fetchall()
        assert counted == [(2,)]


@pytest.mark.parametrize("revision", migrate.known_revisions()[:-1])
def test_upgrading_from_each_revision_with_events_builds_the_current_schema(
    empty_dsn: str, dsn: str, revision: str
) -> None:
    """From every earlier revision, with events recorded there, the upgrade
    ends at the catalog of a fresh database, and the events stay what they
    were (a resend is still a duplicate)."""
    migrate.upgrade(empty_dsn, revision)
    with EventStore.connect(empty_dsn, max_size=1) as store:
        first = store.append("a:b", [NewEvent("T", {"x": 1}, idempotency_key="c")])
        store.append("plain", [NewEvent("T", {}), NewEvent("U", {})])
    migrate.upgrade(empty_dsn)
    assert migrate.current_revision(empty_dsn) == migrate.head_revision()
    assert catalog(empty_dsn) == catalog(dsn)
    with EventStore.connect(empty_dsn, max_size=1) as store:
        resent = store.append("a:b", [NewEvent("T", {"x": 1}, idempotency_key="c")])
        assert resent.duplicate and resent.events == first.events
        assert [e.type for e in store.read_stream("plain")] == ["T", "U"]
