"""Real faults for chaos experiments and the reliability suite.

Every method of ``FailureInjector`` does the thing it names to a running
system: kills a process, stops the server, ends sessions, delays packets,
makes a read model's writes fail or wait, fills a file system, caps a
process's memory. Each returns a ``Fault`` whose ``undo()`` takes the fault
away again (where there is something to take away; a killed process is
restarted by whatever supervises it, not by the injector). The injector
keeps every fault it made, so ``undo_all()`` (or leaving its ``with``
block) cleans up after an experiment that failed half-way.

The injector connects as the given DSN's user, who must be able to create
triggers on read models, terminate sessions and create tablespaces: a
superuser, in practice. Nothing here runs in normal operation.

Over 500 lines as one class on purpose: each fault is a short method with
its undo beside it, and the injector's bookkeeping (``undo_all``) must see
them all.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, LiteralString, Self

import psycopg
from psycopg import sql

from aura_pg._resources import named_queries
from aura_pg.chaos.proxy import LatencyProxy, measure_round_trip
from aura_pg.devtools.localdb import LocalCluster

log = logging.getLogger("aura_pg.chaos")

_SQLSTATE = re.compile(r"^[0-9A-Z]{5}$")
_TABLESPACE = "aura_chaos_full"
_FILLER = sql.Identifier("aura_chaos", "filler")


class ChaosUnavailable(RuntimeError):
    """This fault cannot be injected here (no local cluster, no proxy, not root)."""


def _queries() -> dict[str, LiteralString]:
    return named_queries("queries/chaos.sql")


@dataclass
class Fault:
    """One injected fault: what, where, when, what was measured, and how to
    take it away."""

    kind: str
    target: str
    details: dict[str, Any] = field(default_factory=dict)
    injected_at: float = field(default_factory=time.time)
    undone_at: float | None = None
    _undo: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.undone_at is None

    def undo(self) -> None:
        """Take the fault away; a second call does nothing."""
        if self.undone_at is not None:
            return
        if self._undo is not None:
            self._undo()
            log.warning("chaos: %s on %s undone", self.kind, self.target)
        self.undone_at = time.time()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "injected_at": self.injected_at,
            "undone_at": self.undone_at,
            **self.details,
        }


def process_status_kib(pid: int, field_name: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmSize, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {field_name}")


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its parent counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} is still running {timeout}s after SIGKILL")
        time.sleep(0.01)


class FailureInjector:
    """Injects faults into the aura-pg system behind ``dsn``.

    ``cluster`` (a local cluster this process may stop and start) enables
    the server faults; ``proxy`` (the ``LatencyProxy`` the clients connect
    through) enables latency and connection loss.
    """

    def __init__(
        self,
        dsn: str,
        *,
        cluster: LocalCluster | None = None,
        proxy: LatencyProxy | None = None,
    ) -> None:
        self.dsn = dsn
        self.cluster = cluster
        self.proxy = proxy
        self.faults: list[Fault] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo_all()

    def undo_all(self) -> None:
        """Undo every fault still active, newest first."""
        for fault in reversed(self.faults):
            fault.undo()

    def _record(
        self,
        kind: str,
        target: str,
        details: dict[str, Any],
        undo: Callable[[], None] | None = None,
    ) -> Fault:
        fault = Fault(kind, target, details, _undo=undo)
        if undo is None:
            fault.undone_at = fault.injected_at  # nothing stays behind to undo
        self.faults.append(fault)
        log.warning("chaos: %s on %s: %s", kind, target, details)
        return fault

    @contextmanager
    def _connect(self) -> Iterator[psycopg.Connection[Any]]:
        with psycopg.connect(
            self.dsn, autocommit=True, connect_timeout=10, application_name="aura-pg chaos"
        ) as conn:
            conn.execute(_queries()["session"])
            yield conn

    # -- processes ----------------------------------------------------------

    def owner_pid(self, projection: str) -> int:
        """The pid of the daemon that owns ``projection`` on this host."""
        with self._connect() as conn:
            row = conn.execute(_queries()["projection_owner"], {"name": projection}).fetchone()
        if row is None:
            raise LookupError(f"no projection named {projection!r}")
        owner = row[0]
        host, _, pid = (owner or "").rpartition(":")
        if not owner or host != socket.gethostname() or not pid.isdigit():
            raise LookupError(
                f"projection {projection!r} has no owner on this host (owner: {owner!r})"
            )
        if process_gone(int(pid)):
            # A killed daemon's name stays in the row until another claims it.
            raise LookupError(f"projection {projection!r}: its owner {owner} is not running")
        return int(pid)

    def kill_projector(self, *, projection: str | None = None, pid: int | None = None) -> Fault:
        """SIGKILL a projector daemon: the one with ``pid``, or the owner of
        ``projection``. Its sessions end with it, which releases its
        projections to a stand-by; nothing is undone here."""
        if (projection is None) == (pid is None):
            raise ValueError("give exactly one of projection and pid")
        target_pid = pid if pid is not None else self.owner_pid(str(projection))
        os.kill(target_pid, signal.SIGKILL)
        wait_until_gone(target_pid)
        return self._record(
            "kill_projector", projection or f"pid {target_pid}", {"pid": target_pid}
        )

    def memory_pressure(self, pid: int, headroom_mib: int = 64) -> Fault:
        """Cap a process's address space at its current size plus
        ``headroom_mib``: its next large allocations fail (MemoryError in
        Python). Undo restores the old limit if the process still runs."""
        old = resource.prlimit(pid, resource.RLIMIT_AS)
        size_kib = process_status_kib(pid, "VmSize")
        limit = (size_kib + headroom_mib * 1024) * 1024
        resource.prlimit(pid, resource.RLIMIT_AS, (limit, old[1]))

        def undo() -> None:
            if not process_gone(pid):
                resource.prlimit(pid, resource.RLIMIT_AS, old)

        details = {
            "pid": pid,
            "address_space_limit_mib": limit // 2**20,
            "rss_mib": process_status_kib(pid, "VmRSS") / 1024,
        }
        return self._record("memory_pressure", f"pid {pid}", details, undo)

    # -- the server ---------------------------------------------------------

    def _cluster(self) -> LocalCluster:
        if self.cluster is None:
            raise ChaosUnavailable("server faults need a local cluster (cluster=...)")
        return self.cluster

    def stop_postgres(self, mode: str = "immediate") -> Fault:
        """Stop the server (``immediate``: no shutdown checkpoint, crash
        recovery at the next start); undo starts it again."""
        cluster = self._cluster()
        cluster.stop(mode)
        return self._record("stop_postgres", f"port {cluster.port}", {"mode": mode}, cluster.start)

    def restart_postgres(self, mode: str = "immediate", down_for: float = 0.0) -> Fault:
        """Stop the server, wait ``down_for`` seconds, start it again; the
        details say how long it refused connections."""
        cluster = self._cluster()
        started = time.monotonic()
        cluster.stop(mode)
        time.sleep(down_for)
        cluster.start()
        details = {"mode": mode, "down_seconds": round(time.monotonic() - started, 3)}
        return self._record("restart_postgres", f"port {cluster.port}", details)

    def terminate_backends(self, pattern: str = "aura-pg projector%") -> Fault:
        """``pg_terminate_backend`` every session of this database whose
        application_name is LIKE ``pattern`` (the daemons', by default)."""
        with self._connect() as conn:
            rows = conn.execute(_queries()["terminate_backends"], {"pattern": pattern}).fetchall()
        details = {"terminated": sum(1 for row in rows if row[2]), "sessions": [r[1] for r in rows]}
        return self._record("terminate_backends", pattern, details)

    # -- the network (through the proxy) ------------------------------------

    def _proxy(self) -> LatencyProxy:
        if self.proxy is None:
            raise ChaosUnavailable("network faults need the clients behind a LatencyProxy")
        return self.proxy

    def network_latency(self, delay_seconds: float, samples: int = 20) -> Fault:
        """Delay every packet through the proxy by ``delay_seconds`` each
        way; the details hold the measured ``SELECT 1`` round trip before
        and after. Undo restores the previous delay."""
        proxy = self._proxy()
        previous = proxy.delay
        through = proxy.dsn(self.dsn)
        before = measure_round_trip(through, samples)
        proxy.set_delay(delay_seconds)
        after = measure_round_trip(through, samples)
        details = {
            "delay_ms": delay_seconds * 1000,
            "round_trip_before_ms": round(before * 1000, 3),
            "round_trip_after_ms": round(after * 1000, 3),
        }
        return self._record(
            "network_latency", f"proxy :{proxy.port}", details, lambda: proxy.set_delay(previous)
        )

    def connection_loss(self, refuse: bool = False) -> Fault:
        """Abort every connection through the proxy; with ``refuse``, keep
        refusing new ones until undone (a partition), else only the open
        ones are lost (a dropped NAT table, a failover)."""
        proxy = self._proxy()
        if refuse:
            proxy.refuse(True)
        severed = proxy.sever()
        undo = (lambda: proxy.refuse(False)) if refuse else None
        details = {"severed": severed, "refusing": refuse}
        return self._record("connection_loss", f"proxy :{proxy.port}", details, undo)

    # -- read models --------------------------------------------------------

    def _read_model_tables(
        self, conn: psycopg.Connection[Any], projection: str
    ) -> list[sql.Identifier]:
        """The base tables of ``projection``'s live schema."""
        row = conn.execute(_queries()["live_schema"], {"name": projection}).fetchone()
        if row is None:
            raise LookupError(f"no projection named {projection!r}")
        schema = str(row[0])
        names = conn.execute(_queries()["schema_tables"], {"schema": schema}).fetchall()
        if not names:
            raise LookupError(f"projection {projection!r} has no tables in schema {schema!r}")
        return [sql.Identifier(schema, str(name)) for (name,) in names]

    def _trigger_on_read_model(
        self,
        kind: str,
        projection: str,
        function: str,
        argument: sql.Literal,
        details: dict[str, Any],
    ) -> Fault:
        trigger = sql.Identifier(f"aura_chaos_{kind}")
        with self._connect() as conn:
            conn.execute(_queries()["install"])
            tables = self._read_model_tables(conn, projection)
            with conn.transaction():
                for table in tables:
                    conn.execute(
                        sql.SQL(
                            "CREATE TRIGGER {} BEFORE INSERT OR UPDATE OR DELETE ON {} "
                            "FOR EACH STATEMENT EXECUTE FUNCTION {}({})"
                        ).format(trigger, table, sql.Identifier("aura_chaos", function), argument)
                    )

        def undo() -> None:
            with self._connect() as conn, conn.transaction():
                for table in tables:
                    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(trigger, table))

        details["tables"] = [table.as_string() for table in tables]
        return self._record(kind, projection, details, undo)

    def fail_projection(self, projection: str, sqlstate: str = "P0001") -> Fault:
        """Every write to the projection's read-model tables fails with
        ``sqlstate`` until undone. With the default (a handler error) the
        daemon retries, isolates and dead-letters events and opens the
        circuit, as for a broken handler; a class 53 state (resources) is
        retried without dead letters."""
        if not _SQLSTATE.match(sqlstate):
            raise ValueError(f"not a SQLSTATE: {sqlstate!r}")
        return self._trigger_on_read_model(
            "failure", projection, "fail", sql.Literal(sqlstate), {"sqlstate": sqlstate}
        )

    def slow_projection(self, projection: str, delay_seconds: float) -> Fault:
        """Every write statement to the projection's read-model tables waits
        ``delay_seconds`` first, until undone: a slow handler."""
        if not 0 < delay_seconds <= 60:
            raise ValueError(f"a delay between 0 and 60 seconds, not {delay_seconds}")
        return self._trigger_on_read_model(
            "delay",
            projection,
            "delay",
            sql.Literal(str(delay_seconds)),
            {"delay_ms": delay_seconds * 1000},
        )

    def disk_full(self, projection: str, room_kib: int = 256) -> Fault:
        """Move the projection's read-model tables onto a small tmpfs and fill
        it: their next extension fails with 53100, "No space left on
        device". Undo moves them back and removes the file system. Needs
        root and the server on this host."""
        if os.geteuid() != 0:
            raise ChaosUnavailable("disk_full mounts a tmpfs: it needs root")
        mountpoint = Path(tempfile.mkdtemp(prefix="aura-chaos-disk-"))
        moved: list[sql.Identifier] = []
        mounted = False

        def undo() -> None:
            with self._connect() as conn:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_FILLER))
                for table in moved:
                    conn.execute(sql.SQL("ALTER TABLE {} SET TABLESPACE pg_default").format(table))
                conn.execute(
                    sql.SQL("DROP TABLESPACE IF EXISTS {}").format(sql.Identifier(_TABLESPACE))
                )
            if mounted:
                subprocess.run(["umount", str(mountpoint)], check=True)
            mountpoint.rmdir()

        try:
            with self._connect() as conn:
                conn.execute(_queries()["install"])
                tables = self._read_model_tables(conn, projection)
                settings = conn.execute(_queries()["server_files"], {"name": projection}).fetchone()
                assert settings is not None
                server = Path(str(settings[0])).stat()
                used = int(settings[1])
                size_kib = used // 1024 + room_kib + 64
                options = f"size={size_kib}k,mode=0700"
                subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)], check=True
                )
                mounted = True
                os.chown(mountpoint, server.st_uid, server.st_gid)
                conn.execute(
                    sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(
                        sql.Identifier(_TABLESPACE), sql.Literal(str(mountpoint))
                    )
                )
                for table in tables:
                    conn.execute(
                        sql.SQL("ALTER TABLE {} SET TABLESPACE {}").format(
                            table, sql.Identifier(_TABLESPACE)
                        )
                    )
                    moved.append(table)
                conn.execute(
                    sql.SQL("CREATE TABLE {} (filler text) TABLESPACE {}").format(
                        _FILLER, sql.Identifier(_TABLESPACE)
                    )
                )
                filled = 0
                while True:
                    try:
                        conn.execute(_queries()["fill_tablespace"])
                    except psycopg.errors.DiskFull:
                        break
                    filled += 1
        except BaseException:
            undo()
            raise
        details = {
            "mountpoint": str(mountpoint),
            "size_kib": size_kib,
            "tables": len(moved),
            "filler_rows": filled * 1000,
        }
        return self._record("disk_full", projection, details, undo)

    # -- the debate domain --------------------------------------------------

    def debate_timeout(self, debate_id: str) -> Fault:
        """Time a running debate out now, through the domain, as if its
        agents had gone silent for its whole ``timeout_seconds``: the clock
        handed to the command is the debate's start plus its timeout."""
        from aura_pg.domain import DebateRepository  # the domain imports the store
        from aura_pg.store import EventStore

        with EventStore.connect(self.dsn, max_size=1) as store:
            repository = DebateRepository(store)
            debate = repository.load(debate_id)
            if debate.started_at is None:
                raise LookupError(f"no started debate {debate_id!r}")
            late = debate.started_at + timedelta(seconds=debate.rules.timeout_seconds + 1)
            result = repository.time_out(debate_id, late)
        return self._record("debate_timeout", debate_id, {"appended": result.appended})

    # -- stateless undo -----------------------------------------------------
    #
    # For callers that run each step in a new process (Chaos Toolkit's
    # actions, aura_pg.chaos.toolkit) and so cannot keep a Fault to undo:
    # each finds what is left behind by itself and takes it away.

    def start_postgres(self, timeout: float = 60.0) -> bool:
        """Start the local cluster if it is down (the undo of
        ``stop_postgres``); True when it had to. A data directory with no
        cluster in it is refused: starting it would create a new, empty one."""
        cluster = self._cluster()
        if not cluster.initialized:
            raise ChaosUnavailable(f"no Postgres cluster in {cluster.data_dir}")
        if cluster.is_running():
            return False
        cluster.start(timeout)
        log.warning("chaos: started the server on port %s again", cluster.port)
        return True

    def remove_read_model_faults(self, projection: str | None = None) -> list[str]:
        """Drop the triggers that ``fail_projection`` and ``slow_projection``
        put on read-model tables, found by their names: on ``projection``'s
        tables, or on every table when None. What was dropped, as
        ``schema.table: trigger``."""
        dropped: list[str] = []
        with self._connect() as conn:
            if projection is not None:
                self._read_model_tables(conn, projection)  # LookupError if unknown
            rows = conn.execute(_queries()["read_model_faults"], {"name": projection}).fetchall()
            with conn.transaction():
                for schema, table, trigger in rows:
                    conn.execute(
                        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                            sql.Identifier(str(trigger)), sql.Identifier(str(schema), str(table))
                        )
                    )
                    dropped.append(f"{schema}.{table}: {trigger}")
        if dropped:
            log.warning("chaos: dropped read-model faults %s", dropped)
        return dropped

    def poison_event(self, stream_id: str, event_type: str, data: dict[str, Any]) -> Fault:
        """Append one event whose payload a read model's handler cannot apply
        (the caller knows the handler: e.g. text where it casts to integer),
        marked ``{"aura_chaos": "poison"}`` in its metadata. The daemon
        retries it, dead-letters it and carries on; undo skips its pending
        dead letters."""
        from aura_pg.models import NewEvent  # the store imports the models
        from aura_pg.store import EventStore

        event = NewEvent(event_type, data, metadata={"aura_chaos": "poison"})
        with EventStore.connect(self.dsn, max_size=1) as store:
            recorded = store.append(stream_id, [event]).events[0]
        event_id = str(event.event_id)
        details = {
            "event_id": event_id,
            "event_type": event_type,
            "global_position": recorded.global_position,
        }

        def undo() -> None:
            self.skip_poison_dead_letters(event_id=event_id)

        return self._record("poison_event", stream_id, details, undo)

    def skip_poison_dead_letters(
        self, projection: str | None = None, *, event_id: str | None = None
    ) -> list[int]:
        """Skip (``aura.skip_dead_letter``) the pending dead letters of the
        events ``poison_event`` appended: of ``projection`` or all, of
        ``event_id`` or all. Their ids."""
        with self._connect() as conn:
            rows = conn.execute(
                _queries()["skip_poison_dead_letters"],
                {
                    "projection": projection,
                    "event_id": event_id,
                    "note": "aura-pg chaos: a poison event appended on purpose",
                },
            ).fetchall()
        return [int(row[0]) for row in rows]
