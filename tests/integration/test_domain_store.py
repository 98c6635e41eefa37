"""The debate domain on the real store: repository retries under real
concurrency, resends through real faults (a killed connection, a reply lost
after the commit), permanent errors raised at once, crash repair, an old v1
event, and the simulator's invariants."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from datetime import timedelta
from typing import Any, Self

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from aura_pg import ANY, AppendRetry, ConcurrencyError, EventStore, ExpectedVersion, NewEvent
from aura_pg.domain import (
    Closed,
    CommandResult,
    ConsensusResult,
    Debate,
    DebateRepository,
    DebateRules,
    DebateStatus,
    DecisionStatus,
    RetryPolicy,
    RuleViolation,
    SimulationProgress,
    debate_stream,
    decision_id_for,
    decision_stream,
    decode,
    encode,
    run_simulation,
)
from aura_pg.domain.events import DebateTimedOut, DebateVoteCast, DecisionProposed
from aura_pg.models import AppendResult, RecordedEvent
from tests.helpers.metrics import retries_counted
from tests.helpers.threads import run_together

AGENTS = tuple(f"agent-{i}" for i in range(1, 9))
ENDINGS = {"DEBATE_CONSENSUS_REACHED", "DEBATE_FAILED", "DEBATE_TIMED_OUT"}


def no_sleep(_: float) -> None:
    """The repository's backoff, skipped: these tests race on purpose."""


def open_for_votes(repo: DebateRepository, debate_id: str, agents: Sequence[str]) -> None:
    repo.start(debate_id, "Ship it?", agents, agents[0], DebateRules(quorum=0.75))
    for agent in agents:
        repo.add_argument(debate_id, agent, 1, "for", f"{agent} says yes", 0.7)
    repo.complete_round(debate_id, 1)


def assert_contiguous(events: Sequence[RecordedEvent]) -> None:
    assert [e.version for e in events] == list(range(1, len(events) + 1))


class HookedStore(EventStore):
    """The fixture's store (same pool) with a hook run before one append; it
    counts the appends the repository asks for and notes their ``retry=``."""

    def __init__(self, store: EventStore, before: Callable[[str], object] | None = None) -> None:
        super().__init__(store.pool)
        self.before = before
        self.retries: list[AppendRetry | None] = []

    @property
    def appends(self) -> int:
        return len(self.retries)

    def append(
        self,
        stream_id: str,
        events: NewEvent | Iterable[NewEvent],
        expected_version: ExpectedVersion = ANY,
        *,
        conn: psycopg.Connection[Any] | None = None,
        retry: AppendRetry | None = None,
    ) -> AppendResult:
        self.retries.append(retry)
        before, self.before = self.before, None  # once
        if before is not None:
            before(stream_id)
        return super().append(stream_id, events, expected_version, conn=conn, retry=retry)


def test_a_debate_through_the_repository(store: EventStore) -> None:
    repo = DebateRepository(store)
    open_for_votes(repo, "d1", AGENTS[:4])
    for agent, choice in zip(AGENTS[:4], ["approve", "approve", "reject", "approve"], strict=True):
        repo.cast_vote("d1", agent, choice, 0.9)  # type: ignore[arg-type]
    result = repo.reach_consensus("d1", "agent-1")
    assert result.debate.version == 1 + 4 + 1 + 4 + 1
    assert result.debate.appended == 1
    assert result.decision.appended == 1
    debate = repo.load("d1")
    assert debate.status is DebateStatus.CONSENSUS
    assert debate.decision_id == decision_id_for("d1")
    decision = repo.decisions.load(debate.decision_id)
    assert decision.status is DecisionStatus.PROPOSED
    assert decision.debate_id == "d1"
    assert decision.title == "approve: Ship it?"
    repo.decisions.approve(debate.decision_id, "agent-2")
    assert repo.decisions.load(debate.decision_id).status is DecisionStatus.APPROVED
    with pytest.raises(Closed):
        repo.add_argument("d1", "agent-1", 2, "against", "too late", 0.5)
    assert_contiguous(store.read_stream(debate_stream("d1")))


