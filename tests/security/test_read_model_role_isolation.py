"""Read model roles (issue 24, items 4 and 5): a shadow's or a rebuild's
handlers run as a role that owns exactly their own schema, before and after
every swap, and a read model role is handed out only to the projector role
it was made for, also when two applications share a cluster.

Handlers run from a superuser's session here: the refusals are the read
model roles' doing, not the caller's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo
from pytest_postgresql.executors import NoopExecutor

from aura_pg import EventStore, NewEvent, migrate
from aura_pg.projection import shadows
from tests.helpers.projections import (
    assert_exact_fold,
    caught_up,
    fixture_catalog,
    query,
    running_daemon,
    wait_for,
)

# A read model that records who applied each event, then runs the statement
# the test put in public.probe_statements for its schema (if any).
PROBE = """
CREATE TABLE seen (
    global_position bigint PRIMARY KEY,
    who             text   NOT NULL DEFAULT current_user
);
CREATE FUNCTION apply_event(e aura.events) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seen (global_position) VALUES (e.global_position);
    EXECUTE coalesce((SELECT p.statement FROM public.probe_statements p
                      WHERE p.schema_name = current_schema()), 'SELECT 1');
END;
$$;
"""
# New versions that write the live model: by naming its schema, or by
# pinning the search_path to it.
NAMES_THE_LIVE_SCHEMA = """
CREATE TABLE seen (global_position bigint PRIMARY KEY, who text NOT NULL DEFAULT current_user);
CREATE FUNCTION apply_event(e aura.events) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seen (global_position) VALUES (e.global_position);
    INSERT INTO probe.seen (global_position) VALUES (-e.global_position);
END;
$$;
"""
PINS_THE_SEARCH_PATH = """
CREATE TABLE seen (global_position bigint PRIMARY KEY, who text NOT NULL DEFAULT current_user);
CREATE FUNCTION apply_event(e aura.events) RETURNS void
LANGUAGE plpgsql SET search_path = probe, pg_temp AS $$
BEGIN
    INSERT INTO seen (global_position) VALUES (-e.global_position);
END;
$$;
"""
HOSTILE_VERSIONS = {"names the live schema": NAMES_THE_LIVE_SCHEMA,
                    "pins the search_path": PINS_THE_SEARCH_PATH}  # fmt: skip


def register_probe(dsn: str, definition: str = PROBE) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS public.probe_statements"
            " (schema_name text PRIMARY KEY, statement text NOT NULL)"
        )
        conn.execute("GRANT SELECT ON public.probe_statements TO PUBLIC")
        row = conn.execute(
            "SELECT aura.register_projection('probe', '', 'probe', 'apply_event', 'per_event',"
            " NULL, NULL, %s, 100, 0, 10, 10, 5, 30)",
            (definition,),
        ).fetchone()
    assert row is not None
    return str(row[0])


def append(dsn: str, count: int) -> None:
    with EventStore.connect(dsn, max_size=1) as store:
        for n in range(count):
            store.append(f"p-{n % 2}", [NewEvent("A", {"n": n})])


def apply_pending(dsn: str, name: str) -> int:
    """One batch of ``name`` from its checkpoint, as the test's superuser."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        checkpoint = conn.execute(
            "SELECT transaction_id, global_position FROM aura.projection_checkpoints"
            " WHERE name = %s",
            (name,),
        ).fetchone()
        assert checkpoint is not None, name
        row = conn.execute(
            "SELECT applied FROM aura.project_batch(%s, %s, %s)", (name, *checkpoint)
        ).fetchone()
    assert row is not None
    return int(row[0])


def role_of(dsn: str, schema: str) -> str:
    """The role that should own ``schema``: <projector role>/<schema> (the
    names here are short enough not to be hashed)."""
    ((projector,),) = query(dsn, "SELECT role_name FROM aura.role_names WHERE kind = 'projector'")
    return f"{projector}/{schema}"


