"""The Chaos Toolkit experiments of deploy/chaos/, run as an operator would
run them (`chaos run`), against a stack of this module's own: a local
cluster it may crash, migrated, two `aura-pg project` daemons as processes,
each serving /health, and some debates in the log.

Each experiment must complete with its steady state met before and after
and every activity of its method and rollbacks succeeded; then the world
is checked from outside: the read models are exactly the fold of the log,
dead letters are as expected, no fault is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aura_pg import EventStore, NewEvent, migrate
from aura_pg.chaos import ChaosUnavailable, toolkit
from aura_pg.chaos.injector import process_gone
from aura_pg.devtools.localdb import LocalCluster, free_port, temporary_cluster
from tests.helpers.metrics import fetch
from tests.helpers.projections import query, wait_for_sync

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = ROOT / "deploy" / "chaos"
BIN = Path(sys.executable).parent
EXPERIMENTS = (
    "event-store-failure",
    "projector-crash",
    "poison-event",
    "slow-handler",
    "connection-loss",
)
PROJECTIONS = ("agent_performance", "debate_state", "event_type_counts", "stream_summary")
PROJECTOR_ARGS = ["--poll-interval", "0.2", "--log-format", "json"]


@dataclass
class Stack:
    cluster: LocalCluster
    dsn: str
    workdir: Path
    health_urls: list[str]
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # Daemons that an experiment started (a supervisor's restart), by pid.
    adopted: list[int] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AURA_PG_", "PG"))}
        env.update(
            AURA_PG_DSN=self.dsn,
            AURA_PG_HEALTH_URL=self.health_urls[0],
            AURA_PG_STANDBY_HEALTH_URL=self.health_urls[1],
            AURA_PG_DATA_DIR=str(self.cluster.data_dir),
            AURA_PG_PORT=str(self.cluster.port),
            AURA_PG_PROJECTOR_ARGS=" ".join(PROJECTOR_ARGS),
            AURA_PG_CHAOS_LOG_DIR=str(self.workdir / "restarted"),
        )
        return env


def health(url: str) -> int | None:
    try:
        return fetch(url, timeout=3)[0]
    except OSError:
        return None


def start_daemon(dsn: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [str(BIN / "aura-pg"), "project", "--dsn", dsn, "--metrics-host", "127.0.0.1",
             "--metrics-port", str(port), *PROJECTOR_ARGS],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=handle, stderr=handle,
        )  # fmt: skip


def owners(dsn: str) -> dict[str, str | None]:
    rows = query(dsn, "SELECT name, owner FROM aura.projection_checkpoints ORDER BY name")
    return dict(rows)


def caught_up(dsn: str) -> bool:
    rows = query(dsn, "SELECT name, events_behind FROM aura.projection_status")
    return len(rows) == len(PROJECTIONS) and all(behind == 0 for _, behind in rows)


def append_debate(dsn: str, debate_id: str) -> None:
    """A debate's first events, as the domain writes them."""
    agents = ["ada", "grace", "linus"]
    with EventStore.connect(dsn, max_size=1) as store:
        store.append(
            f"debate-{debate_id}",
            [
                NewEvent(
                    "DEBATE_STARTED",
                    {"topic": f"Topic {debate_id}", "participants": agents, "started_by": "ada"},
                    metadata={"schema_version": 2},
                ),
                NewEvent(
                    "DEBATE_ARGUMENT_ADDED",
                    {"agent_id": "ada", "round": 1, "stance": "for", "text": "yes"},
                ),
                NewEvent("DEBATE_VOTE_CAST", {"agent_id": "grace", "vote": "approve"}),
            ],
        )


