"""The rules of ``aura-pg doctor``: pure functions from what the database
said to a :class:`Check` (ok, warn or fail, with a hint for the last two),
unit-tested without a database. The queries that feed them are in
:mod:`aura_pg.doctor.checks`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

Status: TypeAlias = Literal["ok", "warn", "fail"]

MINIMUM_SERVER_VERSION: Final = 140000
TESTED_SERVER_VERSION: Final = 150000
CLOCK_SKEW_WARN: Final = 1.0
CLOCK_SKEW_FAIL: Final = 10.0
TRANSACTION_AGE_FAIL_FACTOR: Final = 10.0
CONNECTIONS_WARN: Final = 0.8
CONNECTIONS_FAIL: Final = 0.95
# Open transactions and PUBLIC privileges named in one detail line at most.
_LISTED: Final = 3

CHECK_NAMES: Final = (
    "connect",
    "server_version",
    "timescaledb",
    "migrations",
    "roles",
    "idle_in_transaction_timeout",
    "long_transactions",
    "clock_skew",
    "projections",
    "stream_order",
    "connections",
    "durability",
)

_PRELOADED = re.compile(r"(^|[\s,\"/])timescaledb([\s,\"]|$)")


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check."""

    name: str
    status: Status
    detail: str
    hint: str | None = None


def server_version_check(version_num: int, version: str) -> Check:
    detail = f"PostgreSQL {version}"
    if version_num < MINIMUM_SERVER_VERSION:
        return Check(
            "server_version",
            "fail",
            f"{detail}: older than 14",
            "aura-pg needs PostgreSQL 14 or newer; upgrade the server",
        )
    if version_num < TESTED_SERVER_VERSION:
        return Check(
            "server_version",
            "warn",
            f"{detail}: supported, but aura-pg is tested on 15",
            "upgrade to PostgreSQL 15 or newer, the version the test suite runs on",
        )
    return Check("server_version", "ok", detail)


def timescaledb_check(
    installed_version: str | None, available_version: str | None, preload: str | None
) -> Check:
    preloaded = None if preload is None else bool(_PRELOADED.search(preload))
    preload_note = {
        True: "in shared_preload_libraries",
        False: "not in shared_preload_libraries",
        None: "shared_preload_libraries not visible to this user",
    }[preloaded]
    add_preload = (
        "add timescaledb to shared_preload_libraries in postgresql.conf and restart the server"
    )
    if installed_version is not None:
        detail = f"TimescaleDB {installed_version} installed, {preload_note}"
        if preloaded is False:
            return Check("timescaledb", "fail", detail, add_preload)
        return Check("timescaledb", "ok", detail)
    if available_version is None:
        return Check(
            "timescaledb",
            "warn",
            "TimescaleDB is not installed on the server: the agent_performance read models need it",
            "install TimescaleDB (scripts/install-system.sh does), "
            f"{add_preload}, then run aura-pg migrate",
        )
    detail = (
        f"TimescaleDB {available_version} is available but not created in this database, "
        f"{preload_note}"
    )
    if preloaded is False:
        return Check("timescaledb", "warn", detail, f"{add_preload}, then run aura-pg migrate")
    return Check(
        "timescaledb",
        "warn",
        detail,
        "run aura-pg migrate (it creates the extension where the server preloads it)",
    )


def migrations_check(
    has_schema: bool,
    has_version_table: bool,
    versions: Sequence[str],
    head: str,
    known: Callable[[str], bool],
) -> Check:
    run_migrate = "run aura-pg migrate"
    if not has_schema:
        return Check(
            "migrations",
            "fail",
            f"no aura schema: this database was never migrated (this aura-pg needs {head})",
            run_migrate,
        )
    if not has_version_table:
        return Check(
            "migrations",
            "warn",
            "the aura schema has no aura.alembic_version table (installed with "
            "sql/install.sql?): its version cannot be checked",
            "prefer aura-pg migrate, which records the version; compare the schema with "
            "aura-pg migrate --sql",
        )
    if not versions:
        return Check(
            "migrations",
            "fail",
            f"aura.alembic_version is empty: no revision applied (this aura-pg needs {head})",
            run_migrate,
        )
    current = ", ".join(versions)
    if list(versions) == [head]:
        return Check("migrations", "ok", f"at revision {head} (head)")
    if all(known(v) for v in versions):
        return Check(
            "migrations",
            "fail",
            f"database at revision {current}, this aura-pg needs {head}",
            run_migrate,
        )
    return Check(
        "migrations",
        "fail",
        f"database at revision {current}, which this aura-pg (head {head}) does not know: "
        "a newer aura-pg migrated it",
        "upgrade aura-pg to the version that migrated this database",
    )