def owners(dsn: str, schema: str) -> set[str]:
    """Every owner of the schema and of the relations and routines in it."""
    rows = query(
        dsn,
        "SELECT pg_get_userbyid(n.nspowner) FROM pg_namespace n WHERE n.nspname = %(s)s"
        " UNION SELECT pg_get_userbyid(c.relowner) FROM pg_class c"
        "  WHERE c.relnamespace = %(s)s::regnamespace"
        " UNION SELECT pg_get_userbyid(p.proowner) FROM pg_proc p"
        "  WHERE p.pronamespace = %(s)s::regnamespace",
        {"s": schema},  # type: ignore[arg-type]
    )
    return {row[0] for row in rows}


def live_rows(dsn: str) -> list[tuple[int, str]]:
    return [tuple(r) for r in query(dsn, "SELECT global_position, who FROM probe.seen ORDER BY 1")]


@pytest.mark.parametrize("version", list(HOSTILE_VERSIONS))
def test_a_shadow_handler_cannot_write_the_live_model(dsn: str, version: str) -> None:
    register_probe(dsn)
    append(dsn, 4)
    assert apply_pending(dsn, "probe") == 4
    before = live_rows(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT aura.begin_shadow('probe', %s, 'apply_event', 'per_event')",
            (HOSTILE_VERSIONS[version],),
        )
    with pytest.raises(errors.InsufficientPrivilege):
        apply_pending(dsn, "probe__shadow")
    assert live_rows(dsn) == before
    assert query(dsn, "SELECT count(*) FROM probe__shadow.seen") == [(0,)]
    assert owners(dsn, "probe__shadow") == {role_of(dsn, "probe__shadow")}
    assert owners(dsn, "probe") == {role_of(dsn, "probe")}