def test_eight_agents_voting_at_once_each_vote_recorded_once(store: EventStore) -> None:
    repo = DebateRepository(store)
    open_for_votes(repo, "d8", AGENTS)
    choices = ["approve"] * 6 + ["reject"] * 2
    results = run_together(
        8,
        lambda i: repo.cast_vote("d8", AGENTS[i], choices[i], 0.5),  # type: ignore[arg-type]
    )
    assert all(isinstance(r, CommandResult) and r.appended == 1 for r in results), results
    events = store.read_stream(debate_stream("d8"))
    assert_contiguous(events)
    votes = [decode(e) for e in events if e.type == "DEBATE_VOTE_CAST"]
    assert sorted(v.agent_id for v in votes if isinstance(v, DebateVoteCast)) == list(AGENTS)
    assert Counter(v.vote for v in votes if isinstance(v, DebateVoteCast)) == {
        "approve": 6,
        "reject": 2,
    }

    # All eight race to close the debate: one consensus, one decision.
    closing = run_together(8, lambda i: repo.reach_consensus("d8", AGENTS[i]))
    assert all(isinstance(r, ConsensusResult) for r in closing), closing
    assert sorted(r.debate.appended for r in closing) == [0] * 7 + [1]
    assert sorted(r.decision.appended for r in closing) == [0] * 7 + [1]
    events = store.read_stream(debate_stream("d8"))
    assert_contiguous(events)
    assert [e.type for e in events].count("DEBATE_CONSENSUS_REACHED") == 1
    assert events[-1].type == "DEBATE_CONSENSUS_REACHED"
    decision_events = store.read_stream(decision_stream(decision_id_for("d8")))
    assert [e.type for e in decision_events] == ["DECISION_PROPOSED"]


def test_a_conflict_reruns_the_command_against_the_latest_state(store: EventStore) -> None:
    plain = DebateRepository(store)
    open_for_votes(plain, "d2", AGENTS[:4])

    # Between this repository's read and its append, another writer records
    # agent-2's vote: the retry sees it and agent-3's vote goes in after it.
    hooked = HookedStore(store, before=lambda _: plain.cast_vote("d2", "agent-2", "reject", 0.1))
    result = DebateRepository(hooked, sleep=no_sleep).cast_vote("d2", "agent-3", "approve", 0.5)
    assert result.conflicts == 1
    assert result.appended == 1
    assert hooked.retries == [AppendRetry()] * 2  # the default policy's resends, each time
    assert [v for v in plain.load("d2").votes] == ["agent-2", "agent-3"]

    # The same agent voting meanwhile: the rerun refuses the second vote.
    hooked = HookedStore(store, before=lambda _: plain.cast_vote("d2", "agent-4", "reject", 0.1))
    with pytest.raises(RuleViolation) as info:
        DebateRepository(hooked, sleep=no_sleep).cast_vote("d2", "agent-4", "approve", 0.5)
    assert info.value.code == "already_voted"
    debate = plain.load("d2")
    assert debate.votes["agent-4"].vote == "reject"
    assert_contiguous(store.read_stream(debate_stream("d2")))


def test_conflicts_are_retried_only_so_often(store: EventStore) -> None:
    plain = DebateRepository(store)
    open_for_votes(plain, "d3", AGENTS[:4])
    rivals = iter(AGENTS[1:4])

    class AlwaysBeaten(EventStore):
        def append(self, stream_id: str, *args: Any, **kwargs: Any) -> AppendResult:
            plain.join("d3", f"late-{next(rivals)}")
            return super().append(stream_id, *args, **kwargs)

    repo = DebateRepository(AlwaysBeaten(store.pool), retry=RetryPolicy(max_attempts=3))
    with pytest.raises(ConcurrencyError):
        repo.cast_vote("d3", "agent-1", "approve", 0.5)
    assert plain.load("d3").votes == {}