def roles_check(
    roles: Sequence[Mapping[str, Any]],
    public_privileges: Sequence[Mapping[str, Any]],
    user_name: str,
    user_is_superuser: bool,
) -> Check:
    fails: list[str] = []
    warns: list[str] = []
    hints: list[str] = []
    for role in roles:
        name = role["role_name"]
        if not role["role_exists"]:
            fails.append(f"{role['kind']} role {name} does not exist")
            hints.append(
                f"CREATE ROLE {name} NOLOGIN, then rerun sql/roles/grants.sql as the migrating role"
            )
            continue
        if role["is_superuser"] or role["bypasses_rls"]:
            fails.append(f"{name} is a superuser or bypasses row security")
            hints.append(f"ALTER ROLE {name} NOSUPERUSER NOBYPASSRLS")
        if role["can_login"]:
            warns.append(f"{name} can log in")
            hints.append(
                f"ALTER ROLE {name} NOLOGIN; log in as users created IN ROLE {name} "
                "(docs/operators.md)"
            )
    if not roles:
        fails.append("aura.role_names is empty")
        hints.append("run aura-pg migrate on a fresh database")
    on_schema = [p["privilege_type"] for p in public_privileges if p["object_kind"] == "schema"]
    on_objects = sorted(
        {
            f"{p['privilege_type']} on {p['object_name']}"
            for p in public_privileges
            if p["object_kind"] != "schema"
        }
    )
    if on_schema:
        fails.append(f"PUBLIC has {', '.join(on_schema)} on schema aura")
        hints.append("REVOKE ALL ON SCHEMA aura FROM PUBLIC")
    if on_objects:
        listed = ", ".join(on_objects[:_LISTED])
        more = f" and {len(on_objects) - _LISTED} more" if len(on_objects) > _LISTED else ""
        warns.append(f"PUBLIC has {listed}{more}")
        hints.append("revoke PUBLIC's privileges on aura objects; rerun sql/roles/grants.sql")
    member = [r["role_name"] for r in roles if r["current_user_member"]]
    user = f"connected as {user_name}{' (superuser)' if user_is_superuser else ''}, " + (
        f"member of {', '.join(member)}" if member else "in no aura role"
    )
    if fails or warns:
        return Check(
            "roles",
            "fail" if fails else "warn",
            "; ".join([*fails, *warns, user]),
            "; ".join(hints),
        )
    names = ", ".join(r["role_name"] for r in roles)
    return Check(
        "roles",
        "ok",
        f"{names} exist, NOLOGIN, not superuser; PUBLIC has no privilege in schema aura; {user}",
    )


def idle_timeout_check(setting: str, unit: str | None, source: str, database: str) -> Check:
    if setting.strip() in ("0", ""):
        return Check(
            "idle_in_transaction_timeout",
            "warn",
            f"idle_in_transaction_session_timeout is 0 (disabled; from {source}): a session "
            "forgotten in an open transaction holds back every projection and global reader "
            "(aura.read_horizon_status) until someone ends it",
            f"ALTER DATABASE {database} SET idle_in_transaction_session_timeout = '5min' "
            "(or ALTER ROLE ... SET for the application roles); docs/doctor.md",
        )
    value = f"{setting} {unit}" if unit else setting
    return Check(
        "idle_in_transaction_timeout",
        "ok",
        f"idle_in_transaction_session_timeout = {value} (from {source})",
    )


def _describe_transaction(row: Mapping[str, Any]) -> str:
    age = f"open {row['age_seconds']:.1f} s"
    where = f"user {row['user_name']}, database {row['database']}"
    if row["kind"] == "prepared":
        return f"prepared transaction {row['gid']!r} ({where}) {age}"
    app = row["application_name"] or "no application name"
    return f"pid {row['pid']} ({app!r}, {where}, {row['state']}) {age}"


def long_transactions_check(
    rows: Sequence[Mapping[str, Any]], max_age: float, sees_all: bool = True
) -> Check:
    visibility = (
        ""
        if sees_all
        else " (only this user's sessions are visible: grant pg_read_all_stats to see all)"
    )
    aged = [r for r in rows if r["age_seconds"] is not None]
    old = [r for r in aged if r["age_seconds"] > max_age]
    if not old:
        if not aged:
            return Check("long_transactions", "ok", f"no open writing transaction{visibility}")
        oldest = aged[0]
        return Check(
            "long_transactions",
            "ok",
            f"{len(aged)} open writing transaction(s), none older than {max_age:g} s "
            f"(oldest {oldest['age_seconds']:.1f} s){visibility}",
        )
    status: Status = "warn"
    if any(r["age_seconds"] > max_age * TRANSACTION_AGE_FAIL_FACTOR for r in old):
        status = "fail"
    listed = "; ".join(_describe_transaction(r) for r in old[:_LISTED])
    more = f"; and {len(old) - _LISTED} more" if len(old) > _LISTED else ""
    hint = (
        "an open transaction holds back every projection and global reader until it ends: "
        "end it, or SELECT pg_terminate_backend(pid); set idle_in_transaction_session_timeout"
    )
    if any(r["kind"] == "prepared" for r in old):
        hint += "; finish prepared transactions with COMMIT PREPARED or ROLLBACK PREPARED 'gid'"
    return Check(
        "long_transactions",
        status,
        f"{len(old)} writing transaction(s) older than {max_age:g} s: {listed}{more}{visibility}",
        hint,
    )