@pytest.mark.parametrize("version", list(HOSTILE_VERSIONS))
def test_a_rebuild_handler_cannot_write_the_live_model(dsn: str, version: str) -> None:
    register_probe(dsn)
    append(dsn, 4)
    assert apply_pending(dsn, "probe") == 4
    before = live_rows(dsn)
    assert register_probe(dsn, HOSTILE_VERSIONS[version]) == "changed"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT aura.begin_rebuild('probe')")
    with pytest.raises(errors.InsufficientPrivilege):
        apply_pending(dsn, "probe__rebuild")
    assert owners(dsn, "probe__rebuild") == {role_of(dsn, "probe__rebuild")}
    # The swap catches the rebuild up first: refused the same way, nothing
    # swapped in.
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        pytest.raises(errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT aura.finish_rebuild('probe')")
    assert live_rows(dsn) == before
    assert owners(dsn, "probe") == {role_of(dsn, "probe")}


async def test_a_shadow_writing_the_live_model_fails_visibly_under_a_daemon(dsn: str) -> None:
    """Under a daemon the refused batches are retried and dead lettered:
    the shadow shows the failure, and the live model stays the exact fold."""
    spec = fixture_catalog().get("tally_set")
    store = EventStore.connect(dsn, max_size=1)
    with store:
        for n in range(6):
            store.append(f"s-{n % 2}", [NewEvent("A", {"n": n})])
    hostile = spec.model_copy(
        update={
            "definition_sql": spec.definition_sql.replace(
                "    INSERT INTO streams AS s\n", "    INSERT INTO tally_set.streams AS s\n"
            )
        }
    )
    assert hostile.definition_sql != spec.definition_sql
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    assert shadows.begin(dsn, "tally_set", hostile) == "created"
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(
            lambda: (
                query(
                    dsn,
                    "SELECT count(*) FROM aura.dead_letters"
                    " WHERE projection = 'tally_set__shadow' AND error_sqlstate = '42501'",
                )[0][0]
                > 0
            ),
            what="a dead letter of the shadow refused with 42501",
        )
    assert_exact_fold(dsn, "tally_set")
    assert query(dsn, "SELECT count(*) FROM tally_set__shadow.streams") == [(0,)]


def test_after_promote_and_rollback_each_side_writes_only_its_own_schema(dsn: str) -> None:
    register_probe(dsn)
    append(dsn, 2)
    assert apply_pending(dsn, "probe") == 2
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT aura.begin_shadow('probe', %s, 'apply_event', 'per_event')",
            (PROBE + "-- version 2\n",),
        )
    assert apply_pending(dsn, "probe__shadow") == 2
    sides = {"probe": "probe__shadow", "probe__shadow": "probe"}
    for swap in ("promote", "rollback"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT aura.promote_shadow('probe')").fetchone() == ("promoted",)
        for schema, other in sides.items():
            # Each side's handler may not write the other side, may write
            # its own, and runs as the role of the schema it now lives in.
            for statement, refused in (
                (f"INSERT INTO {other}.seen (global_position) VALUES (-1)", True),
                (f"INSERT INTO {schema}.seen VALUES (-1) ON CONFLICT DO NOTHING", False),
            ):
                query(
                    dsn,
                    "INSERT INTO public.probe_statements VALUES (%s, %s)"
                    " ON CONFLICT (schema_name) DO UPDATE SET statement = excluded.statement",
                    (schema, statement),
                )
                append(dsn, 1)
                if refused:
                    with pytest.raises(errors.InsufficientPrivilege):
                        apply_pending(dsn, schema)
                    assert query(
                        dsn, sql.SQL("SELECT count(*) FROM {}.seen WHERE global_position < 0")
                        .format(sql.Identifier(other))
                    ) == [(0,)]  # fmt: skip
                else:
                    assert apply_pending(dsn, schema) >= 1
            query(dsn, "DELETE FROM public.probe_statements")
            query(dsn, sql.SQL("DELETE FROM {}.seen WHERE global_position < 0").format(
                sql.Identifier(schema)))  # fmt: skip
            role = role_of(dsn, schema)
            who = query(
                dsn,
                sql.SQL("SELECT who FROM {}.seen ORDER BY global_position DESC LIMIT 1").format(
                    sql.Identifier(schema)
                ),
            )
            assert who == [(role,)], (swap, schema)
            assert owners(dsn, schema) == {role}, (swap, schema)


def test_a_rebuild_swap_hands_the_live_schema_to_the_live_role(dsn: str) -> None:
    register_probe(dsn)
    append(dsn, 3)
    assert apply_pending(dsn, "probe") == 3
    assert register_probe(dsn, PROBE + "-- version 2\n") == "changed"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT aura.begin_rebuild('probe')")
        conn.execute("SELECT aura.finish_rebuild('probe')")
    assert owners(dsn, "probe") == {role_of(dsn, "probe")}
    assert owners(dsn, "probe__previous") == {role_of(dsn, "probe__previous")}
    append(dsn, 1)
    assert apply_pending(dsn, "probe") == 1
    latest = "SELECT who FROM probe.seen ORDER BY global_position DESC LIMIT 1"
    assert query(dsn, latest) == [(role_of(dsn, "probe"),)]  # rebuilt by probe__rebuild's
    query(
        dsn,
        "INSERT INTO public.probe_statements VALUES"
        " ('probe', 'INSERT INTO probe__previous.seen (global_position) VALUES (-1)')",
    )
    append(dsn, 1)
    with pytest.raises(errors.InsufficientPrivilege):
        apply_pending(dsn, "probe")


@pytest.mark.parametrize(
    "comment",
    ["made for another projector", "the comment of a role made before 0009"],
)
def test_a_read_model_role_made_for_another_projector_is_refused(dsn: str, comment: str) -> None:
    """A role of the right name (as a hash collision of two shortened names
    would give) that was made for another projector role, or by a release
    before 0009, is not handed out."""
    name = role_of(dsn, "collided")
    marker = (
        query(dsn, "SELECT aura.read_model_role_marker('someone_else', 'collided')")[0][0]
        if comment.startswith("made")
        else "aura-pg read model role"
    )
    projector = query(dsn, "SELECT role_name FROM aura.role_names WHERE kind = 'projector'")[0][0]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
        try:
            conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(
                sql.Identifier(name), sql.Literal(marker)))  # fmt: skip
            with pytest.raises(psycopg.Error, match="is not an aura-pg read model role") as refused:
                conn.execute("SELECT aura.read_model_role('collided')")
            assert refused.value.sqlstate == "AU007"
            member = conn.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (projector, name))
            assert member.fetchone() == (False,)
        finally:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_read_model_role_names_are_unambiguous(dsn: str) -> None:
    names = dict(
        query(
            dsn,
            "SELECT p || ' ' || s, aura.read_model_role_name(p, s)"
            " FROM (VALUES ('shop', 'eu_totals'), ('shop_eu', 'totals'),"
            "              ('shop', 'totals__shadow'), ('shop__totals', 'shadow'),"
            "              (repeat('p', 40), repeat('s', 40)), (repeat('p', 40), repeat('s', 41)),"
            "              (repeat('p', 21), 'x'), ('ä' || repeat('p', 30), repeat('s', 40)))"
            " AS t(p, s)",
        )
    )
    assert names["shop eu_totals"] == "shop/eu_totals"
    assert names["shop_eu totals"] == "shop_eu/totals"
    assert names["shop totals__shadow"] != names["shop__totals shadow"]
    assert len(set(names.values())) == len(names)
    assert all(len(n.encode()) <= 63 for n in names.values())