def stop_adopted(pid: int) -> None:
    """Stop a daemon an experiment started (not this process's child), by
    its pid, after checking the pid is still such a daemon."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return
    if b"aura_pg.cli" not in command or process_gone(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while not process_gone(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("chaos-stack")
    with temporary_cluster({"fsync": "off"}, prefix="aura-pg-chaos-") as cluster:
        dsn = cluster.dsn()
        migrate.upgrade(dsn)
        ports = [free_port(), free_port()]
        running = Stack(
            cluster, dsn, workdir, [f"http://127.0.0.1:{port}/health" for port in ports]
        )
        try:
            # The first daemon owns every projection; the second stands by.
            running.daemons.append(start_daemon(dsn, ports[0], workdir / "first.log"))
            wait_for_sync(
                lambda: (
                    health(running.health_urls[0]) == 200
                    and len(owners(dsn)) == len(PROJECTIONS)
                    and all(owners(dsn).values())
                ),
                90,
                "the first daemon to own every projection",
            )
            running.daemons.append(start_daemon(dsn, ports[1], workdir / "second.log"))
            wait_for_sync(lambda: health(running.health_urls[1]) == 200, 90, "the stand-by")
            for n in range(5):
                append_debate(dsn, f"before-{n}")
            wait_for_sync(lambda: caught_up(dsn), 60, "the first catch-up")
            yield running
        finally:
            for daemon in running.daemons:
                if daemon.poll() is None:
                    daemon.send_signal(signal.SIGTERM)
            for daemon in running.daemons:
                try:
                    daemon.wait(30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(10)
            for pid in running.adopted:
                stop_adopted(pid)


def activity_runs(journal: dict[str, Any]) -> list[dict[str, Any]]:
    return [*journal.get("run", []), *journal.get("rollbacks", [])]


def outputs(journal: dict[str, Any], name: str) -> list[Any]:
    return [run["output"] for run in activity_runs(journal) if run["activity"]["name"] == name]


def run_experiment(stack: Stack, name: str, tmp_path: Path) -> dict[str, Any]:
    journal_path = tmp_path / f"{name}.journal.json"
    done = subprocess.run(
        [str(BIN / "chaos"), "--no-version-check", "--log-file", str(tmp_path / f"{name}.log"),
         "--settings", str(tmp_path / "no-settings.yaml"),
         "run", "--rollback-strategy", "always", "--journal-path", str(journal_path),
         str(EXPERIMENTS_DIR / f"{name}.json")],
        cwd=ROOT, env=stack.env(), capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert journal_path.exists(), done.stdout + done.stderr
    journal: dict[str, Any] = json.loads(journal_path.read_text())
    for run in activity_runs(journal):
        if run["activity"]["provider"].get("func") == "ensure_projectors" and run["output"]:
            stack.adopted.extend(started["pid"] for started in run["output"]["started"])
    failed = [
        (run["activity"]["name"], run.get("exception"))
        for run in activity_runs(journal)
        if run["status"] != "succeeded"
    ]
    report = f"{done.stdout}{done.stderr}\nfailed activities: {failed}"
    assert journal["status"] == "completed", report
    assert journal["deviated"] is False, report
    for phase in ("before", "after"):
        assert (journal["steady_states"][phase] or {}).get("steady_state_met") is True, report
    assert not failed, report
    assert len(journal["rollbacks"]) == len(journal["experiment"]["rollbacks"]), report
    assert done.returncode == 0, report
    return journal


def assert_read_models_are_the_fold_of_the_log(dsn: str) -> None:
    """stream_summary and event_type_counts apply every event (they never
    fail): after any fault, each holds every event exactly once."""
    streams = query(
        dsn, "SELECT stream_id, count(*), max(version) FROM aura.events GROUP BY 1 ORDER BY 1"
    )
    assert (
        query(dsn, "SELECT stream_id, events, last_version FROM stream_summary.streams ORDER BY 1")
        == streams
    )
    types = query(dsn, "SELECT type, count(*) FROM aura.events GROUP BY 1 ORDER BY 1")
    assert query(dsn, "SELECT type, events FROM event_type_counts.event_types ORDER BY 1") == types


def test_every_experiment_file_is_run_here() -> None:
    assert sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.json")) == sorted(EXPERIMENTS)
    for name in EXPERIMENTS:
        experiment = json.loads((EXPERIMENTS_DIR / f"{name}.json").read_text())
        assert experiment["steady-state-hypothesis"]["probes"], name
        assert experiment["method"] and experiment["rollbacks"], name


def test_a_rollback_never_starts_a_cluster_where_there_is_none(tmp_path: Path) -> None:
    """start_postgres is a rollback: given a wrong data directory it must
    not create (initdb) and start a new, empty cluster there."""
    with pytest.raises(ChaosUnavailable, match="no Postgres cluster"):
        toolkit.start_postgres(data_dir=str(tmp_path / "data"), port=free_port())
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment(stack: Stack, name: str, tmp_path: Path) -> None:
    dsn = stack.dsn
    events_before = query(dsn, "SELECT count(*) FROM aura.events")[0][0]
    journal = run_experiment(stack, name, tmp_path)

    if name == "event-store-failure":
        (writer,) = outputs(journal, "writer-appends-throughout")
        assert writer["appended"] > 20 and writer["stored"] == writer["appended"]
        (stopped,) = outputs(journal, "crash-postgres")
        assert stopped["mode"] == "immediate"
        assert outputs(journal, "start-postgres")[0]["started"] is True
    elif name == "projector-crash":
        (killed,) = outputs(journal, "kill-the-owning-daemon")
        (takeover,) = outputs(journal, "the-stand-by-takes-over")
        assert all(not owner.endswith(f":{killed['pid']}") for owner in takeover["owners"].values())
        (restart,) = outputs(journal, "a-supervisor-restarts-the-killed-daemon")
        assert [started["pid"] for started in restart["started"]] != []
        ours = {daemon.pid: daemon for daemon in stack.daemons}
        if killed["pid"] in ours:
            assert ours[killed["pid"]].wait(5) == -signal.SIGKILL
    elif name == "poison-event":
        (letter,) = outputs(journal, "the-poison-is-dead-lettered")[0]
        assert letter["projection"] == "debate_state"
        assert "invalid input syntax for type integer" in letter["error"]
        (skipped,) = outputs(journal, "skip-the-poison-dead-letters")
        assert skipped["skipped"] == [letter["id"]]
        rows = query(dsn, "SELECT id, status FROM aura.dead_letters")
        assert rows == [(letter["id"], "skipped")]
        # The projection goes on for real debates too.
        append_debate(dsn, "after-the-poison")
        wait_for_sync(lambda: caught_up(dsn), 30)
        assert query(
            dsn,
            "SELECT status, votes_for FROM debate_state.debates WHERE debate_id = %s",
            ["after-the-poison"],
        ) == [("open", 1)]
    elif name == "slow-handler":
        (lag,) = outputs(journal, "lag-appears")
        assert lag["events_behind"]["stream_summary"] >= 1
        # Events appended during a slow batch wait for its commit, for everyone.
        (held_back,) = outputs(journal, "the-others-wait-behind-the-slow-batch")
        assert held_back["events_behind"]["event_type_counts"] >= 1
        (removed,) = outputs(journal, "remove-the-slow-trigger")
        assert removed["removed"] == ["stream_summary.streams: aura_chaos_delay"]
    elif name == "connection-loss":
        for action in ("terminate-the-daemons-sessions", "terminate-them-again"):
            (ended,) = outputs(journal, action)
            # At least the owners' runners and a log watcher, every time.
            assert {f"aura-pg projector {p}" for p in PROJECTIONS} <= set(ended["sessions"])
            assert "aura-pg projector watcher" in ended["sessions"]
    if name in ("event-store-failure", "connection-loss"):
        # The daemons rode the fault out themselves: nothing had to restart them.
        assert outputs(journal, "restart-any-projector-that-died")[0]["started"] == []

    # The world afterwards, from outside the experiment.
    assert query(dsn, "SELECT count(*) FROM aura.events")[0][0] > events_before
    assert query(dsn, "SELECT count(*) FROM aura.pending_dead_letters") == [(0,)]
    assert query(
        dsn, "SELECT count(*) FROM pg_trigger WHERE starts_with(tgname, 'aura_chaos')"
    ) == [(0,)]
    wait_for_sync(lambda: caught_up(dsn), 30, "catch-up after the experiment")
    assert_read_models_are_the_fold_of_the_log(dsn)
    assert all(health(url) == 200 for url in stack.health_urls)
