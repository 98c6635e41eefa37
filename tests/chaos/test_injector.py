"""Each fault of aura_pg.chaos does what it says to a real system, and its
undo takes it away: measured latency through the proxy, severed and
refused connections, terminated sessions, a SIGKILLed daemon, a failing, a
slow and a full read model, capped memory, a debate timed out. After every
fault the read model ends exactly the fold of the log."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from aura_pg import AppendRetry, EventStore, NewEvent
from aura_pg.chaos import ChaosUnavailable, FailureInjector, LatencyProxy, measure_round_trip
from aura_pg.chaos.injector import process_status_kib
from aura_pg.domain import DebateRepository
from tests.helpers.projections import (
    FIXTURE_CATALOG,
    applied_positions,
    assert_exact_fold,
    caught_up,
    fold_streams,
    log_positions,
    query,
    running_daemon,
    status_of,
    stream_counts,
    wait_for,
    wait_for_sync,
)

ROOT = Path(__file__).resolve().parents[2]
AURA_PG = str(Path(sys.executable).with_name("aura-pg"))


def append_some(dsn: str, count: int, prefix: str = "c", **data: object) -> None:
    with EventStore.connect(dsn, max_size=1) as store:
        for n in range(count):
            store.append(f"{prefix}-{n % 4}", [NewEvent("A", {"n": n, **data})])


def dead_letters(dsn: str) -> int:
    return int(query(dsn, "SELECT count(*) FROM aura.dead_letters")[0][0])


@pytest.fixture
def proxy(dsn: str) -> Iterator[LatencyProxy]:
    with LatencyProxy.in_front_of(dsn) as running:
        yield running


def test_latency_is_measured_through_the_proxy_and_undone(dsn: str, proxy: LatencyProxy) -> None:
    injector = FailureInjector(dsn, proxy=proxy)
    through = proxy.dsn(dsn)
    fault = injector.network_latency(0.02, samples=5)
    # 20 ms each way: a round trip of at least 40 ms, measured, not assumed.
    assert fault.details["round_trip_after_ms"] >= 40
    assert fault.details["round_trip_before_ms"] < 20
    fault.undo()
    assert measure_round_trip(through, 5) < 0.02
    assert not fault.active


def test_severed_and_refused_connections(dsn: str, proxy: LatencyProxy) -> None:
    with EventStore.connect(proxy.dsn(dsn), max_size=1, timeout=2) as store:
        store.append("s", [NewEvent("A", {})])
        with FailureInjector(dsn, proxy=proxy) as injector:
            lost = injector.connection_loss()
            assert lost.details["severed"] == 1
            # The pool's connection died under it; a retrying append lands once.
            result = store.append("s", [NewEvent("A", {})], retry=AppendRetry(base_delay=0.01))
            assert result.version == 2

            injector.connection_loss(refuse=True)
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(proxy.dsn(dsn), connect_timeout=2).close()
        # Leaving the block undid the refusal.
        psycopg.connect(proxy.dsn(dsn), connect_timeout=2).close()
    assert query(dsn, "SELECT count(*) FROM aura.events")[0][0] == 2


async def test_terminated_daemon_sessions_reconnect(dsn: str) -> None:
    injector = FailureInjector(dsn)
    async with running_daemon(dsn, ["tally_set"]):
        await asyncio.to_thread(append_some, dsn, 20)
        await wait_for(lambda: caught_up(dsn, "tally_set"), what="first catch-up")
        fault = injector.terminate_backends()
        # The runner's and the log watcher's sessions, at least.
        assert fault.details["terminated"] >= 2
        await asyncio.to_thread(append_some, dsn, 20, "d")
        await wait_for(lambda: caught_up(dsn, "tally_set"), what="catch-up after")
    assert_exact_fold(dsn, "tally_set")


def start_daemon(dsn: str, log: Path, *names: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [AURA_PG, "project", *names, "--dsn", dsn, "--catalog", str(FIXTURE_CATALOG),
             "--poll-interval", "0.2", "--log-format", "json"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=handle,
        )  # fmt: skip


def owned_by(dsn: str, name: str, process: subprocess.Popen[bytes]) -> bool:
    status = query(dsn, "SELECT owner FROM aura.projection_checkpoints WHERE name = %s", [name])
    return bool(status) and str(status[0][0]).endswith(f":{process.pid}")


def test_kill_projector_finds_the_owner_and_a_stand_by_takes_over(dsn: str, tmp_path: Path) -> None:
    first = start_daemon(dsn, tmp_path / "first.log", "tally_set")
    second = start_daemon(dsn, tmp_path / "second.log", "tally_set")
    try:
        wait_for_sync(
            lambda: owned_by(dsn, "tally_set", first) or owned_by(dsn, "tally_set", second), 60
        )
        owner, stand_by = (first, second) if owned_by(dsn, "tally_set", first) else (second, first)
        fault = FailureInjector(dsn).kill_projector(projection="tally_set")
        assert fault.details["pid"] == owner.pid
        assert owner.wait(5) == -9
        append_some(dsn, 30)
        wait_for_sync(lambda: owned_by(dsn, "tally_set", stand_by), 60, "the stand-by's takeover")
        wait_for_sync(lambda: caught_up(dsn, "tally_set"), 30)
    finally:
        for process in (first, second):
            process.kill()
            process.wait(10)
    assert_exact_fold(dsn, "tally_set")
    with pytest.raises(LookupError, match="is not running"):
        FailureInjector(dsn).kill_projector(projection="tally_set")


async def test_a_failing_read_model_dead_letters_and_recovers(dsn: str) -> None:
    injector = FailureInjector(dsn)
    async with running_daemon(dsn, ["tally_set"]):
        await asyncio.to_thread(append_some, dsn, 5)
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        fault = injector.fail_projection("tally_set")
        assert fault.details["tables"]
        await asyncio.to_thread(append_some, dsn, 5, "e")
        # A handler error: retried, then dead-lettered, event by event.
        await wait_for(lambda: dead_letters(dsn) >= 1, what="a dead letter")
        assert "fails on purpose" in str(status_of(dsn, "tally_set")["last_error"])
        fault.undo()
        for (letter,) in query(dsn, "SELECT id FROM aura.dead_letters WHERE status = 'pending'"):
            query(dsn, "SELECT aura.retry_dead_letter(%s)", [letter])
        await wait_for(lambda: caught_up(dsn, "tally_set"), what="catch-up after the undo")
    assert sorted(applied_positions(dsn, "tally_set")) == log_positions(dsn)
    assert stream_counts(dsn, "tally_set") == fold_streams(dsn)


async def test_a_resource_failure_is_retried_without_dead_letters(dsn: str) -> None:
    injector = FailureInjector(dsn)
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"), what="registration")
        with injector.fail_projection("tally_set", sqlstate="53200"):
            await asyncio.to_thread(append_some, dsn, 10)
            await wait_for(lambda: status_of(dsn, "tally_set")["last_error"], what="an error")
            await asyncio.sleep(1.0)
            assert not caught_up(dsn, "tally_set")
        await wait_for(lambda: caught_up(dsn, "tally_set"), what="catch-up after the undo")
    assert dead_letters(dsn) == 0
    assert_exact_fold(dsn, "tally_set")


async def test_a_slow_read_model_slows_each_batch(dsn: str) -> None:
    injector = FailureInjector(dsn)
    async with running_daemon(dsn, ["tally_set"]):
        await wait_for(lambda: caught_up(dsn, "tally_set"), what="registration")
        with injector.slow_projection("tally_set", 0.3):
            started = time.monotonic()
            await asyncio.to_thread(append_some, dsn, 1)
            await wait_for(lambda: caught_up(dsn, "tally_set"))
            # Two statements (applied_events, streams) wait 0.3 s each.
            assert time.monotonic() - started >= 0.6
        await asyncio.to_thread(append_some, dsn, 10, "f")
        await wait_for(lambda: caught_up(dsn, "tally_set"))
    assert_exact_fold(dsn, "tally_set")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_a_full_disk_stalls_the_projection_without_loss(dsn: str) -> None:
    injector = FailureInjector(dsn)
    async with running_daemon(dsn, ["tally_set"]):
        await asyncio.to_thread(append_some, dsn, 5)
        await wait_for(lambda: caught_up(dsn, "tally_set"))
        with injector.disk_full("tally_set", room_kib=0):
            # Enough rows to need new pages: the table cannot extend.
            await asyncio.to_thread(append_some, dsn, 400, "g", pad="x" * 200)
            error = await wait_for(
                lambda: status_of(dsn, "tally_set")["last_error"], what="the disk-full error"
            )
            assert "No space left on device" in str(error)
            assert not caught_up(dsn, "tally_set")
        await wait_for(lambda: caught_up(dsn, "tally_set"), 30, "catch-up after the undo")
    assert dead_letters(dsn) == 0  # a full disk is no reason to dead-letter events
    assert_exact_fold(dsn, "tally_set")
    assert query(
        dsn, "SELECT count(*) FROM pg_tablespace WHERE starts_with(spcname, 'aura_chaos')"
    ) == [(0,)]


def address_space_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max address space"):
            return line.split()[3]
    raise AssertionError("no address space limit line")


def test_memory_pressure_binds_and_the_daemon_needs_no_memory_per_event(
    dsn: str, tmp_path: Path
) -> None:
    """The cap is real (a capped process that allocates gets MemoryError),
    and a capped daemon folds large events anyway: batches are applied in
    the server, so event payloads never pass through the daemon."""
    injector = FailureInjector(dsn)
    hungry = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline(); bytearray(256 * 2**20)"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    injector.memory_pressure(hungry.pid, headroom_mib=16)
    _, errors = hungry.communicate("go\n", timeout=30)
    assert hungry.returncode == 1 and "MemoryError" in errors

    daemon = start_daemon(dsn, tmp_path / "daemon.log", "tally_set")
    try:
        wait_for_sync(lambda: owned_by(dsn, "tally_set", daemon), 60)
        fault = injector.memory_pressure(daemon.pid, headroom_mib=16)
        limit = fault.details["address_space_limit_mib"] * 2**20
        assert int(address_space_limit(daemon.pid)) // 2**20 == limit // 2**20
        append_some(dsn, 120, "h", pad="x" * 2**19)  # 60 MiB of payloads
        wait_for_sync(lambda: caught_up(dsn, "tally_set"), 60, "catch-up under the cap")
        assert daemon.poll() is None
        assert process_status_kib(daemon.pid, "VmSize") * 1024 <= limit
        fault.undo()
        assert address_space_limit(daemon.pid) == "unlimited"
    finally:
        daemon.kill()
        daemon.wait(10)
    assert dead_letters(dsn) == 0
    assert_exact_fold(dsn, "tally_set")


def test_debate_timeout_ends_a_running_debate(store: EventStore, dsn: str) -> None:
    repository = DebateRepository(store)
    repository.start("d-1", "Is the test green?", ["a1", "a2", "a3"], "moderator")
    fault = FailureInjector(dsn).debate_timeout("d-1")
    assert fault.details["appended"] == 1
    assert repository.load("d-1").status.value == "timed_out"


def test_server_faults_need_a_cluster_and_network_faults_a_proxy(dsn: str) -> None:
    injector = FailureInjector(dsn)
    with pytest.raises(ChaosUnavailable):
        injector.restart_postgres()
    with pytest.raises(ChaosUnavailable):
        injector.network_latency(0.01)
    with pytest.raises(ValueError, match="not a SQLSTATE"):
        injector.fail_projection("tally_set", sqlstate="x'; DROP")


def test_a_daemon_started_during_an_outage_waits_for_the_database(
    dsn: str, proxy: LatencyProxy, tmp_path: Path
) -> None:
    append_some(dsn, 10)
    proxy.refuse(True)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(proxy.dsn(dsn), log, "tally_set")
    try:
        wait_for_sync(lambda: "database unreachable" in log.read_text(), 30, "the warning")
        assert daemon.poll() is None, log.read_text()
        proxy.refuse(False)
        wait_for_sync(lambda: caught_up(dsn, "tally_set"), 60, "catch-up once reachable")
    finally:
        daemon.kill()
        daemon.wait(10)
    assert_exact_fold(dsn, "tally_set")