# --- two applications in one cluster ----------------------------------------


@dataclass
class Application:
    dsn: str
    roles: dict[str, str]


KINDS = ("owner", "writer", "projector", "reader", "handler")


@pytest.fixture
def two_applications(pg_server: NoopExecutor) -> Iterator[tuple[Application, Application]]:
    """Databases A and B in the test cluster, migrated with role names of
    their own: A's projector role is shop<x>, B's shop<x>_eu (so that
    before 0009 B's read model totals and A's eu_totals had one role)."""
    prefix = f"shop{uuid.uuid4().hex[:8]}"
    admin = make_conninfo(
        host=pg_server.host, port=pg_server.port, user=pg_server.user, dbname="postgres"
    )
    apps = []
    for projector in (prefix, f"{prefix}_eu"):
        roles = {
            kind: projector if kind == "projector" else f"{projector}_{kind}" for kind in KINDS
        }
        database = f"{projector}_db"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        dsn = make_conninfo(admin, dbname=database)
        options = " ".join(f"-c aura.{kind}_role={name}" for kind, name in roles.items())
        migrate.upgrade(make_conninfo(dsn, options=options))
        apps.append(Application(dsn, roles))
    try:
        yield apps[0], apps[1]
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for app in apps:
                conn.execute(
                    sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                        sql.Identifier(str(psycopg.conninfo.conninfo_to_dict(app.dsn)["dbname"]))
                    )
                )
            for (role,) in conn.execute(
                "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s) ORDER BY 1", (prefix,)
            ).fetchall():
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_projector_cannot_get_another_applications_read_model_role(
    two_applications: tuple[Application, Application],
) -> None:
    """Issue 24, item 5: A's projector asks its own database for the role of
    a read model eu_totals, and must not get B's totals role (and, through
    it, B's read model in B's database)."""
    a, b = two_applications
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT aura.register_projection('totals', '', 'totals', 'apply_event', 'per_event',"
            " NULL, NULL, %s, 10, 0, 10, 10, 5, 30)",
            (
                "CREATE TABLE amounts (account text PRIMARY KEY, amount int NOT NULL);"
                " CREATE FUNCTION apply_event(e aura.events) RETURNS void"
                " LANGUAGE sql AS 'SELECT NULL';",
            ),
        )
        conn.execute("INSERT INTO totals.amounts VALUES ('acc', 100)")
        ((b_role,),) = conn.execute(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'totals'"
        ).fetchall()

    login = f"{a.roles['projector']}_login"
    with psycopg.connect(a.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(login), sql.Identifier(a.roles["projector"])
            )
        )
        conn.execute(
            sql.SQL("ALTER ROLE {} SET role = {}").format(
                sql.Identifier(login), sql.Literal(a.roles["projector"])
            )
        )
    with psycopg.connect(make_conninfo(a.dsn, user=login), autocommit=True) as conn:
        ((a_role,),) = conn.execute("SELECT aura.read_model_role('eu_totals')").fetchall()
    with (
        psycopg.connect(make_conninfo(b.dsn, user=login), autocommit=True) as conn,
        pytest.raises(errors.InsufficientPrivilege),
    ):
        conn.execute("UPDATE totals.amounts SET amount = 0")
    assert query(b.dsn, "SELECT amount FROM totals.amounts") == [(100,)]
    assert query(a.dsn, "SELECT pg_has_role(%s, %s, 'MEMBER')", (a.roles["projector"], b_role)) == [
        (False,)
    ]
    assert b_role == f"{b.roles['projector']}/totals"
    assert a_role == f"{a.roles['projector']}/eu_totals"