def clock_skew_check(skew: float, uncertainty: float) -> Check:
    """``skew``: server clock minus client clock (seconds); ``uncertainty``:
    half the round trip, within which the skew cannot be told apart."""
    direction = "ahead of" if skew >= 0 else "behind"
    detail = f"server clock {abs(skew):.3f} s {direction} this machine (±{uncertainty:.3f} s)"
    measured = abs(skew) - uncertainty
    hint = (
        "synchronise both clocks (NTP, chrony): recorded_at, seconds_behind and the "
        "lag metrics compare the server's time with the clients'"
    )
    if measured > CLOCK_SKEW_FAIL:
        return Check("clock_skew", "fail", detail, hint)
    if measured > CLOCK_SKEW_WARN:
        return Check("clock_skew", "warn", detail, hint)
    return Check("clock_skew", "ok", detail)


def _projection_problems(row: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    fails: list[str] = []
    warns: list[str] = []
    circuit = row.get("circuit")
    if row.get("status") == "failed" or circuit == "open":
        # The engine marks a projection failed when its circuit opens; the
        # view shows half_open once the pause is over and a retry is due.
        error = f", last error: {row['last_error']}" if row.get("last_error") else ""
        fails.append(
            f"failing (circuit {circuit}, {row.get('consecutive_failures')} consecutive "
            f"failures{error})"
        )
    elif circuit == "half_open":
        warns.append("circuit half open (recovering)")
    if row.get("status") == "paused":
        warns.append("paused")
    dead_letters = row.get("dead_letters") or 0
    if dead_letters:
        warns.append(f"{dead_letters} pending dead letter(s)")
    if row.get("owner") and row.get("owner_alive") is False:
        warns.append(f"owner {row['owner']} is gone (its session ended)")
    if row.get("rebuild_needed"):
        warns.append("definition changed, waiting for a rebuild")
    return fails, warns


def projections_check(rows: Sequence[Mapping[str, Any]]) -> Check:
    if not rows:
        return Check("projections", "ok", "no projection registered")
    failing: list[str] = []
    warning: list[str] = []
    for row in rows:
        fails, warns = _projection_problems(row)
        if fails or warns:
            (failing if fails else warning).append(f"{row['name']}: {', '.join(fails + warns)}")
    if not failing and not warning:
        return Check(
            "projections",
            "ok",
            f"{len(rows)} projection(s), none failing, no dead letters",
        )
    hint = (
        "aura-pg projections status; fix the cause, then aura-pg projections resume NAME, "
        "retry-dead-letter ID or skip-dead-letter ID, or rebuild NAME (docs/projections.md)"
    )
    return Check("projections", "fail" if failing else "warn", "; ".join(failing + warning), hint)


def stream_order_check(streams: int, listed: Sequence[str]) -> Check:
    if not streams:
        return Check("stream_order", "ok", "every stream is read in version order")
    shown = ", ".join(repr(s) for s in listed)
    more = f" and {streams - len(listed)} more" if streams > len(listed) else ""
    return Check(
        "stream_order",
        "warn",
        f"{streams} stream(s) recorded before migration 0009 are read out of version order: "
        f"{shown}{more}",
        "SELECT * FROM aura.stream_order_inversions; projections folded their events in read "
        "order: rebuild those whose fold depends on order, or aura.replay_stream each stream "
        "(docs/event-store.md, per-stream order)",
    )


def connections_check(
    max_connections: int, superuser_reserved: int, reserved: int, client_connections: int
) -> Check:
    available = max(max_connections - superuser_reserved - reserved, 1)
    share = client_connections / available
    detail = (
        f"{client_connections} of {available} connection slots in use ({share:.0%}; "
        f"max_connections {max_connections}, {superuser_reserved + reserved} reserved)"
    )
    hint = (
        "raise max_connections (restart) or pool connections (pgbouncer, smaller pools); "
        "look for idle sessions in pg_stat_activity"
    )
    if share >= CONNECTIONS_FAIL:
        return Check("connections", "fail", detail, hint)
    if share >= CONNECTIONS_WARN:
        return Check("connections", "warn", detail, hint)
    return Check("connections", "ok", detail)


_DURABILITY_RISKS: Final[Mapping[str, str]] = {
    "fsync": "fsync is off: a server or OS crash can corrupt the database",
    "full_page_writes": "full_page_writes is off: a crash can leave torn pages",
    "synchronous_commit": (
        "synchronous_commit is off: a crash loses the last acknowledged commits, so "
        "appends reported as recorded (and outbox messages already published) can vanish"
    ),
}


def durability_check(settings: Mapping[str, str]) -> Check:
    risks = [risk for name, risk in _DURABILITY_RISKS.items() if settings.get(name, "on") == "off"]
    if risks:
        return Check(
            "durability",
            "warn",
            "; ".join(risks),
            "turn them on in postgresql.conf (or ALTER SYSTEM) unless this is a throw-away "
            "test server",
        )
    values = ", ".join(f"{name} {settings.get(name, '?')}" for name in sorted(_DURABILITY_RISKS))
    return Check("durability", "ok", values)
