"""The task service's commands against a real database: what each appends,
each refusal by its code (with nothing written), the claim timeout,
racing claims, an upcast v1 event and snapshots."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

import pytest

from aura_pg import EventStore, NewEvent
from aura_pg.aggregates import DomainError, Repository
from task_service.aggregate import Task
from task_service.service import TaskService
from task_service.tests.conftest import Clock

TIMEOUT = 60.0


def types_in(store: EventStore, task_id: str) -> list[str]:
    return [event.type for event in store.read_stream(Task.stream_id(task_id))]


def refused(code: str, command: Callable[[], object]) -> DomainError:
    with pytest.raises(DomainError) as caught:
        command()
    assert caught.value.code == code, caught.value
    return caught.value


def test_a_task_is_created_claimed_and_completed(
    service: TaskService, store: EventStore, clock: Clock
) -> None:
    created = service.create("t1", "triage bug 7", requested_by="ada", claim_timeout_seconds=30)
    assert (created.stream_id, created.version, created.appended) == ("task-t1", 1, 1)
    clock.advance(5)
    assert service.claim("t1", "agent-a").version == 2
    claimed = service.get("t1")
    assert (claimed.status, claimed.agent, claimed.claimed_at) == ("claimed", "agent-a", clock.now)
    service.complete("t1", "agent-a", "fixed")
    task = service.get("t1")
    assert (task.status, task.agent, task.result, task.version) == (
        "completed",
        "agent-a",
        "fixed",
        3,
    )
    assert (task.title, task.requested_by, task.claim_timeout.total_seconds()) == (
        "triage bug 7",
        "ada",
        30,
    )
    assert types_in(store, "t1") == ["TASK_CREATED", "TASK_CLAIMED", "TASK_COMPLETED"]
    # The payload is stored with its schema version.
    assert store.read_stream("task-t1")[0].metadata["schema_version"] == 2


def test_refusals_have_codes_and_write_nothing(
    service: TaskService, store: EventStore, clock: Clock
) -> None:
    refused("unknown_task", lambda: service.claim("nope", "agent-a"))
    refused("unknown_task", lambda: service.complete("nope", "agent-a", "x"))
    refused("invalid_title", lambda: service.create("t", "  ", requested_by="ada"))
    for timeout in (0, -1, float("nan"), float("inf")):
        create = partial(service.create, "t", "x", requested_by="ada")
        refused("invalid_timeout", partial(create, claim_timeout_seconds=timeout))
    assert store.read_stream("task-nope") == []
    assert store.read_stream("task-t") == []

    service.create("t", "write docs", requested_by="ada", claim_timeout_seconds=TIMEOUT)
    refused("already_created", lambda: service.create("t", "again", requested_by="bob"))
    refused("not_claimed", lambda: service.complete("t", "agent-a", "done"))
    service.claim("t", "agent-a")
    refused("claim_held", lambda: service.claim("t", "agent-b"))
    refused("not_claimant", lambda: service.complete("t", "agent-b", "done"))
    assert types_in(store, "t") == ["TASK_CREATED", "TASK_CLAIMED"]

    service.complete("t", "agent-a", "done")
    refused("already_completed", lambda: service.claim("t", "agent-b"))
    clock.advance(TIMEOUT * 10)  # a completed task is never reassigned
    refused("already_completed", lambda: service.claim("t", "agent-b"))
    refused("already_completed", lambda: service.complete("t", "agent-a", "twice"))
    assert types_in(store, "t") == ["TASK_CREATED", "TASK_CLAIMED", "TASK_COMPLETED"]


def test_a_claim_older_than_the_timeout_may_be_taken_over(
    service: TaskService, store: EventStore, clock: Clock
) -> None:
    service.create("t", "index the wiki", requested_by="ada", claim_timeout_seconds=TIMEOUT)
    service.claim("t", "agent-a")
    clock.advance(TIMEOUT - 0.001)
    refused("claim_held", lambda: service.claim("t", "agent-b"))
    clock.advance(0.001)  # exactly the timeout: the claim has lapsed
    service.claim("t", "agent-b")
    task = service.get("t")
    assert (task.agent, task.claimed_at, task.claims) == ("agent-b", clock.now, 2)
    [reassigned] = store.read_stream("task-t", from_version=3)
    assert reassigned.type == "TASK_REASSIGNED"
    assert reassigned.data["previous_agent"] == "agent-a"
    # The former holder lost the task; the new claim holds for a full timeout.
    refused("not_claimant", lambda: service.complete("t", "agent-a", "late"))
    clock.advance(TIMEOUT / 2)
    refused("claim_held", lambda: service.claim("t", "agent-a"))
    service.complete("t", "agent-b", "indexed")
    assert service.get("t").result == "indexed"


def test_a_lapsed_claim_is_still_the_holders_until_taken_over(
    service: TaskService, clock: Clock
) -> None:
    service.create("t", "rotate keys", requested_by="ada", claim_timeout_seconds=TIMEOUT)
    service.claim("t", "agent-a")
    clock.advance(TIMEOUT * 3)
    service.complete("t", "agent-a", "rotated")
    assert service.get("t").status == "completed"


def test_claiming_a_task_one_holds_appends_nothing(service: TaskService, clock: Clock) -> None:
    service.create("t", "x", requested_by="ada", claim_timeout_seconds=TIMEOUT)
    service.claim("t", "agent-a")
    clock.advance(TIMEOUT * 2)  # lapsed, but nobody took it
    again = service.claim("t", "agent-a")
    assert (again.events, again.version, again.appended) == ((), 2, 0)


def race(agents: list[str], command: Callable[[str], object]) -> dict[str, object]:
    """Run ``command(agent)`` for every agent at once, one thread each;
    each agent's result or exception."""
    barrier = threading.Barrier(len(agents))
    outcomes: dict[str, object] = {}

    def attempt(agent: str) -> None:
        barrier.wait()
        try:
            outcomes[agent] = command(agent)
        except Exception as exc:
            outcomes[agent] = exc

    threads = [threading.Thread(target=attempt, args=(agent,)) for agent in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == len(agents)
    return outcomes


def winners_and_codes(outcomes: dict[str, object]) -> tuple[list[str], set[str]]:
    winners = [agent for agent, outcome in outcomes.items() if not isinstance(outcome, Exception)]
    codes = set()
    for outcome in outcomes.values():
        if isinstance(outcome, Exception):
            assert isinstance(outcome, DomainError), repr(outcome)
            codes.add(outcome.code)
    return winners, codes


@pytest.mark.parametrize("round_", range(3))
def test_racing_claims_only_one_agent_wins(
    service: TaskService, store: EventStore, clock: Clock, round_: int
) -> None:
    agents = [f"agent-{n}" for n in range(8)]
    service.create("open", "an open task", requested_by="ada", claim_timeout_seconds=TIMEOUT)
    winners, codes = winners_and_codes(race(agents, lambda agent: service.claim("open", agent)))
    assert len(winners) == 1
    assert codes == {"claim_held"}
    assert service.get("open").agent == winners[0]
    assert types_in(store, "open") == ["TASK_CREATED", "TASK_CLAIMED"]

    # Once the claim lapses, the others race to take it over: again one wins.
    clock.advance(TIMEOUT)
    others = [agent for agent in agents if agent != winners[0]]
    taken, codes = winners_and_codes(race(others, lambda agent: service.claim("open", agent)))
    assert len(taken) == 1
    assert codes == {"claim_held"}
    assert service.get("open").agent == taken[0]
    assert types_in(store, "open") == ["TASK_CREATED", "TASK_CLAIMED", "TASK_REASSIGNED"]


def test_completion_racing_a_takeover_one_of_them_wins(
    service: TaskService, store: EventStore, clock: Clock
) -> None:
    service.create("t", "x", requested_by="ada", claim_timeout_seconds=TIMEOUT)
    service.claim("t", "agent-a")
    clock.advance(TIMEOUT)
    outcomes = race(
        ["agent-a", "agent-b"],
        lambda agent: (
            service.complete("t", agent, "done")
            if agent == "agent-a"
            else service.claim("t", agent)
        ),
    )
    winners, codes = winners_and_codes(outcomes)
    assert len(winners) == 1
    task = service.get("t")
    if winners == ["agent-a"]:
        assert codes == {"already_completed"}
        assert task.status == "completed"
    else:
        assert codes == {"not_claimant"}
        assert (task.status, task.agent) == ("claimed", "agent-b")
    assert len(types_in(store, "t")) == 3


def test_a_v1_task_created_event_is_upcast(
    service: TaskService, store: EventStore, clock: Clock
) -> None:
    """Written by the first release: no schema_version, no requester, no timeout."""
    store.append("task-legacy", [NewEvent("TASK_CREATED", {"title": "from v1"})])
    task = service.get("legacy")
    assert (task.title, task.requested_by, task.claim_timeout.total_seconds()) == (
        "from v1",
        "unknown",
        300,
    )
    service.claim("legacy", "agent-a")
    clock.advance(299)
    refused("claim_held", lambda: service.claim("legacy", "agent-b"))
    clock.advance(1)
    service.claim("legacy", "agent-b")
    # The log is never rewritten.
    assert store.read_stream("task-legacy")[0].data == {"title": "from v1"}


def test_snapshots_every_five_events(
    service: TaskService,
    store: EventStore,
    clock: Clock,
    query: Callable[..., list[tuple[object, ...]]],
) -> None:
    service.create("s", "hot potato", requested_by="ada", claim_timeout_seconds=1)
    for n in range(5):  # claimed, then reassigned four times: 6 events
        service.claim("s", f"agent-{n}")
        clock.advance(1)
    assert query(
        "SELECT aggregate_type, version FROM aura.snapshots WHERE stream_id = 'task-s'"
    ) == [(Task.type_name(), 5)]

    from_snapshot = service.get("s")
    from_events = Repository(store, Task, snapshots=False).load("s")
    assert from_snapshot.version == from_events.version == 6
    assert from_snapshot.snapshot_state() == from_events.snapshot_state()
    assert from_snapshot.claims == 5

    # Loading really starts from the snapshot: a doctored one shows through.
    query(
        "UPDATE aura.snapshots SET state = jsonb_set(state, '{title}', '\"doctored\"')"
        " WHERE stream_id = 'task-s'"
    )
    assert service.get("s").title == "doctored"
    assert Repository(store, Task, snapshots=False).load("s").title == "hot potato"
