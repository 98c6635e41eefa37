"""`aura-pg projections shadow|diff|promote` in subprocesses, beside a
running daemon, as an operator validates a new version in shadow mode."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from aura_pg import EventStore, NewEvent
from tests.helpers.projections import (
    FIXTURE_CATALOG,
    assert_exact_fold,
    caught_up,
    query,
    stream_counts,
    wait_for_sync,
)
from tests.integration.test_shadows import V1_COUNT, V2_COUNT, counts_without_b

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ["--catalog", str(FIXTURE_CATALOG)]


def aura_pg(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aura_pg", *args],
        cwd=ROOT, capture_output=True, text=True, check=check, timeout=120,
    )  # fmt: skip


def background(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "aura_pg", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def stopped(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """SIGTERM, then the exit status and what it printed (pipes closed)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    return process.returncode, out, err


def test_shadow_diff_promote_rollback_and_drop(dsn: str, store: EventStore, tmp_path: Path) -> None:
    aura_pg("projections", "register", "tally_set", *CATALOG, "--dsn", dsn)
    for n in range(20):
        store.append(f"s-{n % 4}", [NewEvent("B" if n % 4 == 0 else "A", {"n": n})])
    v2 = tmp_path / "tally_v2.sql"
    v2.write_text((FIXTURE_CATALOG.parent / "tally.sql").read_text().replace(V1_COUNT, V2_COUNT))

    shadow = background("projections", "shadow", "tally_set", "--sql", str(v2), *CATALOG,
                        "--poll-interval", "0.2", "--dsn", dsn)  # fmt: skip
    # The daemon runs the shadow from its start (it would find it within 5 s otherwise).
    wait_for_sync(lambda: query(dsn, "SELECT count(*) FROM aura.shadow_status") == [(1,)])
    daemon = background("project", "tally_set", *CATALOG, "--wake", "poll",
                        "--poll-interval", "0.2", "--dsn", dsn)  # fmt: skip
    try:
        wait_for_sync(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_set__shadow"))
        # The daemon found the shadow at start and runs it too.
        code, out, _ = stopped(shadow)
        assert code == 0 and "tally_set: shadow tally_set__shadow created" in out

        differs = aura_pg("projections", "diff", "tally_set", "--json", "--dsn", dsn, check=False)
        assert differs.returncode == 4, differs.stderr
        report = json.loads(differs.stdout)
        assert (report["identical"], report["differing_rows"]) == (False, 1)
        assert [(d["table"], d["key"], d["columns"]) for d in report["differences"]] == [
            ("streams", {"stream_id": "s-0"}, ["events"])
        ]
        text = aura_pg("projections", "diff", "tally_set", "--dsn", dsn, check=False).stdout
        assert "1 rows differ in 1 of 4 tables" in text
        assert 'streams differs {"stream_id": "s-0"}: events: 5 -> 0' in text

        promoted = aura_pg("projections", "promote", "tally_set", "--dsn", dsn)
        assert promoted.stdout.strip() == "tally_set: promoted"
        store.append("s-0", [NewEvent("B", {})])
        wait_for_sync(lambda: caught_up(dsn, "tally_set") and caught_up(dsn, "tally_set__shadow"))
        assert stream_counts(dsn, "tally_set") == counts_without_b(dsn)
        assert_exact_fold(dsn, "tally_set__shadow")  # the old version, still live

        rolled_back = aura_pg("projections", "promote", "tally_set", "--dsn", dsn)
        assert rolled_back.returncode == 0
        wait_for_sync(lambda: caught_up(dsn, "tally_set"))
        assert_exact_fold(dsn, "tally_set")

        dropped = aura_pg("projections", "shadow", "tally_set", "--drop", "--dsn", dsn)
        assert dropped.stdout.strip() == "tally_set: shadow dropped"
        store.append("s-9", [NewEvent("A", {})])
        wait_for_sync(lambda: caught_up(dsn, "tally_set"))
        assert daemon.poll() is None  # the daemon carries on without the shadow
        assert_exact_fold(dsn, "tally_set")
        gone = aura_pg("projections", "diff", "tally_set", "--dsn", dsn, check=False)
        assert gone.returncode == 1 and "unknown projection 'tally_set__shadow'" in gone.stderr
        assert query(dsn, "SELECT count(*) FROM aura.shadow_status") == [(0,)]
    finally:
        stopped(shadow)
        code, _, err = stopped(daemon)
    assert code == 0, err