# -- resends of the same batch through real faults ----------------------------

APP = "aura-pg repository resend test"
FAST = RetryPolicy(append_retry=AppendRetry(base_delay=0.02, max_delay=0.2, budget=20.0))


def connect_named(dsn: str, **pool_kwargs: Any) -> EventStore:
    """A store of one connection, named so a test can find its backend."""
    options = {"application_name": APP, **pool_kwargs.pop("kwargs", {})}
    return EventStore.connect(dsn, min_size=1, max_size=1, kwargs=options, **pool_kwargs)


def kill_named_backends(dsn: str) -> int:
    """pg_terminate_backend on the named store's connections, waiting until
    they are gone; how many there were."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s",
            [APP],
        ).fetchall()
    assert all(killed for (killed,) in rows), rows
    return len(rows)


def recorded_votes(store: EventStore, debate_id: str) -> list[RecordedEvent]:
    return [e for e in store.read_stream(debate_stream(debate_id)) if e.type == "DEBATE_VOTE_CAST"]


def vote_killing_the_connection_first(
    dsn: str, runs: list[int]
) -> Callable[[Debate], Sequence[NewEvent]]:
    """agent-1's vote, as a command that first kills the store's connection
    (which the read before it has just given back to the pool): the append
    takes a dead connection. Only the first run kills."""

    def command(debate: Debate) -> Sequence[NewEvent]:
        runs.append(debate.version)
        if len(runs) == 1:
            assert kill_named_backends(dsn) == 1
        return debate.cast_vote("agent-1", "approve", 0.5)

    return command


def test_an_append_on_a_killed_connection_is_resent_with_the_same_events(
    store: EventStore, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    open_for_votes(DebateRepository(store), "d4", AGENTS[:4])
    runs: list[int] = []
    counted = retries_counted()
    with connect_named(dsn) as named, caplog.at_level(logging.WARNING, logger="aura_pg.retry"):
        hooked = HookedStore(named)
        result = DebateRepository(hooked, retry=FAST).execute(
            "d4", vote_killing_the_connection_first(dsn, runs)
        )
    # The command ran once and the repository appended once: the store sent
    # that very batch again on a new connection, and counted it.
    assert len(runs) == 1
    assert hooked.retries == [FAST.append_retry]
    assert (result.duplicate, result.appended, result.conflicts) == (False, 1, 0)
    assert [e.event_id for e in recorded_votes(store, "d4")] == [result.events[0].event_id]
    assert retries_counted() == counted + 1  # server_shutdown (57P01) or connection
    assert "attempt 1 failed" in caplog.text
    assert_contiguous(store.read_stream(debate_stream("d4")))


def test_without_append_retry_the_killed_connection_reaches_the_caller(
    store: EventStore, dsn: str
) -> None:
    open_for_votes(DebateRepository(store), "d4", AGENTS[:4])
    runs: list[int] = []
    counted = retries_counted()
    with connect_named(dsn) as named, pytest.raises(psycopg.OperationalError):
        DebateRepository(named, retry=RetryPolicy(append_retry=None)).execute(
            "d4", vote_killing_the_connection_first(dsn, runs)
        )
    assert len(runs) == 1
    assert recorded_votes(store, "d4") == []
    assert retries_counted() == counted


def _shut(sock: socket.socket) -> None:
    with suppress(OSError):  # not connected any more
        sock.shutdown(socket.SHUT_RDWR)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _holds_ready_for_query(replies: bytes) -> bool:
    """Whether these server messages (from a message start) include
    ReadyForQuery, which the server sends once the statement committed."""
    at = 0
    while at + 5 <= len(replies):
        if replies[at : at + 1] == b"Z":
            return True
        at += 1 + int.from_bytes(replies[at + 1 : at + 5], "big")
    return False


class ReplyLosingProxy:
    """A TCP proxy in front of the test's Postgres that loses one reply for
    real: the server receives the statement, runs and commits it, and the
    proxy reads its whole answer (up to ReadyForQuery) and then cuts the
    client's connection instead of passing the answer on."""

    def __init__(self, dsn: str) -> None:
        info = conninfo_to_dict(dsn)
        self._upstream = (str(info["host"]), int(str(info["port"])))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        port = self._listener.getsockname()[1]
        self.dsn = make_conninfo(dsn, host="127.0.0.1", port=port, sslmode="disable")
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._armed = False
        self.marked = 0
        """Statements that held the marker, each one attempt reaching the server."""
        self.lost = 0
        """Replies read from the server and never passed on."""
        self._sockets: list[socket.socket] = []
        self._pumps: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def lose_reply_to(self, marker: bytes) -> None:
        """Lose the reply to the next statement whose bytes hold ``marker``."""
        with self._lock:
            self._marker, self._armed = marker, True

    def __enter__(self) -> Self:
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._acceptor.join(timeout=10)
        for sock in self._sockets:
            _shut(sock)
        for pump in self._pumps:
            pump.join(timeout=10)
        for sock in self._sockets:
            sock.close()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(self._upstream)
            doomed = threading.Event()
            self._sockets += [client, server]
            for pump in (self._requests, self._replies):
                thread = threading.Thread(target=pump, args=(client, server, doomed), daemon=True)
                self._pumps.append(thread)
                thread.start()

    def _requests(
        self, client: socket.socket, server: socket.socket, doomed: threading.Event
    ) -> None:
        tail = b""
        while chunk := _recv(client):
            with self._lock:
                marker = self._marker
                if marker is not None and marker in tail + chunk:
                    self.marked += 1
                    if self._armed:  # doomed before the server has the statement
                        self._armed = False
                        doomed.set()
                tail = (tail + chunk)[-(len(marker) - 1) :] if marker else b""
            try:
                server.sendall(chunk)
            except OSError:
                break
        _shut(server)
        _shut(client)

    def _replies(
        self, client: socket.socket, server: socket.socket, doomed: threading.Event
    ) -> None:
        held = b""
        while chunk := _recv(server):
            if not doomed.is_set():
                try:
                    client.sendall(chunk)
                except OSError:
                    break
                continue
            held += chunk
            if _holds_ready_for_query(held):  # committed: now lose the answer
                with self._lock:
                    self.lost += 1
                break
        _shut(client)
        _shut(server)