def test_a_handler_is_not_run_as_a_role_that_is_not_its_schemas_own(dsn: str) -> None:
    """A swap that missed the hand-over (an older promote function, a schema
    renamed by hand) fails visibly instead of running the live handlers as
    the role that owns the shadow (or the other way round)."""
    register_probe(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT aura.begin_shadow('probe', %s, 'apply_event', 'per_event')",
            (PROBE + "-- version 2\n",),
        )
        conn.execute("SELECT aura.give_read_model('probe', %s)", (role_of(dsn, "probe__shadow"),))
    append(dsn, 1)
    with pytest.raises(psycopg.Error, match="is not owned by its own role") as refused:
        apply_pending(dsn, "probe")
    assert refused.value.sqlstate == "AU007"
    assert query(dsn, "SELECT count(*) FROM probe.seen") == [(0,)]
    query(dsn, "SELECT aura.hand_over_read_model('probe')")
    assert apply_pending(dsn, "probe") == 1
    assert query(dsn, "SELECT who FROM probe.seen") == [(role_of(dsn, "probe"),)]


HYPERTABLE = """
CREATE TABLE samples (at timestamptz NOT NULL, n int NOT NULL);
SELECT public.create_hypertable('samples', 'at', chunk_time_interval => interval '1 day');
CREATE FUNCTION apply_event(e aura.events) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO samples VALUES (now() - e.global_position * interval '1 day', 1)
$$;
"""


def test_a_projector_login_swaps_hypertable_read_models_and_their_chunks(dsn: str) -> None:
    """The hand-over at promote, rollback and rebuild moves the hypertables'
    chunks (in _timescaledb_internal) to the new owner too, also when a
    projector login, not a superuser, runs the swap."""
    login = f"t_projector_{uuid.uuid4().hex[:8]}"
    ((projector,),) = query(dsn, "SELECT role_name FROM aura.role_names WHERE kind = 'projector'")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
            sql.Identifier(login), sql.Identifier(projector)))  # fmt: skip
        conn.execute(sql.SQL("ALTER ROLE {} SET role = {}").format(
            sql.Identifier(login), sql.Literal(projector)))  # fmt: skip
        # A clone of the template database lacks the migration's database grant.
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), sql.Identifier(projector)))  # fmt: skip
    chunk_owners = (
        "SELECT DISTINCT k.hypertable_schema::text, pg_get_userbyid(c.relowner)"
        " FROM timescaledb_information.chunks k"
        " JOIN pg_class c ON c.oid = format('%%I.%%I', k.chunk_schema, k.chunk_name)::regclass"
        " ORDER BY 1"
    )
    try:
        append(dsn, 4)
        with psycopg.connect(make_conninfo(dsn, user=login), autocommit=True) as conn:
            conn.execute(
                "SELECT aura.register_projection('hyper', '', 'hyper', 'apply_event', 'per_event',"
                " NULL, NULL, %s, 100, 0, 10, 10, 5, 30)",
                (HYPERTABLE,),
            )
            conn.execute(
                "SELECT aura.begin_shadow('hyper', %s, 'apply_event', 'per_event')",
                (HYPERTABLE + "-- version 2\n",),
            )
        for name in ("hyper", "hyper__shadow"):
            assert apply_pending(dsn, name) == 4
        with psycopg.connect(make_conninfo(dsn, user=login), autocommit=True) as conn:
            for _ in ("promote", "rollback"):
                conn.execute("SELECT aura.promote_shadow('hyper')")
                owned = query(dsn, chunk_owners)
                assert owned == [(s, role_of(dsn, s)) for s in ("hyper", "hyper__shadow")]
            conn.execute("SELECT aura.begin_rebuild('hyper')")
            conn.execute("SELECT aura.finish_rebuild('hyper')")
        owned = query(dsn, chunk_owners)
        assert owned == [
            (s, role_of(dsn, s)) for s in ("hyper", "hyper__previous", "hyper__shadow")
        ]
        append(dsn, 1)
        assert apply_pending(dsn, "hyper") == 1
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (login,),
            )
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(login)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))
