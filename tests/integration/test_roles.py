"""Least-privilege roles (migration 0005), enforced by the database: login
users in each group role try what their duty allows and what it does not.

Every refusal is checked as InsufficientPrivilege (42501), never as the
append-only trigger's AU004, so granting a role too much makes the check
fail; test_every_refusal_is_a_privilege_check proves that by granting the
login users everything and running the same statements again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aura_pg import EventStore, NewEvent, StreamAppend, migrate
from aura_pg._resources import named_queries
from aura_pg.errors import MigrationError
from aura_pg.observability import metrics
from tests.helpers.projections import (
    applied_positions,
    caught_up,
    log_positions,
    query,
    running_daemon,
    status_of,
    wait_for,
)

KINDS = ("owner", "writer", "projector", "reader")

# A projection whose handler tries to write the log.
SNEAKY_DEFINITION = """
CREATE TABLE seen (global_position bigint PRIMARY KEY);
CREATE FUNCTION apply_event(e aura.events) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seen VALUES (e.global_position);
    EXECUTE (SELECT statement FROM aura_sneaky_statement);
END;
$$;
"""

WRITES_OF_THE_LOG = [
    "INSERT INTO aura.events (event_id, stream_id, version, type, data, idempotency_key,"
    " idempotency_hash) VALUES (gen_random_uuid(), 'x', 1, 'T', '{}', 'k', sha256('k'))",
    "UPDATE aura.events SET type = 'changed'",
    "DELETE FROM aura.events",
    "TRUNCATE aura.events",
]
DDL_ON_THE_LOG = [
    "ALTER TABLE aura.events ADD COLUMN sneaky text",
    "ALTER TABLE aura.events DISABLE TRIGGER USER",
    "DROP TRIGGER events_refuse_update_delete ON aura.events",
    "CREATE TRIGGER sneaky AFTER INSERT ON aura.events"
    " FOR EACH STATEMENT EXECUTE FUNCTION aura.notify_events()",
    "DROP TABLE aura.events CASCADE",
    "CREATE OR REPLACE FUNCTION aura.stream_version(p_stream_id text) RETURNS bigint"
    " LANGUAGE sql AS 'SELECT 0::bigint'",
]
PROJECTION_WRITES = [
    "UPDATE aura.projection_checkpoints SET global_position = 0",
    "DELETE FROM aura.dead_letters",
    "INSERT INTO aura.outbox (sink, topic, message_id, payload) "
    "VALUES ('webhook', 't', gen_random_uuid(), '{}')",
    "SELECT * FROM aura.project_batch('tally_set', '0', 0)",
    "SELECT aura.reset_projection('tally_set')",
    "SELECT aura.publish_to_outbox('webhook', 't', gen_random_uuid(), '{}')",
]
READ_MODEL_WRITES = [
    "INSERT INTO tally_set.streams VALUES ('x', 1, 1)",
    "UPDATE tally_set.streams SET events = 0",
    "DELETE FROM tally_set.applied_events",
    "TRUNCATE tally_set.applied_events",
    "SELECT tally_set.forget_stream('s-1')",
]

BULK_APPEND = (
    "SELECT * FROM aura.append_many(ARRAY['b-1'], ARRAY['any'],"
    ' ARRAY[\'[{"type": "T", "data": {}}]\'::jsonb])'
)

DENIED: dict[str, list[str]] = {
    "writer": WRITES_OF_THE_LOG + DDL_ON_THE_LOG + PROJECTION_WRITES + READ_MODEL_WRITES
    + ["SELECT count(*) FROM tally_set.streams"],
    "reader": WRITES_OF_THE_LOG + DDL_ON_THE_LOG + PROJECTION_WRITES + READ_MODEL_WRITES
    + [
        "SELECT * FROM aura.append_events('r-1', '[{\"type\": \"T\", \"data\": {}}]')",
        BULK_APPEND,
        "SELECT count(*) FROM aura.events",
        "SELECT count(*) FROM aura.projection_checkpoints",
    ],
    "projector": WRITES_OF_THE_LOG + DDL_ON_THE_LOG + [
        "SELECT * FROM aura.append_events('p-1', '[{\"type\": \"T\", \"data\": {}}]')",
        BULK_APPEND,
        "SELECT aura.add_outbox_route('sneaky', 'webhook', 't')",
    ],
}  # fmt: skip


@dataclass
class Logins:
    """Login users in the group roles, with their connection strings."""

    groups: dict[str, str]
    users: dict[str, str]
    dsns: dict[str, str]


def group_roles(dsn: str) -> dict[str, str]:
    return dict(query(dsn, "SELECT kind, role_name FROM aura.role_names"))


def database_of(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


@pytest.fixture
def logins(dsn: str) -> Iterator[Logins]:
    groups = group_roles(dsn)
    assert sorted(groups) == sorted([*KINDS, "handler"])
    suffix = uuid.uuid4().hex[:8]
    users = {kind: f"t_{kind}_{suffix}" for kind in KINDS}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for kind in KINDS:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(users[kind]), sql.Identifier(groups[kind])
                )
            )
        # A projector login acts as its group, so that the read models it
        # creates belong to the group (docs/operators.md).
        conn.execute(
            sql.SQL("ALTER ROLE {} SET role = {}").format(
                sql.Identifier(users["projector"]), sql.Literal(groups["projector"])
            )
        )
        # Test databases are clones of a migrated template, and a clone does
        # not inherit database privileges: grant what the migration grants.
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(database_of(dsn)), sql.Identifier(groups["projector"])
            )
        )
    try:
        yield Logins(groups, users, {k: make_conninfo(dsn, user=u) for k, u in users.items()})
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for user in users.values():
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (user,),
                )
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(user)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(user)))


@pytest.fixture
async def read_model(logins: Logins, dsn: str) -> Logins:
    """tally_set, registered and caught up by a daemon running as the projector login."""
    with EventStore.connect(logins.dsns["writer"]) as store:
        for n in range(6):
            store.append(f"s-{n % 2}", [NewEvent("A", {"n": n})])
    async with running_daemon(logins.dsns["projector"], ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    return logins


def assert_denied(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute(statement)  # type: ignore[arg-type]


async def test_writer_appends_and_reads_through_the_store(read_model: Logins, dsn: str) -> None:
    with EventStore.connect(read_model.dsns["writer"]) as store:
        store.append("w-1", [NewEvent("A", {"n": 1}), NewEvent("B", {"n": 2})])
        assert [e.type for e in store.read_stream("w-1")] == ["A", "B"]
        assert store.stream_version("w-1") == 2
    with psycopg.connect(read_model.dsns["writer"]) as conn:
        assert conn.execute("SELECT count(*) FROM aura.events").fetchone() == (8,)
        assert conn.execute("SELECT count(*) FROM aura.read_all('0', 0, NULL)").fetchone() == (8,)
        assert conn.execute("SELECT current_user").fetchone() == (read_model.users["writer"],)


async def test_writer_bulk_appends_through_the_store(read_model: Logins, dsn: str) -> None:
    """The staging table is the writer's own (TEMP on the database), the
    append runs as the owner."""
    with EventStore.connect(read_model.dsns["writer"]) as store:
        appends = [StreamAppend(f"bulk-{n}", [NewEvent("A", {"n": n})]) for n in range(3)]
        results = store.append_many(appends)
        assert [r.version for r in results] == [1, 1, 1]
        assert all(r.duplicate for r in store.append_many(appends))
    bulk = query(dsn, "SELECT count(*) FROM aura.events WHERE left(stream_id, 5) = 'bulk-'")
    assert bulk == [(3,)]


@pytest.mark.parametrize("kind", ["writer", "reader", "projector"])
async def test_each_role_is_refused_what_its_duty_does_not_need(
    read_model: Logins, kind: str
) -> None:
    for statement in DENIED[kind]:
        assert_denied(read_model.dsns[kind], statement)


async def test_reader_reads_read_models_and_operator_views(read_model: Logins, dsn: str) -> None:
    with psycopg.connect(read_model.dsns["reader"]) as conn:
        assert conn.execute("SELECT sum(events) FROM tally_set.streams").fetchone() == (6,)
        status = conn.execute(
            "SELECT name, events_applied, events_behind FROM aura.projection_status"
        ).fetchall()
        assert status == [("tally_set", 6, 0)]
        for view in ("pending_dead_letters", "outbox_status", "read_horizon_status"):
            conn.execute(sql.SQL("SELECT * FROM aura.{}").format(sql.Identifier(view)))


async def test_only_the_owner_may_alter_the_log(read_model: Logins) -> None:
    owner = read_model.dsns["owner"]
    for statement in DDL_ON_THE_LOG[:2]:
        with psycopg.connect(owner) as conn:
            conn.execute(statement)  # type: ignore[arg-type]
            conn.rollback()
    # The owner passes the privilege check; the append-only trigger still refuses.
    with psycopg.connect(owner) as conn:
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("TRUNCATE aura.events")
        assert refused.value.sqlstate == "AU004"


async def test_projector_daemon_runs_a_projection_end_to_end(read_model: Logins, dsn: str) -> None:
    with EventStore.connect(read_model.dsns["writer"]) as store:
        for n in range(20):
            store.append(f"late-{n % 3}", [NewEvent("B", {"n": n})])
    projector = read_model.dsns["projector"]
    async with running_daemon(projector, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    assert applied_positions(dsn, "tally_set") == log_positions(dsn)
    assert status_of(dsn, "tally_set")["events_applied"] == 26
    # The read model belongs to its own role, of which the projector group
    # is a member, so any projector login may reset it.
    owner = query(
        dsn, "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'tally_set'"
    )
    assert owner == [(f"{read_model.groups['projector']}/tally_set",)]
    with psycopg.connect(projector, autocommit=True) as conn:
        conn.execute("SELECT aura.reset_projection('tally_set')")
        conn.execute("SELECT aura.begin_rebuild('tally_set')")
        conn.execute("SELECT aura.finish_rebuild('tally_set')")
    assert applied_positions(dsn, "tally_set") == log_positions(dsn)
    with psycopg.connect(read_model.dsns["reader"]) as conn:
        assert conn.execute("SELECT sum(events) FROM tally_set.streams").fetchone() == (26,)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO aura.events (event_id, stream_id, version, type, data, idempotency_key,"
        " idempotency_hash) VALUES (gen_random_uuid(), 'h', 1, 'T', '{}', 'k', sha256('k'))",
        'SELECT aura.append_events(\'h\', \'[{"type": "T", "data": {}}]\')',
        "ALTER TABLE aura.events DISABLE TRIGGER USER",
    ],
)
async def test_a_handler_cannot_write_the_log(read_model: Logins, dsn: str, statement: str) -> None:
    projector = read_model.dsns["projector"]
    with psycopg.connect(projector, autocommit=True) as conn:
        conn.execute(
            "SELECT aura.register_projection('sneaky', '', 'sneaky', 'apply_event', 'per_event',"
            " NULL, NULL, %s, 10, 0, 10, 10, 5, 30)",
            (SNEAKY_DEFINITION.replace("aura_sneaky_statement", "sneaky.statement"),),
        )
    with psycopg.connect(dsn, autocommit=True) as conn:  # the test's own table
        conn.execute("CREATE TABLE sneaky.statement (statement text)")
        conn.execute("INSERT INTO sneaky.statement VALUES (%s)", (statement,))
        conn.execute("GRANT SELECT ON sneaky.statement TO PUBLIC")
    with (
        psycopg.connect(projector, autocommit=True) as conn,
        pytest.raises(errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT * FROM aura.project_batch('sneaky', '0', 0)")
    # The same handler with a harmless statement applies: the refusal is
    # the privilege, not the handler.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE sneaky.statement SET statement = 'SELECT 1'")
    with psycopg.connect(projector, autocommit=True) as conn:
        applied = conn.execute("SELECT applied FROM aura.project_batch('sneaky', '0', 0)")
        assert applied.fetchone() == (6,)


# What a handler must not do outside its own schema (migration 0006).
OUTSIDE_ITS_SCHEMA = [
    "INSERT INTO tally_set.streams VALUES ('x', 1, 1)",
    "DELETE FROM tally_set.applied_events",
    "DROP SCHEMA tally_set CASCADE",
    "UPDATE aura.projection_checkpoints SET global_position = 0",
    "DELETE FROM aura.dead_letters",
    "INSERT INTO aura.outbox (sink, topic, message_id, payload) "
    "VALUES ('webhook', 't', gen_random_uuid(), '{}')",
    "SELECT aura.reset_projection('tally_set')",
    "CREATE TABLE public.sneaky (x int)",
    "CREATE SCHEMA sneaky_elsewhere",
    # Taking the caller's rights back.
    "SET ROLE NONE",
    "RESET ROLE",
    "SELECT set_config('role', 'aura_projector', true)",
    "SET SESSION AUTHORIZATION DEFAULT",
]
# ... and what it may.
WITHIN_ITS_RIGHTS = [
    "INSERT INTO seen VALUES (-1) ON CONFLICT DO NOTHING",
    "CREATE TABLE IF NOT EXISTS sneaky.partition_2026 (x int)",
    "SELECT count(*) FROM tally_set.streams",
    "SELECT aura.publish_to_outbox('webhook', 't', gen_random_uuid(), '{}')",
]


def register_sneaky(projector_dsn: str, dsn: str, statement: str) -> None:
    """The projection 'sneaky', whose handler runs `statement` (kept in a
    table the test owns, so that each case reuses one definition)."""
    with psycopg.connect(projector_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT aura.register_projection('sneaky', '', 'sneaky', 'apply_event', 'per_event',"
            " NULL, NULL, %s, 10, 0, 10, 10, 5, 30)",
            (SNEAKY_DEFINITION.replace("aura_sneaky_statement", "public.sneaky_statement"),),
        )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.sneaky_statement (statement text)")
        conn.execute("DELETE FROM public.sneaky_statement")
        conn.execute("INSERT INTO public.sneaky_statement VALUES (%s)", (statement,))
        conn.execute("GRANT SELECT ON public.sneaky_statement TO PUBLIC")


@pytest.mark.parametrize("statement", OUTSIDE_ITS_SCHEMA)
@pytest.mark.parametrize("daemon_user", ["superuser", "projector"])
async def test_a_handler_cannot_write_outside_its_schema(
    read_model: Logins, dsn: str, statement: str, daemon_user: str
) -> None:
    """Even a daemon connected as a superuser runs handlers as the read
    model's own role, which cannot take the caller's rights back."""
    caller = dsn if daemon_user == "superuser" else read_model.dsns["projector"]
    register_sneaky(read_model.dsns["projector"], dsn, statement)
    before = query(dsn, "SELECT sum(events) FROM tally_set.streams")
    with (
        psycopg.connect(caller, autocommit=True) as conn,
        pytest.raises(errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT * FROM aura.project_batch('sneaky', '0', 0)")
    assert query(dsn, "SELECT sum(events) FROM tally_set.streams") == before
    assert status_of(dsn, "sneaky")["events_applied"] == 0
    if daemon_user == "superuser" and not statement.startswith(("SET", "RESET", "SELECT set_")):
        # The same statement in the same session outside a handler passes
        # the privilege checks: the refusal is the handler's role.
        with psycopg.connect(caller) as conn:
            conn.execute(statement)  # type: ignore[arg-type]
            conn.rollback()


@pytest.mark.parametrize("statement", WITHIN_ITS_RIGHTS)
async def test_a_handler_writes_its_schema_reads_others_and_publishes(
    read_model: Logins, dsn: str, statement: str
) -> None:
    register_sneaky(read_model.dsns["projector"], dsn, statement)
    with psycopg.connect(dsn, autocommit=True) as conn:
        applied = conn.execute("SELECT applied FROM aura.project_batch('sneaky', '0', 0)")
        assert applied.fetchone() == (6,)
    roles = query(
        dsn,
        "SELECT pg_get_userbyid(n.nspowner), p.proname, pg_get_userbyid(p.proowner), p.prosecdef"
        " FROM pg_namespace n JOIN pg_proc p ON p.pronamespace = n.oid"
        " WHERE n.nspname = 'sneaky' ORDER BY p.proname",
    )
    own_role = f"{read_model.groups['projector']}/sneaky"
    assert roles == [
        (own_role, "apply_event", own_role, False),
        (own_role, "aura_run_handler", own_role, True),
    ]


def test_a_read_model_role_name_taken_by_another_role_is_refused(dsn: str) -> None:
    """aura.read_model_role hands out only roles it created: a login role
    (or a group role) with the name a read model would get is refused."""
    groups = group_roles(dsn)
    taken = f"{groups['projector']}/taken"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(taken)))
        try:
            with pytest.raises(psycopg.Error, match="is not an aura-pg read model role"):
                conn.execute("SELECT aura.read_model_role('taken')")
            assert not conn.execute(
                "SELECT pg_has_role(%s, %s, 'MEMBER')", (groups["projector"], taken)
            ).fetchone()[0]  # type: ignore[index]
        finally:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(taken)))


def test_a_handler_role_holding_more_than_reading_is_refused(dsn: str) -> None:
    """aura.role_names is the owner role's table; the function that creates
    read model roles runs as the migrating role and refuses to hand out a
    handler group that could write anything, run programs or act as owner."""
    groups = group_roles(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for grant in ("pg_write_all_data", "pg_execute_server_program", groups["owner"]):
            conn.execute(
                sql.SQL("GRANT {} TO {}").format(
                    sql.Identifier(grant), sql.Identifier(groups["handler"])
                )
            )
            try:
                with pytest.raises(psycopg.Error, match="holds more than reading"):
                    conn.execute("SELECT aura.read_model_role('greedy')")
            finally:
                conn.execute(
                    sql.SQL("REVOKE {} FROM {}").format(
                        sql.Identifier(grant), sql.Identifier(groups["handler"])
                    )
                )
        assert conn.execute("SELECT aura.read_model_role('greedy')").fetchone() == (
            f"{groups['projector']}/greedy",
        )


async def test_every_refusal_is_a_privilege_check(read_model: Logins, dsn: str) -> None:
    """Granted everything, the same statements pass the privilege checks:
    each refusal above is the grants' doing, and would fail if a role held
    too much."""
    groups, users = read_model.groups, read_model.users
    with psycopg.connect(dsn, autocommit=True) as conn:
        for kind in ("writer", "reader", "projector"):
            conn.execute(
                sql.SQL("GRANT {}, {} TO {}").format(
                    sql.Identifier(groups["owner"]),
                    sql.Identifier(groups["projector"]),
                    sql.Identifier(users[kind]),
                )
            )
        conn.execute(sql.SQL("ALTER ROLE {} RESET role").format(sql.Identifier(users["projector"])))
    for kind in ("writer", "reader", "projector"):
        for statement in DENIED[kind]:
            with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
                assert_denied_or_other_error(read_model.dsns[kind], statement)


def assert_denied_or_other_error(dsn: str, statement: str) -> None:
    """assert_denied, except that errors other than a privilege check count
    as 'did not raise' too (the statement got past the privileges)."""
    with psycopg.connect(dsn) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            try:
                conn.execute(statement)  # type: ignore[arg-type]
            except errors.InsufficientPrivilege:
                raise
            except psycopg.Error:
                pass
        conn.rollback()


def test_role_names_come_from_settings(empty_dsn: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"Custom {kind} {suffix}" for kind in KINDS}  # quoting needed
    options = " ".join(
        f"-c aura.{kind}_role={name.replace(' ', chr(92) + ' ')}" for kind, name in names.items()
    )
    try:
        migrate.upgrade(make_conninfo(empty_dsn, options=options))
        assert group_roles(empty_dsn) == {**names, "handler": "aura_handler"}
        checks = query(
            empty_dsn,
            "SELECT pg_get_userbyid(relowner), has_table_privilege(%s, 'aura.events', 'SELECT'),"
            " has_function_privilege(%s, 'aura.append_events(text, jsonb, text)', 'EXECUTE'),"
            " has_function_privilege(%s, 'aura.append_events(text, jsonb, text)', 'EXECUTE'),"
            " has_table_privilege('aura_writer', 'aura.events', 'SELECT')"
            " FROM pg_class WHERE oid = 'aura.events'::regclass",
            (names["reader"], names["writer"], names["reader"]),
        )
        assert checks == [(names["owner"], False, True, False, False)]
    finally:
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS aura CASCADE")
            for name in names.values():
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_a_superuser_is_refused_as_a_group_role(empty_dsn: str) -> None:
    superuser = str(conninfo_to_dict(empty_dsn)["user"])
    with pytest.raises((MigrationError, psycopg.Error), match="superuser"):
        migrate.upgrade(make_conninfo(empty_dsn, options=f"-c aura.reader_role={superuser}"))


@pytest.mark.parametrize("kind", ["writer", "reader", "projector"])
async def test_metrics_and_readiness_as_each_role(read_model: Logins, kind: str) -> None:
    """A daemon serving /metrics as a least-privilege role (the importer as
    the writer) sees the database as up and reports what its role may read;
    a daemon that runs no projection is ready as any role."""
    with psycopg.connect(read_model.dsns[kind], autocommit=True) as conn:
        snapshot = metrics.read_snapshot(conn)
        revision = conn.execute(
            named_queries("queries/metrics.sql")["revision"], {"projections": []}
        ).fetchone()
    assert snapshot.up
    assert revision is not None and revision[0] == migrate.head_revision()
    visible = [p.name for p in snapshot.projections]
    assert visible == ([] if kind == "writer" else ["tally_set"])
    assert (snapshot.head_position is not None) == (kind != "reader")
    if kind != "writer":
        assert snapshot.projections[0].checkpoint_position == 6