def test_a_reply_lost_after_the_commit_is_resent_and_answered_as_a_duplicate(
    store: EventStore, dsn: str
) -> None:
    """The unknown outcome this exists for: the vote commits, its answer
    never arrives. The resend of the same batch finds it recorded."""
    open_for_votes(DebateRepository(store), "d4", AGENTS[:4])
    counted = retries_counted("connection")
    with ReplyLosingProxy(dsn) as proxy, EventStore.connect(proxy.dsn, max_size=1) as far:
        proxy.lose_reply_to(b'"d4:vote:agent-1"')
        hooked = HookedStore(far)
        result = DebateRepository(hooked, retry=FAST).cast_vote("d4", "agent-1", "approve", 0.5)
    assert (proxy.lost, proxy.marked) == (1, 2)  # the batch reached the server twice
    assert hooked.retries == [FAST.append_retry]
    assert (result.duplicate, result.appended, result.conflicts) == (True, 0, 0)
    assert [e.event_id for e in recorded_votes(store, "d4")] == [result.events[0].event_id]
    assert result.version == len(store.read_stream(debate_stream("d4")))
    assert retries_counted("connection") == counted + 1


@contextmanager
def permanent_fault(fault: str, dsn: str, stream_id: str) -> Iterator[dict[str, Any]]:
    """Sets up a fault no resend can cure; yields the failing store's
    connection settings."""
    with ExitStack() as stack:
        if fault == "lock_timeout":
            # 55P03, an OperationalError: a limit the caller set, not a lost connection
            blocker = stack.enter_context(psycopg.connect(dsn))
            blocker.execute(  # the stream's append lock (aura.append_events)
                "SELECT pg_advisory_xact_lock(1635087475, hashtext(%s))", [stream_id]
            )
            yield {"options": "-c lock_timeout=100"}
        elif fault == "read_only":
            # 25006: pointed at a server (or role) that cannot write
            yield {"options": "-c default_transaction_read_only=on"}
        else:
            # 42883: the schema is not what the code expects (reads still work)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ALTER FUNCTION aura.event_problem(jsonb, bigint) RENAME TO elsewhere")
            yield {}


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("lock_timeout", errors.LockNotAvailable),
        ("read_only", errors.ReadOnlySqlTransaction),
        ("undefined_function", errors.UndefinedFunction),
    ],
)
def test_a_permanent_error_is_raised_at_once_without_resends(
    store: EventStore,
    dsn: str,
    fault: str,
    error: type[psycopg.Error],
    caplog: pytest.LogCaptureFixture,
) -> None:
    open_for_votes(DebateRepository(store), "d4", AGENTS[:4])
    counted = retries_counted()
    with (
        permanent_fault(fault, dsn, debate_stream("d4")) as settings,
        connect_named(dsn, kwargs=settings) as failing,
        caplog.at_level(logging.WARNING, logger="aura_pg.retry"),
    ):
        hooked = HookedStore(failing)
        with pytest.raises(error):
            DebateRepository(hooked, retry=FAST).cast_vote("d4", "agent-1", "approve", 0.5)
    assert hooked.retries == [FAST.append_retry]  # one append, and the store did not resend
    assert retries_counted() == counted
    assert "attempt" not in caplog.text
    assert recorded_votes(store, "d4") == []


def test_a_store_that_cannot_log_in_fails_the_command_before_any_append(
    store: EventStore, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong credentials never reach an append: the pool cannot open a
    connection (the role does not exist) and says so as a pool timeout,
    raised by the command's first read after the pool's ``timeout``."""
    open_for_votes(DebateRepository(store), "d4", AGENTS[:4])
    pool: ConnectionPool[Any] = ConnectionPool(
        make_conninfo(dsn, user="nobody_at_all"), min_size=1, open=False, timeout=0.5
    )
    pool.open(wait=False)
    counted = retries_counted()
    with EventStore(pool, owns_pool=True) as locked_out, caplog.at_level(logging.WARNING):
        hooked = HookedStore(locked_out)
        with pytest.raises(PoolTimeout):
            DebateRepository(hooked, retry=FAST).cast_vote("d4", "agent-1", "approve", 0.5)
    assert 'role "nobody_at_all" does not exist' in caplog.text  # the pool's log says why
    assert hooked.appends == 0
    assert retries_counted() == counted
    assert recorded_votes(store, "d4") == []


def test_a_crash_between_consensus_and_decision_is_repaired_by_rerunning(
    store: EventStore,
) -> None:
    plain = DebateRepository(store)
    open_for_votes(plain, "d5", AGENTS[:4])
    for agent in AGENTS[:3]:
        plain.cast_vote("d5", agent, "reject", 0.5)

    class CrashOnDecision(EventStore):
        def append(self, stream_id: str, *args: Any, **kwargs: Any) -> AppendResult:
            if stream_id.startswith("decision-"):
                raise KeyboardInterrupt  # the process dies between the two appends
            return super().append(stream_id, *args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        DebateRepository(CrashOnDecision(store.pool)).reach_consensus("d5", "agent-1")
    decision_id = decision_id_for("d5")
    assert plain.load("d5").status is DebateStatus.CONSENSUS
    assert store.read_stream(decision_stream(decision_id)) == []

    repaired = plain.reach_consensus("d5", "agent-1")
    assert (repaired.debate.appended, repaired.decision.appended) == (0, 1)
    assert plain.reach_consensus("d5", "agent-1").appended == 0
    assert plain.ensure_decision("d5", "agent-1").appended == 0
    events = store.read_stream(decision_stream(decision_id))
    assert [e.type for e in events] == ["DECISION_PROPOSED"]
    proposal = decode(events[0])
    assert isinstance(proposal, DecisionProposed)
    assert (proposal.debate_id, proposal.title) == ("d5", "reject: Ship it?")


def test_a_proposal_recorded_with_other_content_is_not_duplicated(store: EventStore) -> None:
    """Two proposers racing: the loser's same-key append is an idempotency
    conflict; the repository reloads, sees the proposal and does nothing."""
    plain = DebateRepository(store)
    open_for_votes(plain, "d6", AGENTS[:3])
    for agent in AGENTS[:3]:
        plain.cast_vote("d6", agent, "approve", 0.5)
    decision_id = decision_id_for("d6")

    def rival(_: str) -> None:
        plain.ensure_decision("d6", "agent-2")

    plain.execute("d6", lambda d: d.reach_consensus(decision_id))  # no proposal yet
    hooked = HookedStore(store, before=rival)
    repo = DebateRepository(hooked, sleep=no_sleep)
    assert repo.ensure_decision("d6", "agent-3").appended == 0
    events = store.read_stream(decision_stream(decision_id))
    assert len(events) == 1
    assert events[0].data["proposed_by"] == "agent-2"


def test_an_old_v1_debate_started_is_read_through_todays_model(store: EventStore, dsn: str) -> None:
    v1 = [
        {
            "type": "DEBATE_STARTED",
            "data": {"debate_id": "old", "topic": "Legacy", "agents": ["x1", "x2", "x3"]},
            "metadata": {"schema_version": 1},
            "idempotency_key": "old:started",
        }
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT * FROM aura.append_events(%s, %s::jsonb, 'no_stream')",
            (debate_stream("old"), json.dumps(v1)),
        )
    repo = DebateRepository(store)
    debate = repo.load("old")
    assert debate.status is DebateStatus.OPEN
    assert debate.participants == ("x1", "x2", "x3")
    assert debate.started_by == "x1"
    assert debate.rules == DebateRules()
    assert debate.started_at is not None
    # and the debate goes on under today's rules
    repo.join("old", "x4")
    for agent in ("x1", "x2", "x3", "x4"):
        repo.add_argument("old", agent, 1, "neutral", "still here", 0.5)
    repo.complete_round("old", 1)
    repo.time_out("old", debate.started_at + timedelta(seconds=301))
    events = store.read_stream(debate_stream("old"))
    assert_contiguous(events)
    assert events[0].metadata["schema_version"] == 1
    assert events[1].metadata["schema_version"] == 1  # AGENT_JOINED is at v1 too
    assert events[-1].type == "DEBATE_TIMED_OUT"
    assert repo.load("old").status is DebateStatus.TIMED_OUT


def test_a_v2_start_written_by_encode_is_what_the_store_gives_back(store: EventStore) -> None:
    repo = DebateRepository(store)
    repo.start("d7", "Now", AGENTS[:3], "agent-1", DebateRules(max_rounds=5, quorum=0.9))
    (event,) = store.read_stream(debate_stream("d7"))
    assert event.metadata == {"schema_version": 2}
    assert event.idempotency_key == "d7:started"
    assert encode(decode(event), idempotency_key="d7:started").data == event.data


# -- the simulator ------------------------------------------------------------


def check_debate(store: EventStore, result: Any) -> None:
    """The invariants of one simulated debate, from its stream."""
    events = store.read_stream(debate_stream(result.debate_id))
    assert_contiguous(events)
    types = [e.type for e in events]
    assert types[0] == "DEBATE_STARTED"
    assert sum(t in ENDINGS for t in types) == 1
    assert types[-1] in ENDINGS  # nothing at all after the end
    payloads = [decode(e) for e in events]
    ending = payloads[-1]
    votes = Counter(p.vote for p in payloads if isinstance(p, DebateVoteCast))
    voters = [p.agent_id for p in payloads if isinstance(p, DebateVoteCast)]
    assert len(voters) == len(set(voters))
    debate = DebateRepository(store).load(result.debate_id)
    assert debate.status.value == result.outcome
    assert (result.votes_for, result.votes_against) == (votes["approve"], votes["reject"])
    needed = debate.votes_needed()
    if result.outcome == "consensus":
        data = events[-1].data
        assert (data["votes_for"], data["votes_against"]) == (votes["approve"], votes["reject"])
        assert max(votes["approve"], votes["reject"]) >= needed
        assert data["outcome"] == ("approve" if votes["approve"] >= needed else "reject")
        decision = DebateRepository(store).decisions.load(data["decision_id"])
        assert decision.debate_id == result.debate_id
        expected = (
            DecisionStatus.APPROVED if data["outcome"] == "approve" else DecisionStatus.REJECTED
        )
        assert decision.status is expected
    elif result.outcome == "failed":
        assert len(voters) == len(debate.participants)
        assert max(votes["approve"], votes["reject"]) < needed
        assert (events[-1].data["votes_for"], events[-1].data["votes_against"]) == (
            votes["approve"],
            votes["reject"],
        )
        assert result.decision_id is None
    else:
        assert voters == []
        assert ending == DebateTimedOut(rounds_completed=debate.rounds_completed)
        assert result.simulated_seconds > debate.rules.timeout_seconds
    if result.outcome != "consensus":
        assert store.read_stream(decision_stream(decision_id_for(result.debate_id))) == []


def test_the_simulator_ends_every_debate_keeping_the_invariants(
    store: EventStore, dsn: str
) -> None:
    seen: list[SimulationProgress] = []
    summary = run_simulation(
        store, debates=20, agents=5, seed=11, workers=4, prefix="sim", progress=seen.append
    )
    assert summary.debate_ids == tuple(f"sim-{i:04d}" for i in range(1, 21))
    assert sum(summary.outcomes.values()) == 20
    assert set(summary.outcomes) == {"consensus", "failed", "timed_out"}
    for result in summary.results:
        check_debate(store, result)
    assert Counter(r.outcome for r in summary.results) == {
        k: v for k, v in summary.outcomes.items() if v
    }
    consensus = [r for r in summary.results if r.outcome == "consensus"]
    assert summary.decisions_approved + summary.decisions_rejected == len(consensus)

    # Every event the summary counts is in the store, and no other.
    streams = [debate_stream(r.debate_id) for r in summary.results]
    streams += [decision_stream(r.decision_id) for r in consensus if r.decision_id]
    assert summary.events_appended == sum(len(store.read_stream(s)) for s in streams)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM aura.events").fetchone()
    assert row is not None and row[0] == summary.events_appended

    assert [p.debates_done for p in seen] == list(range(1, 21))
    assert seen[-1].outcomes == summary.outcomes
    assert seen[-1].events_appended == summary.events_appended


def test_simulated_outcomes_depend_on_the_seed_alone(store: EventStore) -> None:
    """Single-threaded and concurrent runs of one seed end every debate the
    same way; and the seed gives all three endings."""
    alone = run_simulation(store, debates=24, agents=6, seed=5, workers=1, prefix="one")
    together = run_simulation(store, debates=24, agents=6, seed=5, workers=6, prefix="many")

    def shape(summary: Any) -> list[tuple[Any, ...]]:
        return [
            (r.outcome, r.participants, r.rounds_completed, r.votes_for, r.votes_against)
            for r in summary.results
        ]

    assert shape(alone) == shape(together)
    assert alone.events_appended == together.events_appended
    assert alone.conflicts_retried == 0
    assert all(count > 0 for count in alone.outcomes.values()), alone.outcomes
    for result in together.results:
        check_debate(store, result)
